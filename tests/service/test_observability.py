"""Observability of the service (issue 17): the process and GC collectors (also in multiprocess mode), the
in-flight gauge, the queue wait for a worker thread, JSON logs with an access line per request, and OpenTelemetry
traces checked with the SDK's InMemorySpanExporter, on the real app and a real Redis."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from dare_common import DareError
from service.api.concurrency import BlockingPool
from service.api.middleware import RequestMetrics
from service.core.config import Settings
from service.errors import RequestTimeoutError
from service.logs import JsonFormatter
from service.main import create_app
from service.metrics import ServiceMetrics
from service.tracing import tracer_provider_from_env, tracing_requested
from tests.conftest import TEST_CATE_RAW_IDS, TEST_ITEM_RAW_IDS

CANDS = [{"item_id": i, "category_id": TEST_CATE_RAW_IDS[i % 10]} for i in TEST_ITEM_RAW_IDS[:6]]
EVENTS = [{"item_id": i, "category_id": TEST_CATE_RAW_IDS[i % 10]} for i in TEST_ITEM_RAW_IDS[10:40]]
ROOT = Path(__file__).resolve().parents[2]


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


# --- /metrics -----------------------------------------------------------------------------------------------------


def test_metrics_has_process_gc_in_flight_and_queue_wait(make_client, models_dir: Path) -> None:
    with make_client(models_dir=models_dir) as client:
        client.post("/events", json={"user_id": "u1", "events": EVENTS})
        for _ in range(3):
            assert client.post("/score", json={"user_id": "u1", "candidates": CANDS}).status_code == 200
        found = samples(client.get("/metrics").text)
    assert found["process_cpu_seconds_total"][0][1] > 0
    assert found["process_resident_memory_bytes"][0][1] > 10e6
    assert {labels["generation"] for labels, _ in found["python_gc_collections_total"]} == {"0", "1", "2"}
    assert found["dare_http_requests_in_flight"] == [({}, 1.0)]  # the scrape itself
    waits = {labels["operation"]: value for labels, value in found["dare_queue_wait_seconds_count"]}
    assert waits["scoring"] == 3.0 and waits["append"] == 1.0


def test_in_flight_counts_requests_while_they_run() -> None:
    metrics = ServiceMetrics()
    inside, leave = asyncio.Event(), asyncio.Event()

    async def app(scope, receive, send) -> None:
        inside.set()
        await leave.wait()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def scenario() -> list[float]:
        middleware = RequestMetrics(app, metrics)
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        seen = [gauge(metrics)]
        tasks = [asyncio.create_task(middleware({"type": "http", "method": "GET", "path": "/x", "headers": []}, receive, send))
                 for _ in range(3)]  # fmt: skip
        await inside.wait()
        await asyncio.sleep(0.01)
        seen.append(gauge(metrics))
        leave.set()
        await asyncio.gather(*tasks)
        seen.append(gauge(metrics))
        return seen

    assert asyncio.run(scenario()) == [0.0, 3.0, 0.0]


def gauge(metrics: ServiceMetrics) -> float:
    return samples(metrics.exposition().decode())["dare_http_requests_in_flight"][0][1]


def test_queue_wait_is_the_wait_for_a_worker_including_the_users_share() -> None:
    metrics = ServiceMetrics()

    def waits(operation: str) -> tuple[float, float]:
        found = samples(metrics.exposition().decode())
        count = next(v for labels, v in found["dare_queue_wait_seconds_count"] if labels["operation"] == operation)
        total = next(v for labels, v in found["dare_queue_wait_seconds_sum"] if labels["operation"] == operation)
        return count, total

    async def scenario() -> None:
        pool = BlockingPool(2, 0.6, metrics)  # per-user share: 1 thread
        try:
            # the same user twice: the second waits for the first's share (~0.25 s) though a worker is free
            await asyncio.gather(pool.run(lambda: time.sleep(0.25), what="scoring", key="u"),
                                 pool.run(lambda: None, what="scoring", key="u"))  # fmt: skip
            count, total = waits("scoring")
            assert count == 2 and 0.2 <= total < 0.5, total
            # both workers held: a call that never starts observes the time it waited (the timeout)
            release = threading.Event()
            held = [pool.submit(release.wait), pool.submit(release.wait)]
            with pytest.raises(RequestTimeoutError):
                await pool.run(lambda: None, what="history read")
            release.set()
            await asyncio.gather(*held)
            count, total = waits("history read".replace(" ", "_"))
            assert count == 1 and 0.55 <= total < 1.0, total
        finally:
            pool.shutdown()

    asyncio.run(scenario())


WORKER = """
import json, os, sys
from service.metrics import ServiceMetrics
metrics = ServiceMetrics()
sum(range(int(sys.argv[1])))  # some CPU time
first = metrics.exposition().decode()  # a scrape samples the scraping worker first
sum(range(10**7))
print(json.dumps({"pid": os.getpid(), "first": first, "second": metrics.exposition().decode()}))
"""


def test_process_and_gc_figures_in_multiprocess_mode(tmp_path: Path) -> None:
    """prometheus-client's collectors do not work in multiprocess mode (it decides at import, so each worker here is
    its own process): each worker copies its figures into the shared files, gauges per live worker (pid label),
    counters summed over the workers."""
    folder = tmp_path / "prom"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}

    def worker(loop: int) -> dict:
        run = subprocess.run([sys.executable, "-c", WORKER, str(loop)], env=env, cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    a = worker(3 * 10**7)
    b = worker(0)
    found = samples(b["first"])
    rss = {labels["pid"]: value for labels, value in found["process_resident_memory_bytes"]}
    assert set(rss) == {str(a["pid"]), str(b["pid"])} and all(v > 10e6 for v in rss.values())
    cpu = found["process_cpu_seconds_total"]
    assert len(cpu) == 1 and cpu[0][0] == {}
    a_cpu = samples(a["second"])["process_cpu_seconds_total"][0][1]
    assert cpu[0][1] > a_cpu >= 0.3  # a's busy loop is in the sum, with b's own time
    assert samples(b["second"])["process_cpu_seconds_total"][0][1] > cpu[0][1]  # increments: never a reset
    assert {labels["generation"] for labels, _ in found["python_gc_collections_total"]} == {"0", "1", "2"}
    assert "pid" in dict(found["process_open_fds"][0][0])
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(a["pid"], str(folder))  # what the lifespan does when a worker stops
    c = worker(0)
    pids = {labels["pid"] for labels, _ in samples(c["first"])["process_resident_memory_bytes"]}
    assert pids == {str(b["pid"]), str(c["pid"])}


# --- logs ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_json_logs_have_an_access_line_per_request(make_client, models_dir: Path, json_lines: io.StringIO) -> None:
    with make_client(models_dir=models_dir, log_format="json") as client:
        assert client.post("/score", json={"user_id": "u1", "candidates": CANDS},
                           headers={"X-Request-ID": "req-42"}).status_code == 200  # fmt: skip
        assert client.post("/score", json={"user_id": "u1", "candidates": CANDS, "model": "nope"}).status_code == 404
        assert client.get("/users/u%0Ax/history").status_code == 200
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["logger"] == "service.registry" for line in lines)  # the service's other lines too
    access = [line for line in lines if line["logger"] == "service.access"]
    assert len(access) == 3
    ok, missing, history = access
    assert ok["request_id"] == "req-42" and ok["route"] == "/score" and ok["method"] == "POST" and ok["status"] == 200
    assert ok["model"] == "dare-a" and ok["duration_ms"] > 0 and ok["level"] == "info"
    assert ok["message"] == "POST /score 200" and ok["time"].endswith("Z")
    assert missing["status"] == 404 and len(missing["request_id"]) == 32  # generated (service/api/request_id.py)
    assert history["route"] == "/users/{user_id}/history" and "model" not in history


def test_text_logs_stay_the_default_without_access_lines(make_client, models_dir: Path, json_lines: io.StringIO) -> None:
    with make_client(models_dir=models_dir) as client:
        assert client.post("/score", json={"user_id": "u1", "candidates": CANDS}).status_code == 200
    assert not [line for line in json_lines.getvalue().splitlines() if '"service.access"' in line]


def test_json_formatter_escapes_and_keeps_tracebacks() -> None:
    record = logging.LogRecord("service", logging.ERROR, __file__, 1, "bad %r", ("a\nb",), None)
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "bad 'a\\nb'" and "ValueError: boom" in parsed["exception"] and parsed["level"] == "error"


# --- tracing ------------------------------------------------------------------------------------------------------


def test_a_request_with_a_traceparent_yields_its_spans_stages_and_attributes(make_client, models_dir: Path,
                                                                               redis_url: str, tmp_path: Path) -> None:  # fmt: skip
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    settings = Settings(redis_url=redis_url, models_dir=models_dir, data_dir=tmp_path / "var")
    from fastapi.testclient import TestClient

    with TestClient(create_app(settings, tracer_provider=provider)) as client:
        client.post("/events", json={"user_id": "u1", "events": EVENTS})
        exporter.clear()
        answer = client.post("/score", json={"user_id": "u1", "candidates": CANDS},
                             headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})  # fmt: skip
        assert answer.status_code == 200
        spans = exporter.get_finished_spans()
        request = next(s for s in spans if s.kind == SpanKind.SERVER)
        assert request.name == "POST /score"
        assert format(request.context.trace_id, "032x") == trace_id and format(request.parent.span_id, "016x") == parent_id
        attrs = request.attributes
        assert attrs["dare.model"] == "dare-a" and attrs["dare.history_length"] == 30 and attrs["dare.candidates"] == 6
        assert attrs["http.route"] == "/score" and attrs["http.response.status_code"] == 200
        stages = sorted((s for s in spans if s.kind != SpanKind.SERVER), key=lambda s: s.start_time)
        assert [s.name for s in stages] == ["store_fetch", "id_mapping", "search", "scoring"]
        timings = answer.json()["timings_ms"]
        for stage in stages:
            assert stage.context.trace_id == request.context.trace_id and stage.parent.span_id == request.context.span_id
            assert stage.attributes["dare.model"] == "dare-a"
            assert request.start_time <= stage.start_time <= stage.end_time <= request.end_time
            assert (stage.end_time - stage.start_time) / 1e6 == pytest.approx(timings[stage.name], abs=0.001)
        for a, b in zip(stages, stages[1:]):
            assert a.end_time == b.start_time
        # no traceparent: a new trace; an error status is marked on the span
        exporter.clear()
        assert client.post("/score", json={"user_id": "u1", "candidates": CANDS, "model": "nope"}).status_code == 404
        (span,) = exporter.get_finished_spans()
        assert format(span.context.trace_id, "032x") != trace_id and span.parent is None
        assert span.attributes["http.response.status_code"] == 404 and span.status.status_code == StatusCode.UNSET
        exporter.clear()
        assert client.get("/readyz").status_code == 200 and client.get("/metrics").status_code == 200
        assert client.get("/models").status_code == 200
        assert [s.name for s in exporter.get_finished_spans()] == ["GET /models"]  # scrapes and probes: untraced


@pytest.mark.parametrize(
    ("otel", "env", "on"),
    [
        (False, {}, False),
        (True, {}, True),
        (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        (False, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        (False, {"OTEL_TRACES_EXPORTER": "console"}, True),
        (False, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
        (True, {"OTEL_SDK_DISABLED": "true"}, False),
        (False, {"OTEL_SERVICE_NAME": "x"}, False),
    ],
)
def test_tracing_is_off_unless_asked_for(otel: bool, env: dict[str, str], on: bool) -> None:
    assert tracing_requested(Settings(otel=otel), env) is on


def test_exporters_come_from_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "scorer-eu")
    provider = tracer_provider_from_env()
    assert provider.resource.attributes["service.name"] == "scorer-eu"
    provider.shutdown()
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    provider = tracer_provider_from_env()
    assert provider.resource.attributes["service.name"] == "dare-scoring"
    provider.shutdown()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(DareError, match="OTEL_TRACES_EXPORTER: 'zipkin' is not supported"):
        tracer_provider_from_env()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(DareError, match="OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json' is not supported"):
        tracer_provider_from_env()


def test_tracing_off_imports_no_opentelemetry_sdk(tmp_path: Path) -> None:
    """FastAPI imports the OpenTelemetry API itself (and redis-py the SDK's metrics when installed); the service
    imports the tracing SDK and the exporters (the `otel` extra) only when tracing is on."""
    code = (
        "import sys\n"
        "from service.core.config import Settings\n"
        "from service.main import create_app\n"
        f"app = create_app(Settings(models_dir={str(tmp_path)!r}))\n"
        "assert not [m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.exporter'))]\n"
        "app = create_app(Settings(models_dir='.', otel=True))\n"
        "assert 'opentelemetry.sdk.trace' in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DARE_", "OTEL_"))}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "OTEL_TRACES_EXPORTER": "none"}, check=True)


# --- `dare serve` as a real process -------------------------------------------------------------------------------


def test_dare_serve_json_logs_and_process_metrics_of_every_worker(tmp_path: Path, exported_model_dir: Path,
                                                                  redis_url: str) -> None:  # fmt: skip
    from tests.service.test_serve import call, serving, wait_for

    models = tmp_path / "models"
    shutil.copytree(exported_model_dir, models / "dare-a")
    env = {"DARE_REDIS_URL": redis_url, "DARE_MODELS_DIR": str(models), "DARE_WORKERS": "2", "DARE_LOG_FORMAT": "json",
           "DARE_TRAFFIC_SPLIT": "dare-a=1"}  # fmt: skip
    with serving([], env) as (base, proc):
        assert call(base, "POST", "/score", {"user_id": "w", "candidates": CANDS})[0] == 200

        def pids() -> set[str]:
            text = call(base, "GET", "/metrics")[1]
            return {labels["pid"] for labels, _ in samples(text).get("process_resident_memory_bytes", [])}

        wait_for(lambda: len(pids()) == 2)  # one series per worker, each worker's own
        found = samples(call(base, "GET", "/metrics")[1])
        assert found["process_cpu_seconds_total"][0][1] > 0
        assert found["dare_traffic_split_requests_total"] == [({"model": "dare-a"}, 1.0)]
    output = proc.stdout.read().splitlines()
    lines = [json.loads(line) for line in output]  # every line of the supervisor and the workers is JSON
    assert any(line["logger"].startswith("uvicorn") for line in lines)
    access = [line for line in lines if line["logger"] == "service.access"]
    assert {(a["route"], a["status"], a.get("model")) for a in access} >= {("/score", 200, "dare-a"), ("/readyz", 200, None)}
    assert not [line for line in lines if line["logger"] == "uvicorn.access"]


def test_dare_serve_refuses_a_bad_split_or_tracing_setup_in_one_line(tmp_path: Path, exported_model_dir: Path) -> None:
    from tests.service.test_serve import DARE

    shutil.copytree(exported_model_dir, tmp_path / "dare-a")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DARE_", "OTEL_"))}
    cases = [
        ({"DARE_TRAFFIC_SPLIT": "dare-a=90,dare-b"}, "DARE_TRAFFIC_SPLIT"),
        ({"DARE_TRAFFIC_SPLIT": "dare-a=90,dare-b=10"}, "no model folder 'dare-b'"),
        ({"DARE_SHADOW_MODEL": "ghost"}, "no model folder 'ghost'"),
        ({"DARE_LOG_FORMAT": "xml"}, "DARE_LOG_FORMAT"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: 'zipkin' is not supported"),
    ]
    for extra, message in cases:
        out = subprocess.run([*DARE, "serve", "--models", str(tmp_path)], env={**env, **extra}, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert out.returncode == 2, (extra, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    (tmp_path / "traffic.json").write_text('{"split": {"dare-a": 1, "dare-c": 1}}')
    out = subprocess.run([*DARE, "serve", "--models", str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "traffic.json: no model folder 'dare-c'" in out.stderr, out.stderr


def test_dare_serve_exports_spans_configured_by_the_otel_variables(tmp_path: Path, exported_model_dir: Path,
                                                                   redis_url: str) -> None:  # fmt: skip
    """The environment path end to end: OTEL_TRACES_EXPORTER=console, a request carrying a traceparent; the spans
    are flushed when the server stops."""
    import urllib.request

    from tests.service.test_serve import serving

    models = tmp_path / "models"
    shutil.copytree(exported_model_dir, models / "dare-a")
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    env = {"DARE_REDIS_URL": redis_url, "DARE_MODELS_DIR": str(models), "OTEL_TRACES_EXPORTER": "console",
           "OTEL_SERVICE_NAME": "dare-test"}  # fmt: skip
    with serving([], env) as (base, proc):
        request = urllib.request.Request(
            base + "/score", data=json.dumps({"user_id": "t", "candidates": CANDS}).encode(), method="POST",
            headers={"content-type": "application/json", "traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
    output = proc.stdout.read()
    for name in ('"name": "POST /score"', '"name": "store_fetch"', '"name": "scoring"', f'"trace_id": "0x{trace_id}"',
                 '"service.name": "dare-test"', '"dare.history_length": 0'):  # fmt: skip
        assert name in output, (name, output[-3000:])
    assert '"name": "GET /readyz"' not in output  # probes are not traced

"""Scaling out: the service is stateless, so several workers (`dare serve --workers 2`) and several replicas
behind one Redis must answer alike. Real `dare serve` processes, a real redis-server, real HTTP."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dare.processes import stop_process
from service.redis_server import free_port
from tests.conftest import TEST_CATE_RAW_IDS, TEST_ITEM_RAW_IDS
from tests.shipping.conftest import ROOT


def start_serve(models: Path, redis_url: str, port: int, workers: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    command = [sys.executable, "-m", "dare.cli", "serve", "--models", str(models), "--port", str(port),
               "--workers", str(workers), "--redis", redis_url]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, env={**env, "DARE_LOG_LEVEL": "warning"}, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def wait_ready(process: subprocess.Popen, port: int, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"dare serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"dare serve on {port} not ready in {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def two_replicas(exported_model_dir: Path, make_redis_server, tmp_path: Path):
    """Replica A with 2 workers and replica B with 1, both on one private Redis."""
    models = tmp_path / "models"
    shutil.copytree(exported_model_dir, models / exported_model_dir.name)
    redis = make_redis_server()
    ports = [free_port(), free_port()]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    processes = [start_serve(models, redis.url, ports[0], 2, logs[0]), start_serve(models, redis.url, ports[1], 1, logs[1])]
    try:
        for process, port, log in zip(processes, ports, logs):
            wait_ready(process, port, log)
        yield processes, [f"http://127.0.0.1:{p}" for p in ports]
    finally:
        for process in processes:
            stop_process(process, 20, group=True)


def candidates(n: int = 12) -> list[dict[str, int]]:
    return [{"item_id": i, "category_id": TEST_CATE_RAW_IDS[i % 10]} for i in TEST_ITEM_RAW_IDS[:n]]


def test_workers_and_replicas_share_one_store_and_answer_alike(two_replicas) -> None:
    processes, (a, b) = two_replicas
    workers = [c for c in psutil.Process(processes[0].pid).children(recursive=True) if "redis" not in c.name()]
    assert len(workers) >= 2, f"--workers 2 should run two worker processes, found {workers}"

    events = [{"item_id": i, "category_id": TEST_CATE_RAW_IDS[i % 10], "timestamp": 1_511_600_000 + i}
              for i in TEST_ITEM_RAW_IDS[10:40]]  # fmt: skip
    assert httpx.post(f"{a}/events", json={"user_id": "shared", "events": events}).json()["length"] == 30
    # Written through replica A, read through replica B: nothing lives in a process.
    history = httpx.get(f"{b}/users/shared/history", params={"limit": 5}).json()
    assert history["length"] == 30 and [e["item_id"] for e in history["events"]] == list(TEST_ITEM_RAW_IDS[35:40])

    body = {"user_id": "shared", "candidates": candidates()}
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda i: httpx.post(f"{(a, b)[i % 2]}/score", json=body, timeout=30), range(40)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200][:3]
    first = answers[0].json()["scores"]
    assert all(r.json()["scores"] == pytest.approx(first, abs=1e-6) for r in answers)
    assert all(r.json()["history_length"] == 30 for r in answers)

    # Replica A's /metrics aggregates its two workers (prometheus-client multiprocess mode): every /score it
    # answered is counted once, whichever worker answered it.
    text = httpx.get(f"{a}/metrics").text
    counted = sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples
        if s.name == "dare_http_request_duration_seconds_count" and s.labels.get("endpoint") == "/score"
    )  # fmt: skip
    assert counted == 20

    # A replica going away leaves the other serving the same users.
    stop_process(processes[0], 20, group=True)
    answer = httpx.post(f"{b}/score", json=body, timeout=30)
    assert answer.status_code == 200 and answer.json()["scores"] == pytest.approx(first, abs=1e-6)

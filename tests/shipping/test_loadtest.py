"""The Locust scenario's payloads and answer check, and `dare loadtest` end to end (short runs) against the models
that `dare demo` built: real Locust, a real service, a real private Redis."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dare.demo import model_name
from loadtest.compare import LoadtestConfig, LoadtestError, find_models, markdown_table, peak_rps
from loadtest.scenario import Payloads, ScenarioSettings, validate_score_body
from tests.shipping.conftest import DEMO_DIMS, ROOT, DemoBuild


def test_payloads_are_real_users_and_items(demo_build: DemoBuild) -> None:
    import gzip

    rows = [line.strip().split(",") for line in gzip.open(demo_build.sample, "rt")]
    users = {r[0] for r in rows}
    pairs = {(int(r[1]), int(r[2])) for r in rows}
    payloads = Payloads.from_csv(demo_build.sample, max_users=50, seed=0)
    assert len(payloads.users) == 50 and set(payloads.users) <= users
    body = payloads.request(random.Random(0), 30, "dare-att8")
    assert body["user_id"] in users and body["model"] == "dare-att8" and len(body["candidates"]) == 30
    assert all((c["item_id"], c["category_id"]) in pairs for c in body["candidates"])
    assert "model" not in payloads.request(random.Random(0), 3, "")


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"scores": [0.2, 0.7], "model": "m"}, None),
        ([0.2, 0.7], "not a JSON object"),
        ({"probs": [0.2, 0.7]}, "no 'scores'"),
        ({"scores": [0.2], "model": "m"}, "1 scores for 2 candidates"),
        ({"scores": [0.2, 1.0], "model": "m"}, "outside (0, 1)"),
        ({"scores": [0.0, 0.5], "model": "m"}, "outside (0, 1)"),
        ({"scores": [float("nan"), 0.5], "model": "m"}, "outside (0, 1)"),
        ({"scores": [True, 0.5], "model": "m"}, "outside (0, 1)"),
        ({"scores": ["0.5", 0.5], "model": "m"}, "outside (0, 1)"),
        ({"scores": [0.2, 0.7], "model": "other"}, "answered by 'other'"),
    ],
)
def test_answer_check(body: object, problem: str | None) -> None:
    found = validate_score_body(body, 2, "m")
    assert (found is None) if problem is None else (problem in found)


def test_scenario_settings_reject_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARE_LOADTEST_CANDIDATES", "many")
    with pytest.raises(ValueError, match="DARE_LOADTEST_CANDIDATES"):
        ScenarioSettings.from_env()
    monkeypatch.setenv("DARE_LOADTEST_CANDIDATES", "10")
    monkeypatch.setenv("DARE_LOADTEST_SHAPE", "sawtooth")
    with pytest.raises(ValueError, match="SHAPE"):
        ScenarioSettings.from_env()


def test_scenario_sends_the_token_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DARE_LOADTEST_TOKEN", raising=False)
    assert ScenarioSettings.from_env().headers == {}
    monkeypatch.setenv("DARE_LOADTEST_TOKEN", "s3cret")
    assert ScenarioSettings.from_env().headers == {"Authorization": "Bearer s3cret"}


def test_peak_rps_counts_whole_seconds() -> None:
    finished = np.array([0.1, 0.2, 0.9, 1.1, 1.5, 2.05])  # 3 answers in second 0, 2 in second 1, 1 partial
    assert peak_rps(finished + 1_700_000_000) == 3.0
    assert peak_rps(np.array([5.0])) == 0.0


def test_find_models_maps_att_dims_and_names_what_is_missing(demo_build: DemoBuild) -> None:
    assert find_models(demo_build.models, DEMO_DIMS) == {d: model_name(d) for d in DEMO_DIMS}
    with pytest.raises(LoadtestError, match=r"attention dim \[128\].*dare demo --no-serve"):
        find_models(demo_build.models, (DEMO_DIMS[0], 128))


def test_config_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(LoadtestError, match="workloads"):
        LoadtestConfig(models=tmp_path, workloads=("tiny",))
    with pytest.raises(LoadtestError, match="no such folder"):
        LoadtestConfig(models=tmp_path / "none")
    with pytest.raises(LoadtestError, match="service-cpus"):
        LoadtestConfig(models=tmp_path, service_cpus=(4096,))


def test_dare_loadtest_end_to_end(demo_build: DemoBuild, tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    service_cpus, locust_cpus = (cpus[0], cpus[1]) if len(cpus) > 1 else (cpus[0], cpus[0])
    dim = DEMO_DIMS[0]
    command = [
        sys.executable, "-m", "dare.cli", "loadtest", "--models", str(demo_build.models), "--att-dims", str(dim),
        "--workloads", "real,long", "--duration", "5", "--fixed-users", "2", "--fixed-rate", "4", "--ramp-users", "4",
        "--long-users", "4", "--long-events", "1000", "--service-cpus", str(service_cpus),
        "--locust-cpus", str(locust_cpus), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARE_")}
    # The service wants a token (as in docker-compose.yml); Locust sends it: no request may fail for it.
    env |= {"DARE_API_TOKEN": "loadtest-token", "DARE_LOADTEST_TOKEN": "loadtest-token"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"

    report = json.loads((tmp_path / "out" / "loadtest.json").read_text())
    runs = report["runs"]
    assert {(r["workload"], r["load"]) for r in runs} == {("real", "fixed"), ("real", "rising"), ("long", "fixed"),
                                                           ("long", "rising")}  # fmt: skip
    for run in runs:
        assert run["model"] == model_name(dim) and run["att_dim"] == dim
        assert run["requests"] > 0 and run["failures"] == 0, run
        assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
        assert run["candidates"] == (100 if run["workload"] == "real" else 200)
    fixed = [r for r in runs if r["load"] == "fixed"]
    # 2 users x 4 requests/s: the fixed load is a rate, not "as fast as possible"
    assert all(r["rps"] < 12 for r in fixed), fixed
    assert report["machine"]["service_cpus"] == [service_cpus] and report["machine"]["locust_cpus"] == [locust_cpus]
    table = (tmp_path / "out" / "loadtest.md").read_text()
    assert table.count(f"| {model_name(dim)} |") == 4 and "p99 ms" in table
    assert (tmp_path / "out" / "loadtest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "synthetic" in result.stdout.lower() or "SYNTHETIC" in result.stderr


def test_markdown_table_lists_every_run() -> None:
    from loadtest.compare import RunResult

    run = RunResult(workload="real", load="fixed", model="dare-att16", att_dim=16, candidates=100, users=4,
                    duration_s=20.0, requests=400, failures=1, rps=20.0, peak_rps=22.0, p50_ms=3.5, p95_ms=6.0,
                    p99_ms=9.25)  # fmt: skip
    table = markdown_table([run, run])
    assert table.count("| real | fixed | dare-att16 | 16 | 100 | 400 | 1 | 20.0 | 22.0 | 3.50 | 6.00 | 9.25 |") == 2


def test_private_redis_server_starts_in_a_relative_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    from service.redis_server import RedisServer

    monkeypatch.chdir(tmp_path)
    with RedisServer(Path("scratch") / "redis") as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
    assert (tmp_path / "scratch" / "redis" / "redis.log").is_file()
    assert not server.running, "stop() must end the server"

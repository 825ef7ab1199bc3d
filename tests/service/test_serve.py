"""`dare serve` as a real process: embedded Redis persisted in the data dir, SIGHUP reload, several workers with
aggregated metrics, DARE_* settings from the environment, clear errors for bad settings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import TEST_CATE_RAW_IDS, TEST_ITEM_RAW_IDS, free_port

DARE = [sys.executable, "-c", "from dare.cli import main; main()"]
CANDS = [{"item_id": TEST_ITEM_RAW_IDS[0], "category_id": TEST_CATE_RAW_IDS[0]}]


def call(base: str, method: str, path: str, body: object | None = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw.decode()


@contextmanager
def serving(args: list[str], env: dict[str, str], timeout_s: float = 60) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    proc = subprocess.Popen(
        [*DARE, "serve", "--port", str(port), *args],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("DARE_")}, **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"dare serve exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if call(base, "GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("dare serve did not become ready")
            time.sleep(0.2)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(predicate, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.2)


def test_embedded_store_persists_and_sighup_reloads(tmp_path: Path, exported_model_dir: Path, twin_model_dir: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(exported_model_dir, models / "dare-a")
    env = {"DARE_DATA_DIR": str(tmp_path / "var"), "DARE_LOG_LEVEL": "warning"}
    with serving(["--models", str(models)], env) as (base, proc):
        event = {**CANDS[0], "timestamp": 1_511_600_000}
        assert call(base, "POST", "/events", {"user_id": "p", "events": [event] * 3})[0] == 200
        status, body = call(base, "POST", "/score", {"user_id": "p", "candidates": CANDS})
        assert status == 200 and body["history_length"] == 3 and body["model"] == "dare-a"
        shutil.copytree(twin_model_dir, models / "twin-b")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(call(base, "GET", "/models")[1]["models"]) == 2)
        assert call(base, "POST", "/score", {"user_id": "p", "candidates": CANDS, "model": "twin-b"})[0] == 200
    assert proc.returncode == 0
    assert (tmp_path / "var" / "redis").is_dir()
    # a new process on the same data dir finds the events again
    with serving(["--models", str(models)], env) as (base, _):
        status, body = call(base, "GET", "/users/p/history")
        assert status == 200 and body["length"] == 3


def test_several_workers_share_store_and_metrics(tmp_path: Path, exported_model_dir: Path, redis_url: str) -> None:
    models = tmp_path / "models"
    shutil.copytree(exported_model_dir, models / "dare-a")
    env = {"DARE_REDIS_URL": redis_url, "DARE_MODELS_DIR": str(models), "DARE_WORKERS": "2", "DARE_LOG_LEVEL": "warning"}
    with serving([], env) as (base, _):
        for _ in range(20):
            assert call(base, "POST", "/score", {"user_id": "w", "candidates": CANDS})[0] == 200
        status, text = call(base, "GET", "/metrics")
        assert status == 200
        counts = [line for line in text.splitlines()
                  if line.startswith('dare_http_request_duration_seconds_count{endpoint="/score"')]  # fmt: skip
        assert len(counts) == 1 and float(counts[0].split()[-1]) == 20.0  # summed over the workers' files

        def worker_pids() -> set[str]:  # one live dare_model_info series per worker that has finished starting
            text = call(base, "GET", "/metrics")[1]
            info = [line for line in text.splitlines() if line.startswith("dare_model_info{")]
            return {line.split('pid="')[1].split('"')[0] for line in info}

        wait_for(lambda: len(worker_pids()) == 2)


def test_bad_settings_are_one_line_errors(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARE_")}
    cases = [
        (["serve", "--models", str(tmp_path / "missing")], {}, "models dir"),
        (["serve", "--models", str(tmp_path)], {"DARE_MAX_CANDIDATES": "0"}, "DARE_MAX_CANDIDATES"),
        (["serve", "--models", str(tmp_path)], {"DARE_DEFAULT_MODEL": "nope"}, "default model 'nope'"),
        (["serve", "--models", str(tmp_path), "--redis", "http://x"], {}, "must start with redis://"),
    ]
    for args, extra, message in cases:
        out = subprocess.run([*DARE, *args], env={**env, **extra}, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def twin_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import export_random_model

    return export_random_model(tmp_path_factory.mktemp("serve-twin"), kind="twin", att_dim=8, repr_dim=8, seed=1)

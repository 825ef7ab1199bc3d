"""`dare demo` end to end on a slice of the real sample: a first run builds, trains, exports, loads, serves and
prints a curl example that works; a second run rebuilds nothing and stops cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import httpx
import psutil
import pytest

from dare.demo import model_name
from service.redis_server import free_port
from service.contract import load_manifest
from tests.shipping.conftest import DEMO_DIMS, ROOT, DemoBuild

STEPS = ["prepare"] + [f"{verb}-{model_name(d)}" for d in DEMO_DIMS for verb in ("train", "export")] + ["load"]


def embedded_redis(build: DemoBuild) -> list[psutil.Process]:
    """The redis-server(s) keeping their data in the demo's folder (in a session of their own: not in our group)."""
    folder = str(build.work / "redis")
    found = []
    for process in psutil.process_iter(["name"]):
        try:
            if "redis" in (process.info["name"] or "") and process.cwd() == folder:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ended between the two calls
        return False


def printed_body(stdout: str) -> dict:
    match = re.search(r"-d '(\{.*\})'", stdout)
    assert match, f"no curl example in the demo's output:\n{stdout[-2000:]}"
    return json.loads(match.group(1))


def test_first_run_builds_everything_and_prints_working_links(demo_build: DemoBuild) -> None:
    out, err = demo_build.first_run.stdout, demo_build.first_run.stderr
    for step in STEPS:
        assert f"{step} done" in err, f"step {step} did not run:\n{err[-3000:]}"
    for dim in DEMO_DIMS:
        manifest = load_manifest(demo_build.models / model_name(dim))
        assert manifest.att_dim == dim and manifest.name == model_name(dim)
    assert "curl -s -X POST http://127.0.0.1:" in out and "/docs" in out and "/metrics" in out
    body = printed_body(out)
    assert len(body["candidates"]) == 5 and body["user_id"]
    assert "p(click)" in err and "first score succeeded" in err


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_rerun_skips_every_step_serves_the_printed_example_and_stops_cleanly(demo_build: DemoBuild, stop: str) -> None:
    """ctrl-c: SIGINT to the whole foreground process group, as a terminal sends it; sigterm: to the demo alone,
    as `docker stop` or `kill` would. Either way the service and the embedded Redis go down with the demo."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARE_")}
    process = subprocess.Popen(demo_build.args(port), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready:
                break
            time.sleep(0.3)
        assert ready, f"the rerun never served (exit code {process.poll()})"
        body = printed_body(demo_build.first_run.stdout)
        answer = httpx.post(f"http://127.0.0.1:{port}/score", json=body, timeout=30)
        assert answer.status_code == 200
        scores = answer.json()["scores"]
        assert len(scores) == 5 and all(0 < s < 1 for s in scores)
        assert answer.json()["history_length"] > 0, "the printed user must have a loaded history"
        children = psutil.Process(process.pid).children(recursive=True)
        embedded = embedded_redis(demo_build)
        assert len(embedded) == 1, f"expected one embedded Redis serving {demo_build.work / 'redis'}, found {embedded}"

        if stop == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            for leftover in embedded_redis(demo_build):  # its own session: outside the process group
                leftover.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "demo stopped" in stderr
    for step in STEPS:
        assert f"{step} up to date, skipped" in stderr, f"step {step} was not skipped on the rerun:\n{stderr[-3000:]}"
    deadline = time.monotonic() + 10
    while (left := [p for p in children + embedded if alive(p)]):
        assert time.monotonic() < deadline, f"{stop} left processes behind: {left}"
        time.sleep(0.2)
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
        raise AssertionError(f"the service still answers after {stop}")
    except httpx.HTTPError:
        pass

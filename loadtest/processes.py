"""Child processes of the measuring commands (`dare loadtest`, `dare soak`, `dare bench`): running `dare` itself,
pinning a child to cores, starting `dare serve` and waiting until it is ready, and reading Locust's CSV statistics."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from dare_common import DareError
from dare.processes import stop_process

REPO_ROOT = Path(__file__).resolve().parent.parent


def dare_args(*args: str) -> list[str]:
    """The command line of `dare <args>` with this interpreter."""
    return [sys.executable, "-m", "dare.cli", *args]


def pinned(cpus: tuple[int, ...], new_session: bool = False) -> Callable[[], None]:
    """A preexec_fn that pins the child to `cpus` (so service and load generator do not fight over one core) and,
    with `new_session`, gives it its own process group (so a service and its uvicorn workers stop together)."""

    def pin() -> None:
        os.sched_setaffinity(0, set(cpus))
        if new_session:
            os.setsid()

    return pin


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def start_dare_serve(
    serve_args: list[str],
    port: int,
    log: Path,
    env: dict[str, str],
    *,
    error: type[DareError],
    ready_within_s: float,
    preexec_fn: Callable[[], None] | None = None,
    group: bool = False,
    cwd: Path = REPO_ROOT,
) -> subprocess.Popen[bytes]:
    """`dare serve <serve_args> --port <port>` (of the checkout `cwd`), output to `log`; returns once GET /readyz
    answers 200. If it exits or is not ready within `ready_within_s`, it is stopped (its whole process group with
    `group`) and `error` raised."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as fh:
        process = subprocess.Popen(dare_args("serve", *serve_args, "--port", str(port)), cwd=cwd, env=env,
                                   stdout=fh, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)  # fmt: skip
    deadline = time.monotonic() + ready_within_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise error(f"`dare serve` exited with code {process.returncode}; see {log}")
        try:
            if http_status(f"http://127.0.0.1:{port}/readyz") == 200:
                return process
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    stop_process(process, group=group)
    raise error(f"`dare serve` was not ready within {ready_within_s:.0f} s; see {log}")


def read_locust_stats(prefix: Path, name: str, error: type[DareError], max_reasons: int) -> tuple[int, int, float, list[str]]:
    """(requests, failures, mean requests/s, up to `max_reasons` failure reasons) of the row `name` of Locust's CSV
    statistics written with `--csv <prefix>` ("Aggregated" for all requests, or one request name)."""
    stats_file = Path(f"{prefix}_stats.csv")
    if not stats_file.is_file():
        raise error(f"Locust wrote no statistics ({stats_file} is missing); see {prefix}.log")
    with stats_file.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["Name"] == name]
    if not rows:
        what = "requests were" if name == "Aggregated" else f"{name} requests were"
        raise error(f"{stats_file}: no {what} made; see {prefix}.log")
    reasons: list[str] = []
    failures_file = Path(f"{prefix}_failures.csv")
    if failures_file.is_file():
        with failures_file.open(newline="") as fh:
            reasons = [f"{r['Occurrences']}x {r['Error']}" for r in csv.DictReader(fh)][:max_reasons]
    row = rows[0]
    return int(row["Request Count"]), int(row["Failure Count"]), float(row["Requests/s"]), reasons

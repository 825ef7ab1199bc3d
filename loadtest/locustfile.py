"""Locust scenario for the scoring service: real users, real candidate items, every answer validated.

Payloads and the answer check live in loadtest/scenario.py (no Locust import there, so it is unit-tested); Locust
puts this file's folder on sys.path, so the pair runs from the repository and as a folder mounted into the official
Locust image (docker-compose.yml, profile `loadtest`). `dare loadtest` (loadtest/compare.py) runs it headless.

Environment variables (all optional):
    DARE_LOADTEST_DATA        Taobao-format CSV(.gz) that was loaded into the service's Redis; users and candidate
                              items are drawn from it (default: the bundled sample)
    DARE_LOADTEST_MODEL       model to score with; empty = the service's default model
    DARE_LOADTEST_CANDIDATES  candidates per request (default 100)
    DARE_LOADTEST_MAX_USERS   at most this many users are drawn from the data (default 2000)
    DARE_LOADTEST_RATE        requests/s per simulated user; 0 = each user sends back to back (default 0)
    DARE_LOADTEST_SHAPE       "ramp": a rising load from 1 to DARE_LOADTEST_RAMP_USERS users over
                              DARE_LOADTEST_RAMP_SECONDS seconds, then stop (default: fixed load from -u/-r/-t)
    DARE_LOADTEST_RAW         write every successful request's completion time (Unix s) and latency (ms), one pair
                              a line, to this file at the end, so the comparison can compute exact percentiles and
                              throughput per second (Locust's CSV rounds percentiles and smooths the rate)
    DARE_LOADTEST_SEED        random seed for the payloads (default 0)
    DARE_LOADTEST_TOKEN       the service's DARE_API_TOKEN, sent as `Authorization: Bearer` (default: none)
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import gevent

# In the Locust image, dare_common/ is mounted beside this folder (docker-compose.yml); from the repository it is
# installed. Either way scenario.py imports it.
sys.path.append(str(Path(__file__).resolve().parent.parent))

from locust import FastHttpUser, LoadTestShape, constant, constant_throughput, events, task
from scenario import SCORE_PATH, Payloads, ScenarioSettings, validate_score_body

SETTINGS = ScenarioSettings.from_env()
PAYLOADS = Payloads.from_csv(SETTINGS.data, SETTINGS.max_users, SETTINGS.seed)
_completed: list[tuple[float, float]] = []  # (Unix time the answer arrived, latency ms)


class ScoringUser(FastHttpUser):
    """An ad server: for a random real user, score a few hundred real candidate ads."""

    wait_time = constant_throughput(SETTINGS.rate) if SETTINGS.rate > 0 else constant(0)

    def on_start(self) -> None:
        self.rng = random.Random(f"{SETTINGS.seed}-{id(self)}")

    @task
    def score(self) -> None:
        payload = PAYLOADS.request(self.rng, SETTINGS.candidates, SETTINGS.model)
        with self.client.post(SCORE_PATH, json=payload, name=SCORE_PATH, headers=SETTINGS.headers,
                              catch_response=True) as response:  # fmt: skip
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            try:
                body = response.json()
            except ValueError:
                response.failure("answer is not JSON")
                return
            problem = validate_score_body(body, SETTINGS.candidates, SETTINGS.model)
            if problem:
                response.failure(problem)


if SETTINGS.shape == "ramp":

    class RampShape(LoadTestShape):
        """A rising load: users grow linearly from 1 to ramp_users over ramp_seconds, then the test stops."""

        def tick(self) -> tuple[int, float] | None:
            elapsed = self.get_run_time()
            if elapsed >= SETTINGS.ramp_seconds:
                return None
            users = 1 + int((SETTINGS.ramp_users - 1) * elapsed / SETTINGS.ramp_seconds)
            return users, float(SETTINGS.ramp_users)


# Exit code of a run stopped because the data is not loaded (Locust itself uses 1 for "some requests failed").
DATA_NOT_LOADED_EXIT_CODE = 3


def missing_history(host: str) -> str | None:
    """Why the service cannot serve this data file's users (not loaded, unreachable), or None when it can."""
    for user in PAYLOADS.users[:5]:
        url = f"{host}/users/{urllib.parse.quote(user, safe='')}/history?limit=1"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=SETTINGS.headers), timeout=10) as answer:
                length = json.loads(answer.read()).get("length", 0)
        except (urllib.error.URLError, ValueError, OSError) as exc:
            return f"cannot read {url}: {exc}"
        if not length:
            return (f"user {user} of {SETTINGS.data} has no stored history at {host}: load the data first "
                    f"(dare load --input {SETTINGS.data} --redis URL)")  # fmt: skip
    return None


@events.test_start.add_listener
def _check_data_is_loaded(environment, **_kwargs) -> None:
    """Stop at once (instead of measuring cold starts) when the data file's users are not in the service's store."""
    host = (environment.host or "").rstrip("/")
    problem = missing_history(host) if host else None
    if problem:
        logging.getLogger("dare.loadtest").error(problem)
        environment.process_exit_code = DATA_NOT_LOADED_EXIT_CODE
        gevent.spawn(environment.runner.quit)  # not from inside the event itself: the runner is still starting


@events.request.add_listener
def _record_latency(name, response_time, exception, **_kwargs) -> None:
    if name == SCORE_PATH and exception is None:
        _completed.append((time.time(), float(response_time)))


@events.quitting.add_listener
def _write_latencies(**_kwargs) -> None:
    if SETTINGS.raw:
        Path(SETTINGS.raw).parent.mkdir(parents=True, exist_ok=True)
        Path(SETTINGS.raw).write_text("".join(f"{t:.4f} {ms:.4f}\n" for t, ms in _completed), encoding="utf-8")

"""Locust scenario for the scoring service: real users, real candidate items, every answer validated.

Self-contained on purpose (standard library + locust only) so that the official Locust image can run it as a
mounted file (docker-compose.yml, profile `loadtest`). `dare loadtest` (loadtest/compare.py) runs it headless.

Environment variables (all optional):
    DARE_LOADTEST_DATA        Taobao-format CSV(.gz) that was loaded into the service's Redis; users and candidate
                              items are drawn from it (default: the bundled sample)
    DARE_LOADTEST_MODEL       model to score with; empty = the service's default model
    DARE_LOADTEST_CANDIDATES  candidates per request (default 100)
    DARE_LOADTEST_MAX_USERS   at most this many users are drawn from the data (default 2000)
    DARE_LOADTEST_RATE        requests/s per simulated user; 0 = each user sends back to back (default 0)
    DARE_LOADTEST_SHAPE       "ramp": a rising load from 1 to DARE_LOADTEST_RAMP_USERS users over
                              DARE_LOADTEST_RAMP_SECONDS seconds, then stop (default: fixed load from -u/-r/-t)
    DARE_LOADTEST_RAW         write every successful request's latency (ms, one a line) to this file at the end,
                              so the comparison can compute exact percentiles (Locust's CSV rounds them)
    DARE_LOADTEST_SEED        random seed for the payloads (default 0)
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, constant, constant_throughput, events, task
from locust.exception import StopUser

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "taobao-sample" / "UserBehavior.csv.gz"
SCORE_PATH = "/score"


@dataclass(frozen=True)
class Payloads:
    """What requests are built from: real user ids and real (item, category) pairs, drawn from one data file."""

    users: list[str]
    items: list[tuple[int, int]]  # one entry per event, so popular items are drawn more often, as in real traffic

    @classmethod
    def from_csv(cls, path: Path, max_users: int, seed: int) -> Payloads:
        opener = gzip.open if path.suffix == ".gz" else open
        users: dict[str, None] = {}
        items: list[tuple[int, int]] = []
        with opener(path, "rt", encoding="utf-8", newline="") as fh:
            for row in csv.reader(fh):
                # The bundled sample ends in a truncated line (see its SOURCE.md); skip anything malformed.
                if len(row) != 5 or not row[1].isdigit() or not row[2].isdigit():
                    continue
                users.setdefault(row[0], None)
                items.append((int(row[1]), int(row[2])))
        if not users or not items:
            raise ValueError(f"{path}: no complete user_id,item_id,category_id,behavior_type,timestamp rows")
        rng = random.Random(seed)
        chosen = list(users)
        rng.shuffle(chosen)
        return cls(users=chosen[:max_users], items=items)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


DATA = Path(os.environ.get("DARE_LOADTEST_DATA") or DEFAULT_DATA)
MODEL = os.environ.get("DARE_LOADTEST_MODEL", "")
CANDIDATES = _env_int("DARE_LOADTEST_CANDIDATES", 100)
RATE = _env_float("DARE_LOADTEST_RATE", 0.0)
SEED = _env_int("DARE_LOADTEST_SEED", 0)
PAYLOADS = Payloads.from_csv(DATA, _env_int("DARE_LOADTEST_MAX_USERS", 2000), SEED)
_latencies_ms: list[float] = []


def validate_score_body(body: object, n_candidates: int, model: str) -> str | None:
    """Why a /score answer is wrong, or None when it is right: one probability in (0, 1) per candidate."""
    if not isinstance(body, dict):
        return "body is not a JSON object"
    scores = body.get("scores")
    if not isinstance(scores, list):
        return f"no 'scores' list in the answer (keys: {sorted(body)})"
    if len(scores) != n_candidates:
        return f"{len(scores)} scores for {n_candidates} candidates"
    bad = [s for s in scores if not isinstance(s, (int, float)) or not (0.0 < s < 1.0) or math.isnan(s)]
    if bad:
        return f"{len(bad)} scores outside (0, 1), e.g. {bad[0]!r}"
    if model and body.get("model") != model:
        return f"asked for model {model!r}, answered by {body.get('model')!r}"
    return None


class ScoringUser(FastHttpUser):
    """An ad server: for a random real user, score a few hundred real candidate ads."""

    wait_time = constant_throughput(RATE) if RATE > 0 else constant(0)

    def on_start(self) -> None:
        self.rng = random.Random(f"{SEED}-{id(self)}")

    @task
    def score(self) -> None:
        user = self.rng.choice(PAYLOADS.users)
        candidates = [{"item_id": i, "category_id": c} for i, c in self.rng.choices(PAYLOADS.items, k=CANDIDATES)]
        payload: dict[str, object] = {"user_id": user, "candidates": candidates}
        if MODEL:
            payload["model"] = MODEL
        with self.client.post(SCORE_PATH, json=payload, name=SCORE_PATH, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            try:
                body = response.json()
            except ValueError:
                response.failure("answer is not JSON")
                return
            problem = validate_score_body(body, CANDIDATES, MODEL)
            if problem:
                response.failure(problem)


if os.environ.get("DARE_LOADTEST_SHAPE", "") == "ramp":

    class RampShape(LoadTestShape):
        """A rising load: users grow linearly from 1 to RAMP_USERS over RAMP_SECONDS, then the test stops."""

        ramp_users = _env_int("DARE_LOADTEST_RAMP_USERS", 32)
        ramp_seconds = _env_float("DARE_LOADTEST_RAMP_SECONDS", 30.0)

        def tick(self) -> tuple[int, float] | None:
            elapsed = self.get_run_time()
            if elapsed >= self.ramp_seconds:
                return None
            users = 1 + int((self.ramp_users - 1) * elapsed / self.ramp_seconds)
            return users, float(self.ramp_users)


@events.test_start.add_listener
def _check_data_is_loaded(environment, **_kwargs) -> None:
    """Fail fast (instead of measuring cold starts) when the users of the data file are not in the service's store."""
    host = (environment.host or "").rstrip("/")
    if not host:
        return
    probe = PAYLOADS.users[: min(5, len(PAYLOADS.users))]
    for user in probe:
        url = f"{host}/users/{urllib.request.quote(user, safe='')}/history?limit=1"
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                body = json.loads(answer.read())
        except (urllib.error.URLError, ValueError, OSError) as exc:
            raise StopUser(f"cannot read {url}: {exc}") from None
        if not body.get("length"):
            environment.runner.quit()
            raise RuntimeError(
                f"user {user} of {DATA} has no stored history at {host}: load the data first "
                f"(dare load --input {DATA} --redis URL)"
            )


@events.request.add_listener
def _record_latency(name, response_time, exception, **_kwargs) -> None:
    if name == SCORE_PATH and exception is None:
        _latencies_ms.append(float(response_time))


@events.quitting.add_listener
def _write_latencies(**_kwargs) -> None:
    path = os.environ.get("DARE_LOADTEST_RAW", "")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(f"{ms:.4f}\n" for ms in _latencies_ms), encoding="utf-8")

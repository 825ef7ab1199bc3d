"""Small POST /score requests stay on the event loop (DARE_INLINE_MAX_PAIRS): the store read through redis.asyncio,
the graphs inline. Same answers as through a worker thread; larger requests and busy processes still use threads;
a stalled store holds up the requests that wait on it, never the loop (GET /healthz answers meanwhile)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np

from service.engine import ScoringEngine
from service.store import SequenceStore
from tests.service.test_scoring import random_candidates, random_history


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def spy_on_engine(monkeypatch) -> list[bool]:  # type: ignore[no-untyped-def]
    """Record, for every ScoringEngine.score call, whether it ran on the event loop's thread."""
    calls: list[bool] = []
    original = ScoringEngine.score

    def score(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(on_event_loop())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ScoringEngine, "score", score)
    return calls


def seed(redis_url: str, users: dict[str, int]) -> None:
    store = SequenceStore.from_url(redis_url)
    rng = np.random.default_rng(7)
    for user, n in users.items():
        store.replace(user, random_history(rng, n))
    store.close()


def test_small_requests_stay_on_the_loop_large_ones_use_a_thread_same_answers(
    make_client, redis_url: str, models_dir: Path, monkeypatch
) -> None:
    seed(redis_url, {"small": 200, "large": 2_000})
    calls = spy_on_engine(monkeypatch)
    candidates = random_candidates(np.random.default_rng(1), 40)
    answers = {}
    for inline in (50_000, 0):
        with make_client(models_dir=models_dir, inline_max_pairs=inline) as client:
            for user in ("small", "large", "nobody"):
                r = client.post("/score", json={"user_id": user, "candidates": candidates, "explain": True})
                assert r.status_code == 200, r.text
                answers[(inline, user)] = r.json()
    # 200 x 40 and 0 x 40 are within 50,000 pairs: on the loop; 2,000 x 40 is not; with 0, always a thread.
    assert calls == [True, False, True, False, False, False]
    for user in ("small", "large", "nobody"):
        a, b = answers[(50_000, user)], answers[(0, user)]
        assert a["scores"] == b["scores"] and a["explain"] == b["explain"] and a["history_length"] == b["history_length"]
        assert a["timings_ms"]["store_fetch"] > 0


def test_stalled_store_holds_up_its_requests_not_the_loop(make_client, make_redis_server, models_dir: Path) -> None:
    server = make_redis_server("--enable-debug-command", "yes")
    seed(server.url, {"small": 100})
    candidates = random_candidates(np.random.default_rng(2), 10)
    with make_client(models_dir=models_dir, redis_url=server.url, request_timeout_s=1.5, redis_socket_timeout_s=5.0) as client:
        assert client.post("/score", json={"user_id": "small", "candidates": candidates}).status_code == 200
        sleeper = server.stall(2.5)
        waiting: dict[str, object] = {}

        def blocked_score() -> None:
            t0 = time.monotonic()
            r = client.post("/score", json={"user_id": "small", "candidates": candidates})
            waiting.update(status=r.status_code, error=r.json().get("error"), seconds=time.monotonic() - t0)

        scorer = threading.Thread(target=blocked_score)
        scorer.start()
        time.sleep(0.3)  # the score request is now waiting on the stalled store
        t0 = time.monotonic()
        assert client.get("/healthz").status_code == 200
        healthz_seconds = time.monotonic() - t0
        scorer.join()
        sleeper.join()
        assert healthz_seconds < 0.5, healthz_seconds  # the loop was free while the score request waited
        assert waiting["status"] == 503 and waiting["error"] == "request_timeout", waiting
        assert 1.4 <= float(waiting["seconds"]) < 2.5  # type: ignore[arg-type]
        time.sleep(0.2)
        r = client.post("/score", json={"user_id": "small", "candidates": candidates})  # the store is back
        assert r.status_code == 200 and r.json()["history_length"] == 100

"""`BlockingPool` and its `run`: at most N calls at once, the wait in line counted against the timeout, a call
still waiting at its timeout dropped, a running one abandoned (and counted until it ends), the caller's context
carried into the thread."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from service.api.concurrency import BlockingPool
from service.errors import RequestTimeoutError

REQUEST = contextvars.ContextVar("REQUEST", default="none")


def test_at_most_n_calls_run_at_once_and_busy_counts_them() -> None:
    pool = BlockingPool(2, 5.0)
    running, peak, lock = [0], [0], threading.Lock()

    def call() -> str:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return REQUEST.get()

    async def main() -> tuple[list[str], int, int]:
        REQUEST.set("req-7")
        futures = [pool.submit(call) for _ in range(6)]
        busy_during = pool.busy
        results = await asyncio.gather(*futures)
        await asyncio.sleep(0.01)
        return list(results), busy_during, pool.busy

    try:
        results, busy_during, busy_after = asyncio.run(main())
        assert results == ["req-7"] * 6  # the caller's context, in the worker thread
        assert peak[0] == 2 and busy_during == 6 and busy_after == 0
    finally:
        pool.shutdown()


def test_timeouts_drop_a_waiting_call_and_abandon_a_running_one() -> None:
    pool = BlockingPool(1, 0.2)
    release, ran = threading.Event(), []

    def slow() -> None:
        release.wait(5)
        ran.append("slow")

    def queued() -> None:
        ran.append("queued")

    async def main() -> tuple[int, int]:
        with pytest.raises(RequestTimeoutError, match="scoring did not finish"):
            await asyncio.gather(pool.run(slow, what="scoring"), pool.run(queued, what="scoring"))
        await asyncio.sleep(0.05)
        busy_abandoned = pool.busy  # the running call, abandoned, still runs; the waiting one is gone
        release.set()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if pool.busy == 0:
                break
        return busy_abandoned, pool.busy

    try:
        busy_abandoned, busy_after = asyncio.run(main())
        assert busy_abandoned == 1 and busy_after == 0
        assert ran == ["slow"]  # the waiting call never ran
    finally:
        pool.shutdown()


def test_errors_in_the_thread_reach_the_caller() -> None:
    pool = BlockingPool(1, 5.0)

    def broken() -> None:
        raise ValueError("in the thread")

    async def main() -> None:
        with pytest.raises(ValueError, match="in the thread"):
            await pool.run(broken, what="x")
        assert pool.busy == 0

    try:
        asyncio.run(main())
    finally:
        pool.shutdown()


def test_one_key_holds_at_most_half_of_the_workers_even_when_its_calls_are_abandoned() -> None:
    """A user whose calls hang (a stalled store read) times out, and its abandoned calls keep their threads until
    they end; they hold at most half of the workers, so another user's call runs at once. Once they end, the key's
    share is free again and no bookkeeping is left behind."""
    pool = BlockingPool(4, 0.3)
    release = threading.Event()
    started: list[str] = []

    def hang() -> None:
        started.append("slow")
        release.wait(5)

    async def main() -> tuple[list[object], float, int]:
        slow = [asyncio.ensure_future(pool.run(hang, what="read", key="slow")) for _ in range(4)]
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        other = await pool.run(lambda: "fine", what="read", key="other")
        other_s = time.perf_counter() - t0
        outcomes = await asyncio.gather(*slow, return_exceptions=True)
        release.set()
        await asyncio.sleep(0.1)  # the abandoned calls end and hand their slots back on the loop
        again = await pool.run(lambda: "slow again", what="read", key="slow")
        return [*outcomes, other, again], other_s, len(pool._gates)

    try:
        outcomes, other_s, gates_left = asyncio.run(main())
        assert len(started) == 2  # 4 workers: the key's share is 2; the other two calls waited and timed out
        assert all(isinstance(o, RequestTimeoutError) for o in outcomes[:4])
        assert outcomes[4:] == ["fine", "slow again"]
        assert other_s < 0.2  # served by the free half, not after the slow user's timeout
        assert gates_left == 0
    finally:
        release.set()
        pool.shutdown()

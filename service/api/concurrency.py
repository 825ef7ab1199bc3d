"""Run blocking work (the store read, onnxruntime) in worker threads, bounded in number, in time and per user."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import onnxruntime as ort

from service.errors import RequestTimeoutError

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from service.metrics import ServiceMetrics

T = TypeVar("T")


class _Gate:
    """One key's share of the workers: `slots` calls at a time; `holders` counts the requests holding or waiting."""

    def __init__(self, slots: int) -> None:
        self.slots = asyncio.Semaphore(slots)
        self.holders = 0


class BlockingPool:
    """DARE_SCORING_THREADS worker threads for the process's blocking calls; calls beyond that wait in line.

    A plain ThreadPoolExecutor handed to the event loop (`run_in_executor`'s own mechanism), not anyio's
    `to_thread`: its limiter, cancel scopes and worker hand-off cost 0.55 ms per call on the 2-core machine against
    0.31 ms for this (docs/performance.md). `busy` counts calls submitted and not finished, queued or running,
    including one abandoned after its timeout that is still running.

    Calls that name a `key` (POST /score: the user) hold at most `per_key` threads at once (half of them, at least
    one), counting abandoned calls until they end: a user whose store reads stall keeps half of the workers busy at
    worst, and the other users are served by the rest.

    With `metrics`, each call's wait from `run()` to its start in a worker thread (the key's share included) is
    observed in dare_queue_wait_seconds{operation=what}; a call dropped by the timeout before it started observes
    the time it waited."""

    def __init__(self, threads: int, timeout_s: float, metrics: ServiceMetrics | None = None) -> None:
        self.threads = threads
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.per_key = max(1, threads // 2)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dare-blocking")
        self._lock = threading.Lock()
        self._busy = 0
        self._gates: dict[str, _Gate] = {}  # touched on the event loop only

    @property
    def busy(self) -> int:
        return self._busy

    def submit(self, func: Callable[[], T], on_done: Callable[[], None] | None = None) -> asyncio.Future[T]:
        """`func()` in a worker thread, in a copy of the caller's context; cancelling the returned future removes a
        call that has not started yet. `on_done()` runs when the call ends (in the worker or the canceller)."""
        with self._lock:
            self._busy += 1

        def done(_: Any) -> None:
            with self._lock:
                self._busy -= 1
            if on_done is not None:
                on_done()

        try:
            future: Future[T] = self._executor.submit(contextvars.copy_context().run, func)
        except BaseException:
            done(None)
            raise
        future.add_done_callback(done)
        return asyncio.wrap_future(future)

    async def run(self, func: Callable[[], T], *, what: str, key: str | None = None, run_options: ort.RunOptions | None = None) -> T:
        """`func()` in a worker thread, within `key`'s share; RequestTimeoutError after DARE_REQUEST_TIMEOUT_S.

        The waits for the key's share and for a free worker count against the timeout, so an overloaded process
        sheds load with 503s instead of queueing without bound. On timeout a call still waiting is dropped, and a
        running one is abandoned and, if it is inside onnxruntime, told to stop through `run_options.terminate`."""
        arrived = time.perf_counter()
        observer: dict[str, str] = {}  # who observes the wait: the worker that starts the call, or the timeout
        series = self.metrics.queue_wait_series(what) if self.metrics is not None else None
        job = func if series is None else _observing_wait(func, series, arrived, observer)
        try:
            async with asyncio.timeout(self.timeout_s):
                if key is None:
                    return await self.submit(job)
                gate = self._gates.get(key) or self._gates.setdefault(key, _Gate(self.per_key))
                gate.holders += 1
                try:
                    await gate.slots.acquire()
                except BaseException:
                    self._leave(key, gate, acquired=False)
                    raise
                loop = asyncio.get_running_loop()
                return await self.submit(job, on_done=lambda: _call_soon(loop, self._leave, key, gate, True))
        except TimeoutError:
            if series is not None and observer.setdefault("by", "timeout") == "timeout":
                series.observe(time.perf_counter() - arrived)  # never started: waited until the timeout
            if run_options is not None:
                run_options.terminate = True
            raise RequestTimeoutError(f"{what} did not finish within DARE_REQUEST_TIMEOUT_S ({self.timeout_s:g} s)") from None

    def _leave(self, key: str, gate: _Gate, acquired: bool) -> None:
        if acquired:
            gate.slots.release()
        gate.holders -= 1
        if gate.holders == 0 and self._gates.get(key) is gate:
            del self._gates[key]

    def shutdown(self) -> None:
        """No new calls; running ones finish in their threads (the process does not wait for them here)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _observing_wait(func: Callable[[], T], series: Histogram, arrived: float, observer: dict[str, str]) -> Callable[[], T]:
    """`func` that first observes how long it waited since `arrived`, unless the timeout observed it already."""

    def job() -> T:  # runs in the worker thread
        if observer.setdefault("by", "worker") == "worker":  # dict.setdefault is atomic: one side wins
            series.observe(time.perf_counter() - arrived)
        return func()

    return job


def _call_soon(loop: asyncio.AbstractEventLoop, func: Callable[..., None], *args: Any) -> None:
    """`func(*args)` on `loop` from any thread; nothing once the loop is closed (the process is stopping)."""
    try:
        loop.call_soon_threadsafe(func, *args)
    except RuntimeError:
        pass

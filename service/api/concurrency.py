"""Run blocking work (Redis calls, onnxruntime) in worker threads, bounded in number and in time."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import onnxruntime as ort

from service.errors import RequestTimeoutError

T = TypeVar("T")


class BlockingPool:
    """DARE_SCORING_THREADS worker threads for the process's blocking calls; calls beyond that wait in line.

    A plain ThreadPoolExecutor handed to the event loop (`run_in_executor`'s own mechanism), not anyio's
    `to_thread`: its limiter, cancel scopes and worker hand-off cost 0.55 ms per call on the 2-core machine against
    0.31 ms for this (docs/performance.md). `busy` counts calls submitted and not finished, queued or running,
    including one abandoned after its timeout that is still running."""

    def __init__(self, threads: int, timeout_s: float) -> None:
        self.threads = threads
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dare-blocking")
        self._lock = threading.Lock()
        self._busy = 0

    @property
    def busy(self) -> int:
        return self._busy

    def submit(self, func: Callable[[], T]) -> asyncio.Future[T]:
        """`func()` in a worker thread, in a copy of the caller's context; cancelling the returned future removes a
        call that has not started yet."""
        with self._lock:
            self._busy += 1
        try:
            future: Future[T] = self._executor.submit(contextvars.copy_context().run, func)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)  # in the worker thread, or in the canceller's on a cancel
        return asyncio.wrap_future(future)

    def _done(self, future: Any) -> None:
        with self._lock:
            self._busy -= 1

    async def run(self, func: Callable[[], T], *, what: str, run_options: ort.RunOptions | None = None,
                  timeout_s: float | None = None) -> T:  # fmt: skip
        """`func()` in a worker thread; RequestTimeoutError after DARE_REQUEST_TIMEOUT_S (or `timeout_s`, what is
        left of it when part of the request's time is spent).

        The wait for a free worker counts against the timeout, so an overloaded process sheds load with 503s
        instead of queueing without bound. On timeout a call still waiting is dropped, and a running one is
        abandoned and, if it is inside onnxruntime, told to stop through `run_options.terminate`."""
        try:
            async with asyncio.timeout(self.timeout_s if timeout_s is None else max(timeout_s, 0.0)):
                return await self.submit(func)
        except TimeoutError:
            if run_options is not None:
                run_options.terminate = True
            raise RequestTimeoutError(f"{what} did not finish within DARE_REQUEST_TIMEOUT_S ({self.timeout_s:g} s)") from None

    def shutdown(self) -> None:
        """No new calls; running ones finish in their threads (the process does not wait for them here)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

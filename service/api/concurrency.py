"""Run blocking work (Redis calls, onnxruntime) in worker threads, bounded in number and in time."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import onnxruntime as ort

from service.errors import RequestTimeoutError

if TYPE_CHECKING:
    from service.api.deps import Services

T = TypeVar("T")


class BlockingPool:
    """DARE_SCORING_THREADS worker threads for the process's blocking calls; calls beyond that wait in line.

    A plain ThreadPoolExecutor handed to the event loop (`run_in_executor`'s own mechanism), not anyio's
    `to_thread`: its limiter, cancel scopes and worker hand-off cost 0.55 ms per call on the 2-core machine against
    0.31 ms for this, on every W2/W3 POST /score (docs/performance.md, round 9). `busy` counts calls submitted and
    not finished, queued or running, including one abandoned after its timeout that is still running."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
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

    def shutdown(self) -> None:
        """No new calls; running ones finish in their threads (the process does not wait for them here)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


async def run_blocking(
    services: Services,
    func: Callable[[], T],
    *,
    what: str,
    run_options: ort.RunOptions | None = None,
    timeout: float | None = None,
) -> T:
    """`func()` in a worker thread of the process's pool; RequestTimeoutError after `timeout` seconds (by default
    DARE_REQUEST_TIMEOUT_S; less when part of the request's time is already spent).

    The wait for a free worker counts against the timeout, so an overloaded process sheds load with 503s
    instead of queueing without bound. On timeout a call still waiting is dropped, and a running one is abandoned
    and, if it is inside onnxruntime, told to stop through `run_options.terminate`.
    """
    timeout = services.settings.request_timeout_s if timeout is None else max(timeout, 0.0)
    try:
        async with asyncio.timeout(timeout):
            return await services.blocking.submit(func)
    except TimeoutError:
        if run_options is not None:
            run_options.terminate = True
        raise RequestTimeoutError(
            f"{what} did not finish within DARE_REQUEST_TIMEOUT_S ({services.settings.request_timeout_s:g} s)"
        ) from None

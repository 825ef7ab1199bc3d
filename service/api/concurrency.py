"""Run blocking work (Redis calls, onnxruntime) in worker threads, bounded in number and in time."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
import onnxruntime as ort

from service.api.deps import Services
from service.errors import RequestTimeoutError

T = TypeVar("T")


async def run_blocking(
    services: Services,
    func: Callable[[], T],
    *,
    what: str,
    run_options: ort.RunOptions | None = None,
    timeout: float | None = None,
) -> T:
    """`func()` in a worker thread under the per-process limiter; RequestTimeoutError after `timeout` seconds (by
    default DARE_REQUEST_TIMEOUT_S; less when part of the request's time is already spent).

    The wait for a free worker counts against the timeout, so an overloaded process sheds load with 503s
    instead of queueing without bound. On timeout the thread is abandoned and, if it is inside onnxruntime,
    told to stop through `run_options.terminate`.
    """
    timeout = services.settings.request_timeout_s if timeout is None else max(timeout, 0.0)
    try:
        with anyio.fail_after(timeout):
            return await anyio.to_thread.run_sync(func, limiter=services.limiter, abandon_on_cancel=True)
    except TimeoutError:
        if run_options is not None:
            run_options.terminate = True
        raise RequestTimeoutError(
            f"{what} did not finish within DARE_REQUEST_TIMEOUT_S ({services.settings.request_timeout_s:g} s)"
        ) from None

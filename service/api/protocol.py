"""`dare serve`'s HTTP protocol: uvicorn's httptools protocol, with POST /score answered without the ASGI round.

uvicorn runs every request as an ASGI task: a task, a scope, `receive` and two `send` calls with their checks, then
the app's own dispatch. On the 2-core machines that round and the extra turn of the event loop cost about as much
as the whole service's code around the engine for a small request (docs/performance.md, round 9). This protocol
keeps all of uvicorn's HTTP handling (httptools parsing, keep-alive, pipelining, flow control, limits, graceful
shutdown, the access log) and changes one thing: when a request that `ScoreFastPath.takes` is complete, it is
handled right where httptools reports it (`on_message_complete`): the body is parsed, the store read is sent and
the body validated while Redis works on it, then one task waits for the read, scores and writes the answer.

Everything else (other endpoints, a POST /score the fast path does not take or hands over, a pipelined request
behind another, `Expect: 100-continue`, HTTP/1.0, a server over --limit-concurrency) runs as uvicorn runs it,
through the ASGI app. With DARE_SCORE_FAST_PATH=false this is plain uvicorn.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from service.api.routes.scoring import Prepared, ScoreFastPath

log = logging.getLogger("service")


class ScoreHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dare_app = _find_dare_app(self.app)
        self._waiting: RequestResponseCycle | None = None  # a fast-path request whose body is still arriving

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # Called by on_headers_complete for a request that is not queued behind another (and when a queued one's
        # turn comes: that one always goes to ASGI). `app` is uvicorn's 503 app when over --limit-concurrency.
        fast = self._fast()
        if (
            fast is not None
            and app is self.app
            and cycle is self.cycle
            and cycle.more_body  # the body is still to come (a queued request's may be complete: ASGI)
            and not cycle.waiting_for_100_continue
            and cycle.keep_alive  # HTTP/1.1 without Connection: close
            and fast.takes(cycle.scope)
        ):
            self._waiting = cycle
            return
        super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)  # which pauses reading past 64 kB of unread body; an ASGI `receive` would resume it
        if self._waiting is not None:
            self.flow.resume_reading()  # the fast path reads the whole body (at most DARE_MAX_BODY_BYTES: `takes`)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        cycle, self._waiting = self._waiting, None
        if cycle is not None and cycle is self.cycle and not cycle.disconnected:
            self._handle(cycle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting = None
        super().connection_lost(exc)

    def _fast(self) -> ScoreFastPath | None:
        return self._dare_app.score_fast_path if self._dare_app is not None else None

    def _handle(self, cycle: RequestResponseCycle) -> None:
        """The whole body is here: prepare it now (the store read goes out before the validation), then one task
        answers; a request the fast path does not take goes to the ASGI app with its body, as uvicorn would."""
        started = time.perf_counter()
        fast = self._fast()
        assert fast is not None and self._dare_app is not None
        services = getattr(self._dare_app.state, "services", None)
        prepared: Prepared | None = None
        if services is not None and fast.authorized(cycle.scope, services):
            try:
                prepared = fast.prepare(services, cycle.body)
            except Exception:
                prepared = None  # the ASGI path meets the same error and answers (and logs) it
        if prepared is None:
            super()._start_asgi_task(cycle, self.app)  # cycle.body is unread: the app receives it
            return
        cycle.body = bytearray()
        task = self.loop.create_task(self._answer(cycle, fast, services, prepared, started))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)  # graceful shutdown waits for it

    async def _answer(self, cycle: RequestResponseCycle, fast: ScoreFastPath, services: Any, prepared: Prepared,
                      started: float) -> None:  # fmt: skip
        status, headers, payload, model_name = await fast.answer(services, prepared)
        try:
            if cycle.flow.write_paused and not cycle.disconnected:
                await cycle.flow.drain()
            if not cycle.disconnected:
                self._write(cycle, status, headers, payload)
        except Exception:
            log.exception("could not write the answer to POST /score")
            cycle.transport.close()
        finally:
            fast.observe(model_name, status, started)

    @staticmethod
    def _write(cycle: RequestResponseCycle, status: int, headers: list[tuple[bytes, bytes]], payload: bytes) -> None:
        """What uvicorn's two `send`s do for a complete response with a Content-Length, in one write."""
        cycle.response_started = True
        if cycle.access_log:
            cycle.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(cycle.scope), "POST",
                                     get_path_with_query_string(cycle.scope), "1.1", status)  # fmt: skip
        content = [STATUS_LINE[status]]
        for name, value in (*cycle.default_headers, *headers):
            content.extend((name, b": ", value, b"\r\n"))
        if not cycle.keep_alive:  # the server's shutdown began while this request ran
            content.append(b"connection: close\r\n")
        content.extend((b"\r\n", payload))
        cycle.transport.write(b"".join(content))
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()  # the keep-alive timer, or the next pipelined request


def _find_dare_app(app: Any) -> Any:
    """The DareApp under uvicorn's own middleware (proxy headers, message logger), or None."""
    from service.main import DareApp

    for _ in range(8):
        if isinstance(app, DareApp):
            return app
        app = getattr(app, "app", None)
    return None

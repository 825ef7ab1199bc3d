"""The request id: one per HTTP request, from the client or generated, echoed and put on every log line.

A client names a request with the `X-Request-ID` header or, on POST /score and POST /events, the `request_id` body
field (which takes precedence: a proxy may set the header on its own); without either the service makes one
(`uuid4().hex`). `RequestIdMiddleware` (pure ASGI) reads the header, refuses a malformed one (422), keeps the id in
`scope["state"]["request_id"]` and in the `request_id_var` context variable, and adds `X-Request-ID` to the answer;
the error bodies and the success bodies of /score, /events and /users/.../history carry it as `request_id`.
`RequestIdFilter` copies the context variable onto every log record (`%(request_id)s`; "-" outside a request).

An id is 1 to 128 printable ASCII characters without spaces, so it is safe in a log line as it is. Every request
runs in its own asyncio task, i.e. its own copy of the context, and the worker threads get a copy too
(`BlockingPool.submit`), so the variable is set once per request and never reset: the outermost error handler
(an unexpected 500) still sees it. Cost: a scan of the request headers and, without a client id, 16 random bytes.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.schemas import REQUEST_ID_MAX_CHARS

HEADER = "X-Request-ID"
_HEADER_KEY = b"x-request-id"
_VALID = re.compile(rb"[!-~]{1,%d}" % REQUEST_ID_MAX_CHARS)

request_id_var: ContextVar[str] = ContextVar("dare_request_id", default="-")


def current_request_id() -> str:
    """The id of the request this code runs for ("-" outside a request)."""
    return request_id_var.get()


def use_request_id(state: Any, request_id: str | None) -> None:
    """A route's `request_id` body field replaces the header's (or the generated) id for the rest of the request:
    the answer's header and body, and the log lines from here on. `state` is the Starlette request's `state`."""
    if request_id is not None:
        state.request_id = request_id
        request_id_var.set(request_id)


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record as `request_id` (install it on the handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class RequestIdMiddleware:
    """Accepts or makes the request's id, sets `request_id_var`, and adds `X-Request-ID` to the answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope["headers"]:
            if name == _HEADER_KEY:
                given = value
                break
        valid = given is None or _VALID.fullmatch(given) is not None
        request_id = given.decode("ascii") if given is not None and valid else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (_HEADER_KEY, state["request_id"].encode("ascii"))]
            await send(message)

        if valid:
            await self.app(scope, receive, send_with_id)
            return
        from service.api.responses import error_response

        message = f"1 to {REQUEST_ID_MAX_CHARS} printable ASCII characters without spaces"
        response = error_response(422, "invalid_request", f"{HEADER}: {message}", fields=[{"field": HEADER, "message": message}])
        await response(scope, receive, send_with_id)

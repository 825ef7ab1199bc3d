"""Pure-ASGI middleware: the request body size limit (413), the request-duration histogram, the in-flight gauge
and (DARE_LOG_FORMAT=json) the access log (the request id: service/api/request_id.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from fastapi.routing import iter_route_contexts
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.responses import error_response
from service.metrics import ServiceMetrics

_BODY_METHODS = {"POST", "PUT", "PATCH"}


class BodySizeLimit:
    """Answers 413 for a body over `max_bytes`, judged by Content-Length and by the bytes actually received
    (chunked uploads have no Content-Length). The accepted body is buffered and replayed to the app.

    It answers before routing; so that the request histogram counts such an answer under its route (not
    "unmatched"), it first matches the app's `routes` itself (FastAPI's public `iter_route_contexts` and each
    route's `matches`)."""

    def __init__(self, app: ASGIApp, max_bytes: int, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.routes = routes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, code: str, detail: str) -> None:
        for context in iter_route_contexts(self.routes):  # included routers' routes too
            match, _ = context.matches(scope)
            if match is Match.FULL:
                scope["route"] = context.original_route  # what routing would have set
                break
        await error_response(status, code, detail)(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        too_large = f"request body exceeds {self.max_bytes} bytes (DARE_MAX_BODY_BYTES)"
        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await self._refuse(scope, receive, send, 400, "bad_request", "Content-Length is not an integer")
                return
            if length > self.max_bytes:
                await self._refuse(scope, receive, send, 413, "body_too_large", too_large)
                return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await self._refuse(scope, receive, send, 413, "body_too_large", too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app an already-read body in one message, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


access_log = logging.getLogger("service.access")


class RequestMetrics:
    """Observes dare_http_request_duration_seconds{endpoint, method, model, status} for every HTTP request, counts
    it in dare_http_requests_in_flight while it runs, and with `access_log` logs one line per request on the
    `service.access` logger (extra fields: request_id, route, method, status, duration_ms, model).

    endpoint is the matched route's template (bounded cardinality); model is what the route put in
    `request.state.model` (empty for endpoints that use none)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, access_log: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics = self.metrics
        if metrics.in_flight_shared:
            metrics.in_flight.inc()
        else:
            metrics.in_flight_count += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if metrics.in_flight_shared:
                metrics.in_flight.dec()
            else:
                metrics.in_flight_count -= 1
            route = scope.get("route")
            # path_format: the template without convertors ("/users/{user_id}/history", not "{user_id:user_id}").
            endpoint = getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"
            model = str(scope.get("state", {}).get("model", ""))
            seconds = time.perf_counter() - started
            metrics.request_series(endpoint, scope["method"], model, str(status)).observe(seconds)
            if self.access_log:
                access_log.info("%s %s %d", scope["method"], endpoint, status, extra={
                    "request_id": scope.get("state", {}).get("request_id"), "route": endpoint, "method": scope["method"],
                    "status": status, "duration_ms": round(seconds * 1000.0, 3), "model": model or None,
                })  # fmt: skip

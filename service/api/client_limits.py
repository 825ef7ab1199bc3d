"""Limits on what one HTTP client may hold: the size of a request's headers and the time to send a request.

uvicorn bounds neither with its default (httptools) protocol: a 64 MB header is buffered whole, and a client that
sends half a request keeps its connection for ever. `ClientLimits` sits between the socket and uvicorn's protocol
(composition through asyncio's public Protocol and Transport interfaces, nothing of uvicorn's inside is touched) and
closes a connection whose client

- sends more than DARE_MAX_HEADER_BYTES before the blank line that ends a request's headers (answered 431), or
- has not finished sending a request DARE_CLIENT_TIMEOUT_S after its first byte (answered 408): the headers, then
  the Content-Length bytes of the body (a chunked body: until the answer starts), or
- sends a Content-Length that is not an integer (answered 400 `bad_request`, as the app would).

`dare serve` uses it (`uvicorn.run(..., http="service.api.client_limits:ClientLimits")`, limits from the DARE_*
settings); the body size limit (413) stays in the app (service/api/middleware.py).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.core.config import get_settings

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*\r\n", re.IGNORECASE)
_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
_ANY_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:", re.IGNORECASE)
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"


def _answer(template: bytes, code: str, detail: str) -> bytes:
    body = b'{"error":"%s","detail":"%s"}' % (code.encode(), detail.encode())
    return template % (len(body), body)


class _Transport:
    """The socket's transport as the inner protocol sees it: every call passes through; a write marks the request
    answered (its deadline ends)."""

    def __init__(self, transport: Any, limits: ClientLimits) -> None:
        self._transport = transport
        self._limits = limits

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._limits.answered()
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class ClientLimits(asyncio.Protocol):
    """uvicorn's httptools protocol behind the two limits (one instance per connection)."""

    def __init__(self, **kwargs: Any) -> None:  # uvicorn passes config, server_state, app_state
        settings = get_settings()
        self.max_header_bytes = settings.max_header_bytes
        self.timeout_s = settings.client_timeout_s
        self.inner = HttpToolsProtocol(**kwargs)
        self.loop = asyncio.get_event_loop()
        self.transport: Any = None
        self.deadline: asyncio.TimerHandle | None = None
        self.head = bytearray()  # the current request's bytes up to the end of its headers
        self.in_head = True  # the current request's headers are still arriving
        self.body_left: int | None = None  # then: body bytes still to come (None: a chunked body, until the answer)
        self.closed = False

    # --- asyncio.Protocol -----------------------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:  # asyncio's or uvloop's transport
        self.transport = transport
        self.inner.connection_made(_Transport(transport, self))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.deadline is None and (self.in_head or self.body_left):
            self.deadline = self.loop.call_later(self.timeout_s, self._expired)
        self._account(data)
        if not self.closed:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[attr-defined, no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self.closed = True
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()  # type: ignore[attr-defined]

    def resume_writing(self) -> None:
        self.inner.resume_writing()  # type: ignore[attr-defined]

    # --- the limits -----------------------------------------------------------------------------------------------
    def _account(self, data: bytes) -> None:
        if not self.in_head:
            if self.body_left is not None:  # a body whose length the headers gave
                self.body_left = max(self.body_left - len(data), 0)
                if self.body_left == 0:
                    self._cancel()  # the request is complete: the server's own time is DARE_REQUEST_TIMEOUT_S's
            return
        if self.head:  # the headers began in an earlier chunk
            start = max(len(self.head) - 3, 0)
            self.head += data
            buf: bytes | bytearray = self.head
        else:  # the usual case: a request's headers in one chunk, searched without a copy
            start, buf = 0, data
        end = buf.find(b"\r\n\r\n", start)
        if (len(buf) if end < 0 else end) > self.max_header_bytes:
            detail = f"request headers exceed {self.max_header_bytes} bytes (DARE_MAX_HEADER_BYTES)"
            self._refuse(_answer(_TOO_LARGE, "headers_too_large", detail))
            return
        if end < 0:
            if buf is data:
                self.head += data
            return
        head = bytes(buf[: end + 2])
        length = _CONTENT_LENGTH.search(head)
        if length is None and _ANY_CONTENT_LENGTH.search(head) is not None:
            # httptools would refuse it with a plain-text 400: the same answer as the app's (service/api/middleware.py)
            self._refuse(_answer(_BAD_REQUEST, "bad_request", "Content-Length is not an integer"))
            return
        after = len(buf) - (end + 4)
        self.head.clear()
        self.in_head = False
        if length is not None:
            self.body_left = max(int(length.group(1)) - after, 0)
        elif b"\r\ntransfer-encoding:" in head.lower():
            self.body_left = None
        else:
            self.body_left = 0
        if self.body_left == 0:
            self._cancel()

    def answered(self) -> None:
        """The server wrote (part of) an answer: the next bytes from the client start a new request."""
        self._cancel()
        self.head.clear()
        self.in_head = True
        self.body_left = None

    def _expired(self) -> None:
        self.deadline = None
        detail = f"the request was not sent completely within {self.timeout_s:g} s (DARE_CLIENT_TIMEOUT_S)"
        self._refuse(_answer(_TIMEOUT, "client_timeout", detail))

    def _refuse(self, answer: bytes) -> None:
        self._cancel()
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()

    def _cancel(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

"""The HTTP floor `dare bench` measures beside POST /score: servers that answer every request with a fixed 2-byte
body and do nothing else, on the same machine, client and interleaving as the service.

- `uvicorn`: a bare ASGI app on uvicorn (httptools, uvloop), the server `dare serve` runs: what the socket round
  trip, waking the server's process and uvicorn's own HTTP handling cost, without any of the service's code;
- `raw`: an asyncio protocol on uvloop that answers each read with the fixed response: the socket round trip and
  the wake-ups alone (no HTTP parsing at all).

A service's HTTP overhead cannot go below its server's floor: on a machine where waking an idle process is slow
(virtual CPUs), the floor alone can be a large share of a ~1 ms call (docs/performance.md, round 6).

    python -m dare.http_floor --server uvicorn --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

RESPONSE_BODY = b"ok"
_RAW_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\n" + RESPONSE_BODY


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The bare ASGI app: reads the request body, answers 200 "ok"."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})  # fmt: skip
    await send({"type": "http.response.body", "body": RESPONSE_BODY})


class _RawProtocol(asyncio.Protocol):
    """Answers every read with the fixed response (the bench sends one small request at a time: one read each)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(_RAW_RESPONSE)  # type: ignore[attr-defined]


async def _serve_raw(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_RawProtocol, host, port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=("uvicorn", "raw"), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.server == "uvicorn":
        import uvicorn

        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    else:
        import uvloop

        uvloop.run(_serve_raw(args.host, args.port))


if __name__ == "__main__":
    main()

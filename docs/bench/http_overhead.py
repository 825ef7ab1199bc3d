"""Where POST /score's HTTP overhead goes, piece by piece (docs/performance.md, "Where the time goes" and round 3).

1. A bare ASGI app under uvicorn (uvloop, httptools) answering a POST with a 200-score body, over one keep-alive
   loopback connection: the floor of any Python ASGI service on this machine.
2. An anyio thread hop (what `run_blocking` does for every scoring call), with nothing to do in the thread.
3. Parsing and validating a request body (orjson + `ScoreRequest`) with 100 and 200 candidates.
4. The store read of a 200-event sequence (the service's MULTI/EXEC): blocking inline, blocking through a thread
   hop, and with redis.asyncio on the event loop (what running small requests without a worker thread would need).

2-4 are measured warm (back to back) and "cold": after touching 32 MB, as a W2 scoring call does to the caches.
p50 of 500 calls, in microseconds.

    .venv/bin/python docs/bench/http_overhead.py --out docs/bench/http_overhead.md
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.to_thread
import numpy as np
import orjson
import redis
import redis.asyncio
import uvloop

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from loadtest.redis_server import free_port, start_redis_server  # noqa: E402
from service.schemas import ScoreRequest  # noqa: E402

CALLS = 500
POLLUTER = np.ones(8 << 20, dtype=np.float32)  # 32 MB, as big as a W2 call's working set

BARE_APP = '''
RESPONSE = b'{"scores":[' + b",".join([b"0.123456789"] * 200) + b"]}"
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(RESPONSE)).encode())]

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": RESPONSE})
'''


def pollute() -> None:
    POLLUTER.sum()


def body(candidates: int) -> bytes:
    rng = np.random.default_rng(candidates)
    return orjson.dumps({"user_id": "u", "candidates": [{"item_id": int(i), "category_id": int(c)} for i, c in
                                                        zip(rng.integers(0, 5_000_000, candidates), rng.integers(0, 10_000, candidates))]})  # fmt: skip


def p50_us(samples: list[float]) -> float:
    return float(np.median(samples)) * 1e6


def time_sync(call: Callable[[], object], cold: bool) -> float:
    samples = []
    for _ in range(CALLS):
        if cold:
            pollute()
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return p50_us(samples)


async def time_async(call: Callable[[], Awaitable[object]], cold: bool) -> float:
    samples = []
    for _ in range(CALLS):
        if cold:
            pollute()
        t0 = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - t0)
    return p50_us(samples)


def bare_uvicorn_roundtrip(payload: bytes) -> float:
    """p50 of POST round trips to a bare ASGI app under uvicorn (a child process), over one keep-alive connection."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bare_app.py").write_text(BARE_APP, encoding="utf-8")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port), "--log-level", "warning",
                                   "--loop", "uvloop", "--http", "httptools"], cwd=tmp)  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("uvicorn did not start") from None
                    time.sleep(0.1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload

            def roundtrip() -> None:
                sock.sendall(request)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    buf += sock.recv(65536)
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                while len(rest) < length:
                    rest += sock.recv(65536)

            for _ in range(50):
                roundtrip()
            result = time_sync(roundtrip, cold=False)
            sock.close()
            return result
        finally:
            server.terminate()
            server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    args = parser.parse_args()
    rows: list[tuple[str, float, float | None]] = [("bare uvicorn + uvloop POST round trip, 200-candidate body", bare_uvicorn_roundtrip(body(200)), None)]
    for c in (100, 200):
        raw = body(c)

        def parse(raw: bytes = raw) -> object:
            return ScoreRequest.model_validate(orjson.loads(raw))

        rows.append((f"parse + validate the body, {c} candidates", time_sync(parse, False), time_sync(parse, True)))
    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis_server(Path(tmp))
        try:
            port = server.port
            value = b"DSEQ\x01\x10\x00\x00" + bytes(16 * 200)
            client = redis.Redis(port=port)
            client.set("k", value)

            def read() -> object:
                pipe = client.pipeline(transaction=True)
                pipe.type("k")
                pipe.strlen("k")
                pipe.getrange("k", 0, 7)
                pipe.getrange("k", -16 * 200, -1)
                return pipe.execute()

            async def measure_async() -> list[tuple[str, float, float | None]]:
                aclient = redis.asyncio.Redis(port=port)

                async def aread() -> object:
                    async with aclient.pipeline(transaction=True) as pipe:
                        pipe.type("k")
                        pipe.strlen("k")
                        pipe.getrange("k", 0, 7)
                        pipe.getrange("k", -16 * 200, -1)
                        return await pipe.execute()

                async def hop() -> None:
                    await anyio.to_thread.run_sync(lambda: None)

                async def read_in_thread() -> None:
                    await anyio.to_thread.run_sync(read)

                found = [("anyio thread hop, nothing to do", await time_async(hop, False), await time_async(hop, True))]
                found.append(("store read, 200 events, blocking, through a thread hop", await time_async(read_in_thread, False),
                              await time_async(read_in_thread, True)))  # fmt: skip
                found.append(("store read, 200 events, redis.asyncio on the event loop", await time_async(aread, False),
                              await time_async(aread, True)))  # fmt: skip
                await aclient.aclose()
                return found

            rows.append(("store read, 200 events, blocking, inline", time_sync(read, False), time_sync(read, True)))
            rows += uvloop.run(measure_async())
            client.close()
        finally:
            server.stop()
    lines = ["# POST /score's HTTP overhead, piece by piece (`docs/bench/http_overhead.py`)", "",
             f"p50 of {CALLS} calls, microseconds; cold = after touching 32 MB (as a W2 scoring call does to the caches).", "",
             "| what | warm | cold |", "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {what} | {warm:.0f} | {'' if cold is None else f'{cold:.0f}'} |" for what, warm, cold in rows]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

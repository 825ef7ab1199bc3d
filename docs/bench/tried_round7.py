"""Round 7's tries at W1's HTTP overhead, none kept: a Rust HTTP front, one write per response, and msgspec.

1. The HTTP floor: GET / to the same bare ASGI app (`dare.http_floor.app`) on uvicorn (what `dare serve` runs), on
   granian (a Rust server with an ASGI interface), on uvicorn with one write per response (a protocol whose transport
   holds the response head until the body comes, so both leave in one send), and from a raw uvloop protocol (no HTTP
   at all). One keep-alive connection each, the bench's lean client; the servers take turns, one GET each, in
   rotating order, and each GET is timed twice: right after the previous one ("hot") and right after about 1 ms of
   work in the client that walks through memory (as `dare bench` times each request right after an in-process call).
2. With `--msgspec`: the /score body of a W1 request (100 candidates) parsed and validated by `orjson.loads` +
   `ScoreRequest.model_validate` (what the service does) and by a `msgspec.json.Decoder` into typed structs with the
   same range checks plus the two id arrays, alternating call by call.

Neither granian nor msgspec is a dependency of the project: granian goes into a venv of its own, msgspec into a
folder on PYTHONPATH.

    python3 -m venv /tmp/gv && /tmp/gv/bin/pip install granian==2.8.9 uvloop
    .venv/bin/pip install --target /tmp/ms msgspec==0.23.0
    PYTHONPATH=/tmp/ms .venv/bin/python docs/bench/tried_round7.py --granian /tmp/gv/bin/granian --msgspec \\
        --out docs/bench/tried_round7.md
"""

import argparse
import asyncio
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dare.bench import BenchError, HttpClient, _machine, http_server  # noqa: E402

GRANIAN_FLAGS = ["--interface", "asgi", "--loop", "uvloop", "--workers", "1", "--runtime-threads", "1",
                 "--runtime-mode", "st", "--http", "1", "--task-impl", "rust", "--log-level", "warning"]  # fmt: skip


class _OneWriteTransport:
    """Holds a response head (a write ending in a blank line) until the next write, then sends both in one write; a
    head left alone is sent on the next loop step. Everything else goes to the real transport."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop, self._held = transport, loop, b""

    def write(self, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        elif data.endswith(b"\r\n\r\n"):
            self._held = data
            self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        if self._held and not self._transport.is_closing():
            self._transport.write(self._held)
        self._held = b""

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def serve_one_write(port: int) -> None:
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from dare.http_floor import app

    class OneWriteProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_OneWriteTransport(transport, asyncio.get_running_loop()))  # type: ignore[arg-type]

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", http=OneWriteProtocol)


def servers(granian: str) -> dict[str, Any]:
    floor = [sys.executable, "-m", "dare.http_floor", "--server"]
    return {
        "uvicorn (what dare serve runs)": lambda port: [*floor, "uvicorn", "--port", str(port)],
        "granian": lambda port: [granian, *GRANIAN_FLAGS, "--host", "127.0.0.1", "--port", str(port), "dare.http_floor:app"],
        "uvicorn, one write per response": lambda port: [sys.executable, __file__, "--serve-one-write", str(port)],
        "raw uvloop protocol": lambda port: [*floor, "raw", "--port", str(port)],
    }


def measure_floors(granian: str, rounds: int) -> list[str]:
    rng = np.random.default_rng(0)

    def work() -> float:
        t0 = time.perf_counter()
        rng.random(30_000).argsort()
        return time.perf_counter() - t0

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="dare-tried-round7-") as logs:
        clients = {}
        for i, (name, command) in enumerate(servers(granian).items()):
            port = stack.enter_context(http_server(command, name, Path(logs) / f"{i}.log"))
            clients[name] = HttpClient(port)
            stack.callback(clients[name].close)
        times: dict[str, dict[str, list[float]]] = {n: {"hot": [], "after work": []} for n in clients}
        names = list(clients)
        for r in range(rounds):
            for name in np.roll(names, r):
                times[name]["hot"].append(clients[name].get())
                work()
                times[name]["after work"].append(clients[name].get())
        work_ms = float(np.median([work() for _ in range(50)])) * 1000.0
    return [
        f"GET / p50 ms over {rounds} rounds, the bare ASGI app of `dare.http_floor`; the work before each 'after work' GET "
        f"took {work_ms:.2f} ms (p50). granian flags: `{' '.join(GRANIAN_FLAGS)}`.", "",
        "| server | hot | after work |", "|---|---:|---:|",
        *(f"| {n} | {np.median(t['hot']) * 1000:.3f} | {np.median(t['after work']) * 1000:.3f} |" for n, t in times.items()),
    ]  # fmt: skip


def measure_msgspec(calls: int) -> list[str]:
    import msgspec
    import orjson

    from service.schemas import MAX_CATEGORY_ID, MAX_ITEM_ID, USER_ID_MAX_CHARS, ScoreRequest

    class Candidate(msgspec.Struct, forbid_unknown_fields=True):
        item_id: Annotated[int, msgspec.Meta(ge=0, le=MAX_ITEM_ID)]
        category_id: Annotated[int, msgspec.Meta(ge=0, le=MAX_CATEGORY_ID)]

    class Request(msgspec.Struct, forbid_unknown_fields=True):
        user_id: Annotated[str, msgspec.Meta(min_length=1, max_length=USER_ID_MAX_CHARS)]
        candidates: Annotated[list[Candidate], msgspec.Meta(min_length=1)]
        model: str | None = None
        explain: bool = False

    decoder = msgspec.json.Decoder(Request)
    rng = np.random.default_rng(0)
    body = orjson.dumps({"user_id": "u123", "candidates": [{"item_id": int(i), "category_id": int(c)}
                         for i, c in zip(rng.integers(1, 5_000_000, 100), rng.integers(1, 10_000, 100))]})  # fmt: skip

    def service() -> tuple[np.ndarray, np.ndarray]:
        ids = ScoreRequest.model_validate(orjson.loads(body)).candidates
        return ids.item_id, ids.category_id

    def with_msgspec() -> tuple[np.ndarray, np.ndarray]:
        cands = decoder.decode(body).candidates
        return (np.fromiter((c.item_id for c in cands), np.int64, len(cands)),
                np.fromiter((c.category_id for c in cands), np.int64, len(cands)))  # fmt: skip

    if any((a != b).any() for a, b in zip(service(), with_msgspec())):
        raise BenchError("msgspec and the service read different ids")
    times: dict[str, list[float]] = {"service": [], "msgspec": []}
    for i in range(calls):
        for name, call in (("service", service), ("msgspec", with_msgspec)) if i % 2 else (("msgspec", with_msgspec), ("service", service)):
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    s, m = (float(np.median(times[n])) * 1e6 for n in ("service", "msgspec"))
    return [
        f"The /score body of a W1 request (100 candidates) to the two id arrays, p50 us over {calls} calls each, alternating:", "",
        "| orjson.loads + ScoreRequest.model_validate (the service) | msgspec.json.Decoder + np.fromiter | saved |",
        "|---:|---:|---:|", f"| {s:.1f} | {m:.1f} | {s - m:.1f} |",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--granian", help="the granian executable (a venv of its own)")
    parser.add_argument("--msgspec", action="store_true", help="also time msgspec against the service's body validation")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--serve-one-write", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_one_write:
        serve_one_write(args.serve_one_write)
        return
    if args.granian is None or args.out is None:
        parser.error("--granian and --out are required")
    try:
        sections = [measure_floors(args.granian, args.rounds)]
        if args.msgspec:
            sections.append(measure_msgspec(5_000))
    except (BenchError, ImportError) as exc:
        raise SystemExit(f"tried_round7: {exc}") from None
    command = "PYTHONPATH=/tmp/ms " if args.msgspec else ""
    command += f".venv/bin/python docs/bench/tried_round7.py --granian {args.granian}{' --msgspec' if args.msgspec else ''} --out {args.out}"
    lines = ["# Round 7: tries at W1's HTTP overhead (`docs/bench/tried_round7.py`)", "", f"Command: `{command}`  ",
             f"Machine: {_machine()['cpu']}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]  # fmt: skip
    for section in sections:
        lines += [*section, ""]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Round 7's try of a non-Python HTTP front: the HTTP floor of granian (a Rust server with an ASGI interface) beside
uvicorn's and a raw uvloop protocol's, for the same bare ASGI app (`dare.http_floor.app`).

Each server runs in its own process; one keep-alive connection each, the bench's lean client. The servers take turns,
one GET each, in rotating order; each GET is timed twice: right after the previous one ("hot") and right after about
1-3 ms of work in the client that walks through memory (as `dare bench` times each request right after an
in-process call). granian is not a dependency of the project: install it into a separate venv and pass its
executable.

    python3 -m venv /tmp/gv && /tmp/gv/bin/pip install granian==2.8.9 uvloop
    .venv/bin/python docs/bench/tried_round7.py --granian /tmp/gv/bin/granian --out docs/bench/tried_round7.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dare.bench import HttpClient, _machine  # noqa: E402
from dare.processes import stop_process  # noqa: E402
from loadtest.redis_server import free_port  # noqa: E402

GRANIAN_FLAGS = ["--interface", "asgi", "--loop", "uvloop", "--workers", "1", "--runtime-threads", "1",
                 "--runtime-mode", "st", "--http", "1", "--task-impl", "rust", "--log-level", "warning"]  # fmt: skip


def commands(granian: str, port: int) -> dict[str, list[str]]:
    floor = [sys.executable, "-m", "dare.http_floor", "--port", str(port), "--server"]
    return {
        "uvicorn (what dare serve runs)": [*floor, "uvicorn"],
        "granian": [granian, *GRANIAN_FLAGS, "--host", "127.0.0.1", "--port", str(port), "dare.http_floor:app"],
        "raw uvloop protocol": [*floor, "raw"],
    }


def connect(process: subprocess.Popen, port: int, name: str) -> HttpClient:
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with code {process.returncode}")
        try:
            client = HttpClient(port)
            client.get()
            return client
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not answer within 60 s") from None
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--granian", required=True, help="the granian executable (a venv of its own)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=600)
    args = parser.parse_args()
    processes, clients = [], {}
    try:
        for name in commands(args.granian, 0):
            port = free_port()
            process = subprocess.Popen(commands(args.granian, port)[name], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            processes.append(process)
            clients[name] = connect(process, port, name)
        rng = np.random.default_rng(0)

        def work() -> float:
            t0 = time.perf_counter()
            rng.random(30_000).argsort()
            return time.perf_counter() - t0

        times: dict[str, dict[str, list[float]]] = {n: {"hot": [], "after work": []} for n in clients}
        names = list(clients)
        for r in range(args.rounds):
            for name in np.roll(names, r):
                times[name]["hot"].append(clients[name].get())
                work()
                times[name]["after work"].append(clients[name].get())
        work_ms = float(np.median([work() for _ in range(50)])) * 1000.0
    finally:
        for client in clients.values():
            client.close()
        for process in processes:
            stop_process(process)
    rows = [f"| {n} | {np.median(t['hot']) * 1000:.3f} | {np.median(t['after work']) * 1000:.3f} |" for n, t in times.items()]
    text = "\n".join([
        "# Round 7: the HTTP floor with a Rust front (granian) beside uvicorn (`docs/bench/tried_round7.py`)", "",
        f"Command: `.venv/bin/python docs/bench/tried_round7.py --granian {args.granian} --out {args.out}`  ",
        f"Machine: {_machine()['cpu']}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{args.rounds} rounds; the work before each 'after work' GET took {work_ms:.2f} ms (p50).  ",
        f"granian flags: `{' '.join(GRANIAN_FLAGS)}`", "",
        "GET / p50 ms, the bare ASGI app of `dare.http_floor` (the raw protocol answers without HTTP parsing):", "",
        "| server | hot | after work |", "|---|---:|---:|", *rows, "",
    ])  # fmt: skip
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()

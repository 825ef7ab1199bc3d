"""A/B of POST /score through the ASGI app in process (no socket, no HTTP client): the service code's own cost per
request, for two source trees, interleaved round by round so that load from other processes hits both alike.

    python loadtest/asgi_ab.py --models DIR --redis URL --tree A=/path/to/old --tree B=/path/to/new [--rounds 8]

Each round runs one fresh process per tree (in random order) that imports `service` from that tree, starts the app's
lifespan, writes a user's history through POST /events, warms up, then times `--requests` POST /score calls
(wall and process CPU). The report gives each tree's median per-request time over the rounds and B - A. The model
folders and the Redis are the same for both trees. The first model of the folder is scored (W1 by default:
200 history events, 100 candidates)."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import asyncio, json, sys, time
import orjson
from service.core.config import Settings
from service.main import create_app

models, redis_url, n, history, candidates, items, cates = sys.argv[1:8]
n, history, candidates = int(n), int(history), int(candidates)
items, cates = json.loads(items), json.loads(cates)


async def main():
    app = create_app(Settings(models_dir=models, redis_url=redis_url))

    async def call(method, path, body):
        payload = orjson.dumps(body)
        sent = []
        done = False

        async def receive():
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": payload, "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
                 "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
                 "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "state": {}}
        await app(scope, receive, send)
        assert sent[0]["status"] == 200, sent
        return sent

    async with app.router.lifespan_context(app) as state:
        app.state.services  # the lifespan ran
        user = "ab-user"
        events = [{"item_id": items[i % len(items)], "category_id": cates[i % len(cates)]} for i in range(history)]
        await call("POST", "/events", {"user_id": user, "events": events})
        body = {"user_id": user, "candidates": [{"item_id": items[(7 * i) % len(items)], "category_id": cates[(3 * i) % len(cates)]}
                                                for i in range(candidates)]}
        for _ in range(300):
            await call("POST", "/score", body)
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            await call("POST", "/score", body)
        w1, c1 = time.perf_counter(), time.process_time()
    print(json.dumps({"wall_us": (w1 - w0) / n * 1e6, "cpu_us": (c1 - c0) / n * 1e6}))


asyncio.run(main())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (twice)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--history", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=100)
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    folder = sorted(p for p in Path(args.models).iterdir() if p.is_dir())[0]
    import numpy as np

    with np.load(folder / "vocab.npz") as vocab:
        items, cates = vocab["item_raw"].tolist(), vocab["cate_raw"].tolist()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DARE_", "OTEL_")) and k != "PROMETHEUS_MULTIPROC_DIR"}
    for r in range(args.rounds):
        order = list(trees)
        random.shuffle(order)
        for name in order:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, args.models, args.redis, str(args.requests), str(args.history),
                 str(args.candidates), json.dumps(items), json.dumps(cates)],
                cwd=trees[name], env={**env, "PYTHONPATH": trees[name]}, capture_output=True, text=True,
            )  # fmt: skip
            if out.returncode != 0:
                raise SystemExit(f"{name}: {out.stderr[-2000:]}")
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {results[name][-1]}", file=sys.stderr)
    medians = {name: {k: statistics.median(x[k] for x in rs) for k in ("wall_us", "cpu_us")} for name, rs in results.items()}
    a, b = list(trees)
    report = {"medians_us": medians, "b_minus_a_us": {k: medians[b][k] - medians[a][k] for k in ("wall_us", "cpu_us")},
              "rounds": args.rounds, "requests_per_round": args.requests}  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

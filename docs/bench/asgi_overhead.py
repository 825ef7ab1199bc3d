"""Round 6: what the service's own code adds to a small POST /score, at an earlier commit and now (no socket).

For each source tree (the one at `--before`, checked out in a temporary git worktree, and this one), a worker
process builds the app with `create_app`, runs its lifespan, and times in turn, call by call on one event loop:

- `asgi`: POST /score through the app's ASGI callable (no socket, no uvicorn), as uvicorn would call it;
- `engine`: what that request runs in the engine: `ScoringEngine.afetch` (the asyncio store read) + `score`.

asgi - engine is the service's own code around the engine (body, JSON, validation, middleware, metrics, response).
Workers alternate between the trees (4 runs each), on the same private redis-server, model folder (a RANDOMLY
INITIALISED att-16 DARE model) and W1 request (N=200, C=100); medians of the per-run p50s.

    .venv/bin/python docs/bench/asgi_overhead.py --before 9738093 --out docs/bench/asgi_overhead.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def worker(tree: Path, redis_url: str, models: Path, body_file: Path, calls: int) -> None:
    sys.path.insert(0, str(tree))
    import asyncio

    import orjson
    import uvloop

    from dare.bench import _asgi_post  # this tree's copy of the same helper
    from service.core.config import Settings
    from service.main import create_app

    body = body_file.read_bytes()
    request = orjson.loads(body)
    app = create_app(Settings(models_dir=models, redis_url=redis_url, log_level="warning", request_timeout_s=60.0))

    async def run() -> dict[str, float]:
        async with app.router.lifespan_context(app):
            services = app.state.services
            model = services.registry.current.get(request["model"])
            items = np.array([c["item_id"] for c in request["candidates"]], dtype=np.int64)
            cates = np.array([c["category_id"] for c in request["candidates"]], dtype=np.int64)
            wall: dict[str, list[float]] = {"asgi": [], "engine": []}
            cpu: dict[str, list[float]] = {"asgi": [], "engine": []}
            for i in range(calls):
                for name in ("asgi", "engine") if i % 2 else ("engine", "asgi"):
                    t0, c0 = time.perf_counter(), time.process_time()
                    if name == "asgi":
                        if await _asgi_post(app, "/score", body) != 200:
                            raise SystemExit(f"{tree}: POST /score did not answer 200")
                    else:
                        fetched = await services.engine.afetch(request["user_id"])
                        services.engine.score(request["user_id"], items, cates, model=model, fetched=fetched)
                    if i >= calls // 10:
                        wall[name].append(time.perf_counter() - t0)
                        cpu[name].append(time.process_time() - c0)
            return {f"{kind}_{name}_ms": float(np.median(v[name])) * 1000.0 for kind, v in (("wall", wall), ("cpu", cpu)) for name in v}

    print(json.dumps(uvloop.run(run())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the earlier commit")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=2000, help="calls of each kind per worker run")
    parser.add_argument("--runs", type=int, default=4, help="worker runs per tree")
    parser.add_argument("--worker", nargs=4, metavar=("TREE", "REDIS_URL", "MODELS", "BODY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tree, url, models, body = args.worker
        worker(Path(tree), url, Path(models), Path(body), args.calls)
        return

    sys.path.insert(0, str(ROOT))
    import orjson

    from dare.bench import BenchConfig, Workload, build_models, make_data, model_name
    from loadtest.redis_server import start_redis_server
    from service.store import SequenceStore, connect

    work = Path(tempfile.mkdtemp(prefix="dare-asgi-overhead-"))
    before_tree = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before_tree), args.before], check=True,
                   capture_output=True)  # fmt: skip
    redis = start_redis_server(work / "redis")
    try:
        for built in (ROOT / "service").glob("_search*.so"):  # the same compiled kernel (unchanged between the two)
            shutil.copy(built, before_tree / "service" / built.name)
        cfg = BenchConfig(out=work / "x.json", att_dims=(16,), workloads=(Workload("W1", 200, 100),), progress=False)
        store = SequenceStore(connect(redis.url, socket_timeout_s=30.0), lifelong_max_events=200)
        data = make_data(cfg, store, work)
        build_models(cfg, data, work / "models")
        items, cates = data.candidates["W1"][0]
        body_file = work / "body.json"
        body_file.write_bytes(orjson.dumps({"user_id": data.users["W1"][0], "model": model_name(16, cfg.repr_dim),
                                            "candidates": [{"item_id": int(i), "category_id": int(c)} for i, c in zip(items, cates)]}))  # fmt: skip
        trees = {"before": before_tree, "after": ROOT}
        runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for r in range(args.runs):
            for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
                out = subprocess.run([sys.executable, __file__, "--before", args.before, "--out", str(args.out), "--calls",
                                      str(args.calls), "--worker", str(trees[name]), redis.url, str(work / "models"), str(body_file)],
                                     check=True, capture_output=True, text=True, cwd=trees[name])  # fmt: skip
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        store.close()
    finally:
        redis.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_tree)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    def med(name: str, key: str) -> float:
        return float(np.median([run[key] for run in runs[name]]))

    lines = [
        "# What the service's own code adds to a small POST /score (no socket)",
        "",
        f"Command: `.venv/bin/python docs/bench/asgi_overhead.py --before {args.before} --out {args.out}`  ",
        f"W1 request (N=200, C=100), att-16 DARE model (RANDOMLY INITIALISED), private redis-server; {args.runs} worker runs "
        f"per tree, alternating, {args.calls} calls of each kind per run; medians of the runs' p50s, ms (CPU time of "
        "the worker in brackets).",
        "",
        "| tree | POST /score through the ASGI app | afetch + score (the engine) | the service's own code |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (("before", f"before ({args.before})"), ("after", "now")):
        a, e = med(name, "wall_asgi_ms"), med(name, "wall_engine_ms")
        ca, ce = med(name, "cpu_asgi_ms"), med(name, "cpu_engine_ms")
        lines.append(f"| {label} | {a:.3f} ({ca:.3f}) | {e:.3f} ({ce:.3f}) | {a - e:.3f} ({ca - ce:.3f}) |")
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

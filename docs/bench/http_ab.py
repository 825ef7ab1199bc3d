"""Round 9: POST /score over HTTP at an earlier commit and now, in one run, beside the in-process call.

For each source tree (the one at `--before`, checked out in a temporary git worktree, and this one) a real
`dare serve` (uvicorn, 1 worker) runs on the same private redis-server and model folder (a RANDOMLY INITIALISED
att-16 DARE model; W1: N=200, C=100, or with --workload W2: N=10,000, C=200, which takes the worker thread), beside the two HTTP floor servers (`dare.http_floor`: a bare ASGI app on
uvicorn, a raw uvloop protocol). This process times, in a rotation that changes the order every call:

- `in-process`: `ScoringEngine.score` (blocking store read), what `dare bench` calls the in-process total;
- `POST /score` on each tree's server, with `dare bench`'s lean keep-alive client;
- a GET to each floor server.

Each tree's ratio is its POST /score p50 / the in-process p50 of the same run. The engine's stages as each server
reports them (`timings_ms`) show that the engine is not what differs. p50 over `--calls` rotations after a tenth
of them as warm-up.

    .venv/bin/python docs/bench/http_ab.py --before d8f776d --out docs/bench/http_ab_round9.md
    .venv/bin/python docs/bench/http_ab.py --before 643c883 --workload W2 --calls 1500 --out docs/bench/http_ab_round9_w2.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = {"W1": (200, 100), "W2": (10_000, 200)}  # history length N, candidates C


def _wait_for_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not listen on port {port}") from None
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the earlier commit")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=3000, help="rotations (each times every call once)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import orjson
    import uvloop
    from tqdm import tqdm

    from dare.bench import BenchConfig, HttpClient, Workload, build_models, make_data, model_name
    from loadtest.redis_server import free_port, start_redis_server
    from service.core.config import Settings
    from service.main import create_app
    from service.store import SequenceStore, connect

    work = Path(tempfile.mkdtemp(prefix="dare-http-ab-"))
    before_tree = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before_tree), args.before], check=True,
                   capture_output=True)  # fmt: skip
    redis = start_redis_server(work / "redis")
    procs: list[subprocess.Popen] = []
    try:
        # Each tree builds its own compiled modules (the kernel, and since round 9 the candidate check).
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=before_tree, check=True, capture_output=True)
        n, c = WORKLOADS[args.workload]
        cfg = BenchConfig(out=work / "x.json", att_dims=(16,), workloads=(Workload(args.workload, n, c),), progress=False)
        store = SequenceStore(connect(redis.url, socket_timeout_s=30.0), lifelong_max_events=n)
        data = make_data(cfg, store, work)
        build_models(cfg, data, work / "models")
        items, cates = data.candidates[args.workload][0]
        user = data.users[args.workload][0]
        name = model_name(16, cfg.repr_dim)
        body = orjson.dumps({"user_id": user, "model": name,
                             "candidates": [{"item_id": int(i), "category_id": int(c)} for i, c in zip(items, cates)]})  # fmt: skip
        clients: dict[str, HttpClient] = {}
        for label, tree in (("before", before_tree), ("now", ROOT)):
            port = free_port()
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("DARE_")}, "DARE_REDIS_URL": redis.url,
                   "DARE_LOG_LEVEL": "warning", "PYTHONPATH": str(tree)}  # fmt: skip
            proc = subprocess.Popen([sys.executable, "-m", "dare.cli", "serve", "--models", str(work / "models"), "--port",
                                     str(port)], cwd=tree, env=env)  # fmt: skip
            procs.append(proc)
            _wait_for_port(port, proc, f"dare serve ({label})")
            clients[label] = HttpClient(port)
        floors: dict[str, HttpClient] = {}
        for kind in ("uvicorn", "raw"):
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "dare.http_floor", "--server", kind, "--port", str(port)], cwd=ROOT)
            procs.append(proc)
            _wait_for_port(port, proc, f"http_floor {kind}")
            floors[kind] = HttpClient(port)

        app = create_app(Settings(models_dir=work / "models", redis_url=redis.url, log_level="warning", request_timeout_s=60.0))
        names = ["in-process", "before", "now", "floor uvicorn", "floor raw"]
        wall: dict[str, list[float]] = {n: [] for n in names}
        stages: dict[tuple[str, str], list[float]] = {}

        async def run() -> None:
            async with app.router.lifespan_context(app):
                services = app.state.services
                model = services.registry.current.get(name)
                for label in ("before", "now"):  # warm both servers
                    for _ in range(20):
                        clients[label].score(body)
                for i in tqdm(range(args.calls), desc="rotations", file=sys.stderr):
                    k = i % len(names)
                    for n in names[k:] + names[:k]:
                        t0 = time.perf_counter()
                        if n == "in-process":
                            result = services.engine.score(user, items, cates, model=model)
                            wall[n].append(time.perf_counter() - t0)
                            timings = result.timings
                        elif n.startswith("floor"):
                            floors[n.split()[1]].get("/")
                            wall[n].append(time.perf_counter() - t0)
                            continue
                        else:
                            client = clients[n]
                            status, payload = client._exchange(client.head + str(len(body)).encode() + b"\r\n\r\n" + body)
                            wall[n].append(time.perf_counter() - t0)
                            if status != 200:
                                raise SystemExit(f"POST /score ({n}) answered {status}: {payload[:300]!r}")
                            timings = {k2: v / 1000.0 for k2, v in orjson.loads(payload)["timings_ms"].items()}
                        for stage, seconds in timings.items():
                            stages.setdefault((n, stage), []).append(seconds)

        uvloop.run(run())
        store.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_tree)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    skip = args.calls // 10
    p50 = {n: float(np.median(v[skip:])) * 1000.0 for n, v in wall.items()}
    base = p50["in-process"]
    stage_names = ("store_fetch", "id_mapping", "search", "scoring")
    load = os.getloadavg()[0]
    lines = [
        f"# POST /score over HTTP ({args.workload}), before and now, beside the in-process call (one run)",
        "",
        f"Command: `.venv/bin/python docs/bench/http_ab.py --before {args.before} --out {args.out}"
        + (f" --workload {args.workload}" if args.workload != "W1" else "") + (f" --calls {args.calls}" if args.calls != 3000 else "") + "`  ",
        f"{args.workload} request (N={n:,}, C={c}), att-16 DARE model (RANDOMLY INITIALISED), private redis-server; {args.calls} "
        f"rotations of the five calls, first {skip} dropped; p50 ms; 1-minute load average after the run {load:.2f}.",
        "",
        "| call | p50 ms | / in-process | minus in-process, ms | " + " | ".join(f"{s} (p50)" for s in stage_names) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(stage_names),
    ]
    for n, label in (("in-process", "in-process (ScoringEngine.score)"), ("before", f"POST /score, before ({args.before})"),
                     ("now", "POST /score, now"), ("floor uvicorn", "GET, bare ASGI app on uvicorn"),
                     ("floor raw", "GET, raw uvloop protocol")):  # fmt: skip
        cells = [f"{float(np.median(stages[(n, s)][skip:])) * 1000.0:.3f}" if (n, s) in stages else "" for s in stage_names]
        ratio = f"{p50[n] / base:.3f}" if not n.startswith("floor") else f"({(base + p50[n]) / base:.3f})"
        lines.append(f"| {label} | {p50[n]:.3f} | {ratio} | {p50[n] - base:.3f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "For the floors, the ratio in brackets is (in-process + floor) / in-process: the lowest POST /score / "
        "in-process ratio a service on that server could reach.",
    ]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

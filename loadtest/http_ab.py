"""A/B of POST /score over HTTP: source trees side by side, each as its own `dare serve` (1 worker), beside the
framework floor (`dare.bench.floor_app`) and this checkout's in-process engine, all on one Redis and one model folder,
called back to back in a new shuffled order every round, so that load from other processes hits all alike.

    python loadtest/http_ab.py --tree served=. --tree inline=/tmp/inline [--tree NAME=PATH@VAR=VALUE ...]
        [--workload W2] [--att-dim 16] [--rounds 1000] [--out var/http_ab.json]

What `dare bench`'s back-to-back table measures for this checkout, for any trees (e.g. a worktree with one change
made) and environment variables (`@MALLOC_ARENA_MAX=2`). Per tree: wall p50 and p90 ms, p50 / in-process p50,
(p50 - in-process p50) / floor p50, p50 less its own search stage, the server's CPU ms per call (psutil), each
stage's p50 as the answers time it, and, over a further run of back-to-back calls to that server alone, the CPU per
call of each of its threads (the event loop is the main thread). The data and RANDOMLY INITIALISED models are
`dare bench`'s (`dare.bench.make_data`, `build_models`). A tree without the compiled kernel gets it built in place
(`setup.py build_ext --inplace`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import orjson
import psutil

from dare.bench import (FULL_WORKLOADS, BenchConfig, BenchError, HttpClient, build_models, floor_server, make_data,
                        model_name, quick_config, score_body)  # fmt: skip
from dare.processes import stop_process
from loadtest.processes import start_dare_serve
from service.redis_server import RedisServer, free_port

THREAD_CALLS = 500  # back-to-back calls per server for the per-thread CPU


def parse_tree(spec: str) -> tuple[str, Path, dict[str, str]]:
    """NAME=PATH[@VAR=VALUE...] -> (name, path, environment)."""
    name, sep, rest = spec.partition("=")
    path, *pairs = rest.split("@")
    env = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    tree = Path(path).resolve()
    if not sep or not name or not all("=" in pair for pair in pairs):
        raise BenchError(f"--tree {spec!r}: expected NAME=PATH[@VAR=VALUE...]")
    if not (tree / "service" / "engine.py").is_file() or not (tree / "dare" / "cli.py").is_file():
        raise BenchError(f"--tree {spec!r}: {tree} is not a checkout of this project (no service/engine.py, dare/cli.py)")
    return name, tree, env


def ensure_kernel(tree: Path) -> None:
    if not list((tree / "service").glob("_search*.so")):
        print(f"building the search kernel in {tree} (setup.py build_ext --inplace)", file=sys.stderr)
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip


def threads_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of each thread of process `pid` (user + system)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def per_thread(port: int, pid: int, body: bytes, calls: int) -> dict[str, float]:
    """CPU ms per call of each thread busy over `calls` back-to-back calls: "loop" and the others by CPU."""
    client = HttpClient(port)  # a new connection: the old one may have idled past uvicorn's keep-alive timeout
    try:
        client.post(body)
        before = threads_cpu(pid)
        for _ in range(calls):
            client.post(body)
        after = threads_cpu(pid)
    finally:
        client.close()
    used = {tid: (after[tid] - before.get(tid, 0.0)) * 1e3 / calls for tid in after}
    others = sorted((ms for tid, ms in used.items() if tid != pid and ms > 0), reverse=True)
    return {"loop": round(used.get(pid, 0.0), 3), **{f"thread{i + 1}": round(ms, 3) for i, ms in enumerate(others)}}


def run(args: argparse.Namespace) -> dict[str, object]:
    trees = [parse_tree(spec) for spec in args.tree]
    if len({name for name, _, _ in trees}) != len(trees) or {"floor", "in_process"} & {name for name, _, _ in trees}:
        raise BenchError("--tree names must be distinct and not 'floor' or 'in_process'")
    cfg = BenchConfig(out=Path("http_ab.json"), att_dims=(args.att_dim,), quick=args.quick)
    cfg = quick_config(cfg) if args.quick else cfg
    workload = next((w for w in cfg.workloads if w.name == args.workload), None)
    if workload is None:
        raise BenchError(f"--workload must be one of {[w.name for w in FULL_WORKLOADS]}, got {args.workload!r}")
    for _, tree, _ in trees:
        ensure_kernel(tree)
    from service.engine import ScoringEngine
    from service.registry import InferenceOptions, ModelRegistry
    from service.store import SequenceStore, connect

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="http-ab-")))
        redis_server = stack.enter_context(RedisServer(work / "redis"))
        longest = max(w.history for w in cfg.workloads)
        store = SequenceStore(connect(redis_server.url, socket_timeout_s=30.0), lifelong_max_events=longest)
        stack.callback(store.close)
        data = make_data(cfg, store, work)
        build_models(cfg, data, work / "models")
        registry = ModelRegistry(work / "models", InferenceOptions(intra_op_threads=1, inter_op_threads=1))
        registry.reload()
        engine = ScoringEngine(store, registry, max_history=longest, search_threads=2)
        loaded = registry.current.get(model_name(args.att_dim, cfg.repr_dim))
        servers: dict[str, tuple[int, int]] = {}
        for name, tree, env in trees:
            port = free_port()
            env = {**os.environ, "PYTHONPATH": str(tree), "DARE_REDIS_URL": redis_server.url, "DARE_LOG_LEVEL": "warning",
                   "DARE_REQUEST_TIMEOUT_S": "60", **env}  # fmt: skip
            process = start_dare_serve(["--models", str(work / "models"), "--workers", "1"], port, work / f"{name}.log", env,
                                       error=BenchError, ready_within_s=180, cwd=tree)  # fmt: skip
            stack.callback(stop_process, process)
            servers[name] = (port, process.pid)
        servers["floor"] = stack.enter_context(floor_server(work / "floor.log"))
        clients = {name: HttpClient(port) for name, (port, _) in servers.items()}
        for client in clients.values():
            stack.callback(client.close)
        procs = {name: psutil.Process(pid) for name, (_, pid) in servers.items()}
        user = data.users[workload.name][0]
        body = score_body(cfg, data, workload.name, args.att_dim, user, 0)
        items, cates = data.candidates[workload.name][0]
        names = [*servers, "in_process"]
        wall: dict[str, list[float]] = {n: [] for n in names}
        cpu = {n: 0.0 for n in servers}
        stages: dict[str, dict[str, list[float]]] = {n: {} for n in names if n != "floor"}
        rng = random.Random(0)
        for r in range(args.warmup + args.rounds):
            rng.shuffle(names)
            for n in names:
                timed = r >= args.warmup
                if n == "in_process":
                    t0 = time.perf_counter()
                    result = engine.score(user, items, cates, model=loaded)
                    seconds, timings = time.perf_counter() - t0, {k: v * 1e3 for k, v in result.timings.items()}
                else:
                    c0 = sum(procs[n].cpu_times()[:2])
                    payload, seconds = clients[n].post(body)
                    cpu[n] += (sum(procs[n].cpu_times()[:2]) - c0) if timed else 0.0
                    timings = orjson.loads(payload)["timings_ms"] if n != "floor" else {}
                if timed:
                    wall[n].append(seconds * 1e3)
                    for stage, ms in timings.items():
                        stages[n].setdefault(stage, []).append(ms)
        rows = {}
        for n in sorted(wall, key=lambda n: (n in ("floor", "in_process"), n)):
            rows[n] = {
                "p50_ms": round(statistics.median(wall[n]), 3),
                "p90_ms": round(statistics.quantiles(wall[n], n=10)[-1], 3),
                "cpu_ms_per_call": round(cpu[n] * 1e3 / args.rounds, 3) if n in cpu else None,
                "stage_p50_ms": {s: round(statistics.median(v), 3) for s, v in stages.get(n, {}).items()},
                "thread_cpu_ms_per_call": per_thread(*servers[n], body, THREAD_CALLS) if n in servers and n != "floor" else None,
            }
    base, floor = rows["in_process"]["p50_ms"], rows["floor"]["p50_ms"]
    for name, _, _ in trees:  # the ratios of docs/performance.md ("What HTTP adds") and dare bench's targets
        row = rows[name]
        row["vs_in_process"] = round(row["p50_ms"] / base, 3)
        row["overhead_over_floor"] = round((row["p50_ms"] - base) / floor, 3)
        row["outside_search_ms"] = round(row["p50_ms"] - row["stage_p50_ms"].get("search", 0.0), 3)
    return {"workload": workload.name, "history": workload.history, "candidates": workload.candidates,
            "att_dim": args.att_dim, "rounds": args.rounds, "trees": {n: f"{t}" + "".join(f"@{k}={v}" for k, v in e.items())
                                                                       for n, t, e in trees}, "results": rows}  # fmt: skip


def markdown(report: dict[str, object]) -> str:
    rows = report["results"]
    assert isinstance(rows, dict)
    lines = [f"POST /score back to back, {report['workload']} (N = {report['history']}, C = {report['candidates']}), att "
             f"{report['att_dim']}, {report['rounds']} rounds; trees: {report['trees']}", "",
             "| | p50 ms | p90 ms | / in-process | (p50 - in-process) / floor | outside the search ms | server CPU ms / call "
             "| stage p50s (ms) | CPU ms / call by thread |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for name, row in rows.items():
        stages = ", ".join(f"{k} {v}" for k, v in row["stage_p50_ms"].items())
        threads = ", ".join(f"{k} {v}" for k, v in (row["thread_cpu_ms_per_call"] or {}).items())
        ratios = " | ".join(str(row.get(k, "")) for k in ("vs_in_process", "overhead_over_floor", "outside_search_ms"))
        lines.append(f"| {name} | {row['p50_ms']} | {row['p90_ms']} | {ratios} | {'' if row['cpu_ms_per_call'] is None else row['cpu_ms_per_call']} | {stages} | {threads} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH[@VAR=VALUE...], once per server")
    parser.add_argument("--workload", default="W2", help="W1-W4, as in dare bench (default W2)")
    parser.add_argument("--att-dim", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path, help="write the report as JSON here, and as markdown beside it (.md)")
    parser.add_argument("--quick", action="store_true", help="dare bench's quick sizes (a smoke run)")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.warmup < 0 or args.att_dim < 1:
        print("error: --rounds must be >= 2, --warmup >= 0, --att-dim >= 1", file=sys.stderr)
        return 2
    try:
        report = run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = markdown(report)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

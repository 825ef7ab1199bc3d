"""What the observability and traffic-split code adds to one POST /score with tracing off and no split, piece by
piece, against the same pieces of an older source tree (in one process; old and new interleaved, the best of
repeats, since other processes' load only ever adds time):

    python loadtest/overhead_micro.py --old /path/to/old/tree

- the request middleware (duration histogram; now also the in-flight count and the access-log switch) around a
  trivial ASGI app;
- the worker-pool call (`BlockingPool.run`, now also timing the queue wait) of a no-op, old and new interleaved;
- choosing the model (`ModelSet.get` before; `ModelSet.route` now, no split configured);
- the engine's wall-clock stamp for the stage spans (`time.time_ns`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import time
import timeit
from pathlib import Path
from types import SimpleNamespace


def load_old(tree: Path, relative: str, name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, tree / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def best_us(stmt, number: int, repeat: int = 7) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the older source tree (e.g. a worktree of main)")
    args = parser.parse_args()
    from service.api.concurrency import BlockingPool
    from service.api.concurrency import _observing_wait as observing_wait
    from service.api.middleware import RequestMetrics
    from service.metrics import ServiceMetrics
    from service.registry import ModelSet

    old_mw = load_old(args.old, "service/api/middleware.py", "old_middleware")
    old_cc = load_old(args.old, "service/api/concurrency.py", "old_concurrency")
    metrics = ServiceMetrics()
    report: dict[str, float] = {}

    # 1. the middleware around a trivial app
    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def noop_send(message):
        pass

    async def noop_receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "POST", "path": "/score", "headers": [], "state": {}}
    new = RequestMetrics(inner, metrics)
    old = old_mw.RequestMetrics(inner, metrics)  # type: ignore[attr-defined]

    def drive(mw, n):
        async def loop():
            for _ in range(n):
                await mw(scope, noop_receive, noop_send)

        return lambda: asyncio.run(loop())

    n = 5_000
    runs: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(30):  # interleaved, best of each: other processes' load only ever adds time
        for name, mw in (("old", old), ("new", new)):
            runs[name].append(timeit.timeit(drive(mw, n), number=1) / n * 1e6)
    report["middleware_old_us"], report["middleware_new_us"] = min(runs["old"]), min(runs["new"])

    # 2. BlockingPool.run of a no-op, old and new interleaved (thread hand-off included: noisy; best block)
    async def pools() -> tuple[float, float]:
        p_new = BlockingPool(4, 5.0, metrics)
        p_old = old_cc.BlockingPool(4, 5.0)  # type: ignore[attr-defined]
        blocks: dict[str, list[float]] = {"old": [], "new": []}
        try:
            for i in range(40):
                pair = [("old", p_old), ("new", p_new)]
                for name, pool in pair if i % 2 else pair[::-1]:  # alternating order
                    t0 = time.perf_counter()
                    for _ in range(250):
                        await pool.run(lambda: None, what="scoring", key="u")
                    blocks[name].append((time.perf_counter() - t0) / 250 * 1e6)
        finally:
            p_new.shutdown()
            p_old.shutdown()
        return min(blocks["old"]), min(blocks["new"])

    report["pool_run_old_us"], report["pool_run_new_us"] = asyncio.run(pools())

    # the queue-wait code alone, as run() adds it: the wrapper made per call, called in the worker
    series = metrics.queue_wait_series("scoring")

    def with_wait():
        return observing_wait(lambda: None, series, time.perf_counter(), {})()

    report["queue_wait_code_us"] = best_us(with_wait, 100_000) - best_us(lambda: (lambda: None)(), 100_000)

    # 3. choosing the model
    snapshot = ModelSet(models={"m": SimpleNamespace(name="m")}, default="m")  # type: ignore[dict-item]

    def route_and_count():
        model, by = snapshot.route(None, "user-1")
        if by == "split":
            metrics.split_series(model.name).inc()

    report["model_get_us"] = best_us(lambda: snapshot.get(None), 200_000)
    report["model_route_us"] = best_us(route_and_count, 200_000)

    # 4. the engine's stamp
    report["time_ns_us"] = best_us(time.time_ns, 1_000_000)
    for key, value in report.items():
        print(f"{key:28s} {value:8.3f}")


if __name__ == "__main__":
    main()

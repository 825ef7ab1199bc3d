"""Training steps of the previous code vs this one, side by side: two worker processes, one per code base, each with
its own prepared folder (written by its own `dare prepare`), take turns running blocks of steps (order ABBA...), so
both see the same machine load; each round starts a fresh pair, in alternating order. Per block: CPU seconds (time.process_time), wall seconds, minor and major page
faults. Both workers draw the same random batches (the same seed and, the samples being in the same order in both
layouts, the same samples).

The previous worker runs the previous trainer's loop body (its `load_prepared`, [S, L] histories gathered from RAM,
`forward_with_aux`, one Adam as it built it); this code's worker calls `training.train.train_step`, the function
`dare train` calls, on `Split.batch` batches.

usage:
  python docs/scale/step_bench.py --previous-code OLD_CHECKOUT --previous-data OLD_DIR --data NEW_DIR \\
      --rounds 4 --blocks 4 --steps 20 --out RESULT.json [--sparse-embeddings]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
BATCH = 128


def worker(data_dir: str, warmup: int, sparse: bool) -> None:
    """Load, build, warm up; then for every line "N" on stdin run N steps and print one JSON line of figures."""
    import numpy as np
    import torch
    from torch import nn

    import training.train as tt
    from training.model import build_model, parameter_groups

    torch.set_num_threads(1)
    device = torch.device("cpu")
    data = tt.load_prepared(Path(data_dir))
    options = tt.TrainOptions(sparse_embeddings=sparse) if sparse else tt.TrainOptions()
    tt.seed_everything(options.seed)
    model = build_model(tt.build_configs(options, data).model)
    loss_fn = nn.BCEWithLogitsLoss()
    current = hasattr(tt, "train_step")
    if current:
        from training.memory import keep_step_memory_mapped

        keep_step_memory_mapped()  # as train() does before its first step
        optimizers = tt.build_optimizers(model, options)

        def step(rows: np.ndarray) -> None:
            tt.train_step(model, optimizers, loss_fn, data.train, rows, device, options)
    else:  # the previous trainer's loop body (training/train.py at the previous commit), verbatim in substance
        if sparse:
            raise SystemExit("the previous code has no sparse embeddings")
        embedding, dense = parameter_groups(model)
        optimizer = torch.optim.Adam(
            [{"params": embedding, "weight_decay": 0.0}, {"params": dense, "weight_decay": options.l2}], lr=options.lr
        )

        def step(rows: np.ndarray) -> None:
            hist_item, hist_cate, cand_item, cand_cate = (
                torch.from_numpy(getattr(data.train, name)[rows]).to(device)
                for name in ("hist_item", "hist_cate", "cand_item", "cand_cate")
            )
            label = torch.from_numpy(data.train.label[rows]).to(device)
            model.train()
            logits, aux_logits = model.forward_with_aux(hist_item, hist_cate, cand_item, cand_cate)
            loss = loss_fn(logits, label) + options.aux_weight * loss_fn(aux_logits, label)
            if not torch.isfinite(loss):
                raise SystemExit("loss not finite")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()

    rng = np.random.default_rng(0)
    for _ in range(warmup):
        step(rng.integers(0, data.train.rows, BATCH))
    print(json.dumps({"ready": True, "code": str(Path(tt.__file__).parents[1]), "train_rows": data.train.rows}), flush=True)
    for line in sys.stdin:
        steps = int(line)
        usage0, cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        for _ in range(steps):
            step(rng.integers(0, data.train.rows, BATCH))
        wall, cpu, usage = time.perf_counter() - wall0, time.process_time() - cpu0, resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"samples": steps * BATCH, "cpu_s": cpu, "wall_s": wall,
                          "minor_faults": usage.ru_minflt - usage0.ru_minflt,
                          "major_faults": usage.ru_majflt - usage0.ru_majflt}), flush=True)  # fmt: skip


def start(name: str, code: Path, data: str, warmup: int, sparse: bool) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(HERE), "--worker", data, "--warmup", str(warmup)] + (["--sparse-embeddings"] if sparse else [])
    proc = subprocess.Popen(cmd, env=env, cwd=code, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
    print(f"{name}: code {ready['code']}, {ready['train_rows']:,} training samples", flush=True)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker")
    parser.add_argument("--previous-code", type=Path)
    parser.add_argument("--previous-data")
    parser.add_argument("--data")
    parser.add_argument("--rounds", type=int, default=4, help="pairs of fresh worker processes")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per code base and round")
    parser.add_argument("--steps", type=int, default=20, help="steps of 128 samples per block")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before the first block")
    parser.add_argument("--sparse-embeddings", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.warmup, args.sparse_embeddings)
        return
    if not (args.previous_code and args.previous_data and args.data and args.out):
        parser.error("--previous-code, --previous-data, --data and --out are required")
    blocks: dict[str, list[dict[str, float]]] = {"previous": [], "current": []}
    loads, round_ratios = [], []
    for r in range(args.rounds):
        # Fresh worker processes each round, started in alternating order: two processes running the same code
        # differ by several per cent (their heaps and page faults differ), so one pair of processes is not enough.
        order = ("previous", "current") if r % 2 == 0 else ("current", "previous")
        workers = {}
        for name in order:
            code, data = (args.previous_code.resolve(), args.previous_data) if name == "previous" else (REPO, args.data)
            workers[name] = start(name, code, data, args.warmup, args.sparse_embeddings)
        mine: dict[str, list[dict[str, float]]] = {"previous": [], "current": []}
        for b in range(args.blocks):
            for name in order if b % 2 == 0 else order[::-1]:
                proc = workers[name]
                proc.stdin.write(f"{args.steps}\n")  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
                mine[name].append(json.loads(proc.stdout.readline()))  # type: ignore[union-attr]
            loads.append(os.getloadavg()[0])
        for proc in workers.values():
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait()
        rate = {n: sum(x["samples"] for x in rows) / sum(x["cpu_s"] for x in rows) for n, rows in mine.items()}
        round_ratios.append(rate["current"] / rate["previous"])
        print(f"round {r + 1}: current / previous CPU rate {round_ratios[-1]:.3f}", flush=True)
        for name in blocks:
            blocks[name] += mine[name]
    summary = {}
    for name, rows in blocks.items():
        summary[name] = {
            "blocks": len(rows),
            "samples_per_cpu_second_median": statistics.median(r["samples"] / r["cpu_s"] for r in rows),
            "samples_per_wall_second_median": statistics.median(r["samples"] / r["wall_s"] for r in rows),
            "samples_per_cpu_second_total": sum(r["samples"] for r in rows) / sum(r["cpu_s"] for r in rows),
            "minor_faults_per_step_median": statistics.median(r["minor_faults"] / args.steps for r in rows),
            "major_faults_total": sum(r["major_faults"] for r in rows),
        }
    ratio = {k: summary["current"][k] / summary["previous"][k] for k in
             ("samples_per_cpu_second_median", "samples_per_wall_second_median")}  # fmt: skip
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "data": args.data,
              "previous_data": args.previous_data, "previous_code": str(args.previous_code), "batch": BATCH,
              "rounds": args.rounds, "steps_per_block": args.steps,
              "round_cpu_ratios_current_over_previous": round_ratios, "sparse_embeddings": args.sparse_embeddings,
              "load_average_1min": loads, "host": platform.node(), "summary": summary, "current_over_previous": ratio,
              "blocks": blocks}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, s in summary.items():
        print(f"{name:9s} median {s['samples_per_cpu_second_median']:8,.0f} samples per CPU-second, "
              f"{s['samples_per_wall_second_median']:8,.0f} samples/s wall, "
              f"{s['minor_faults_per_step_median']:,.0f} minor faults per step")  # fmt: skip
    print(f"current / previous: CPU {ratio['samples_per_cpu_second_median']:.3f} (rounds: median "
          f"{statistics.median(round_ratios):.3f}, {min(round_ratios):.3f}-{max(round_ratios):.3f})"
          f", wall {ratio['samples_per_wall_second_median']:.3f}"
          f" -> {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()

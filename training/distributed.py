"""Data-parallel `dare train`: `dare train --nproc N` starts N processes with torchrun (`torch.distributed.run`), each
running `python -m training.distributed`, which joins the process group (gloo on CPU, NCCL on CUDA) and calls
`training.train.train`; that function shards every batch over the ranks and wraps the model in
DistributedDataParallel (see its docstring). The equivalent by hand:

    torchrun --standalone --nproc-per-node 2 -m training.distributed --data DIR --out RUN --options '{"seed": 0}'

`--options` is TrainOptions as JSON (fields left out keep their defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dare_common import DareError
from training.train import TrainError, TrainOptions, load_prepared, resolve_device, train

# A rank waits this long for the others at a collective (rank 0's validation pass on a large split included).
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def options_from_json(text: str) -> TrainOptions:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainError(f"--options: not valid JSON: {exc}") from None
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    if not isinstance(raw, dict) or set(raw) - known:
        raise TrainError(f"--options: must be a JSON object with TrainOptions fields; unknown: {sorted(set(raw) - known) if isinstance(raw, dict) else raw!r}")
    return TrainOptions(**raw)


def launch(data: Path, options: TrainOptions, out: Path, nproc: int, *, progress: bool = True) -> dict[str, object]:
    """Run `train` in `nproc` processes under torchrun; return rank 0's metrics.json. Options and data are checked
    here first, so a bad option or folder is one clean error, not one per rank."""
    if nproc < 1:
        raise TrainError(f"--nproc must be >= 1, got {nproc}")
    if nproc > 1 and options.sparse_embeddings and options.device.startswith("cuda"):
        raise TrainError(
            "--sparse-embeddings with --nproc > 1 on CUDA: NCCL cannot all-reduce sparse gradients; train GPUs with "
            "dense gradients, or shard the tables with TorchRec (docs/scale.md)"
        )
    device = resolve_device(options.device)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise TrainError(f"--nproc {nproc} with --device cuda needs {nproc} GPUs, this machine has {torch.cuda.device_count()}")
    data_info = load_prepared(Path(data))
    if data_info.train.rows < nproc:
        raise TrainError(f"--nproc {nproc}: the training split has only {data_info.train.rows} samples")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "training.distributed", "--data", str(data), "--out", str(out),
        "--options", json.dumps(dataclasses.asdict(options)),
    ]  # fmt: skip
    if not progress:
        command.append("--quiet")
    env = dict(os.environ)
    # Each rank gets its share of the cores (torchrun would otherwise leave every rank one thread and warn).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise TrainError(f"data-parallel training (--nproc {nproc}) failed with exit code {result.returncode}; see the messages above")
    try:
        return json.loads((Path(out) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainError(f"{out}: the ranks finished but metrics.json is unreadable: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    """One rank: join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR ... in the environment)."""
    parser = argparse.ArgumentParser(prog="python -m training.distributed", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise TrainError("python -m training.distributed must be started by torchrun (or use `dare train --nproc N`)")
        options = options_from_json(args.options)
        device = resolve_device(options.device)
        dist.init_process_group(backend=backend_for(device), timeout=COLLECTIVE_TIMEOUT)
        try:
            train(args.data, options, args.out, progress=not args.quiet)
            # Leave together. A gloo worker thread can still hold the last reference to the tensors of a rank's last
            # collective (the metrics gather) just after the rank returns from it; destroy_process_group does not
            # join those threads (torch keeps the group alive, e.g. in torch.distributed.nn's default arguments),
            # so a rank that exits at once (rank 1: rank 0 still evaluates test) can drop them during interpreter
            # shutdown: no GIL to take, std::terminate, SIGABRT. The barrier's tensor has no Python object, and
            # the wait lets the workers let go. Not in `finally`: after a failure the peers may never arrive.
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except DareError as exc:
        print(f"error (rank {os.environ.get('RANK', '?')}): {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    # Then leave without the C++ teardown: a gloo thread that torch never joins can still be alive when the process
    # runs its static destructors, and destroying it there calls std::terminate (SIGABRT, "terminate called
    # without an active exception"; seen once in a full test run even with the barrier above). Everything this rank
    # wrote is closed by now; the streams and log handlers are flushed here, since _exit skips that.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

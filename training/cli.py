"""Training-side commands: prepare, synth, train, compare, export. Implementations are imported lazily
so that `dare --help` and the serving commands never pay for torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dare_common import DareError
from dare_common import int_list, renamed
from training.config import PrepareConfig


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare)
    app.command("synth")(synth)
    app.command("bench-prepare")(bench_prepare)
    app.command("train")(train)
    app.command("compare")(compare)
    app.command("curve")(curve)
    app.command("export")(export)


_PREP = PrepareConfig()


def prepare(
    out: Annotated[Path, typer.Option("--out", help="folder for samples, vocabularies and meta.json")],
    input: Annotated[
        Optional[Path],
        typer.Option("--input", help="Taobao-format CSV (.csv or .csv.gz), no header; default: the bundled real sample"),
    ] = None,
    behaviors: Annotated[str, typer.Option(help="behaviour types to keep, comma-separated (pv,cart,fav,buy)")] = ",".join(
        _PREP.behaviors
    ),
    min_events: Annotated[int, typer.Option(help="drop users with fewer kept events")] = _PREP.min_events,
    history_len: Annotated[int, typer.Option(help="behaviours before each target, left-padded")] = _PREP.history_len,
    positives_per_user: Annotated[int, typer.Option(help="training targets per user (fewer if short)")] = _PREP.positives_per_user,
    positive_stride: Annotated[int, typer.Option(help="events between training targets")] = _PREP.positive_stride,
    negatives: Annotated[int, typer.Option(help="sampled negatives per positive")] = _PREP.negatives_per_positive,
    min_timestamp: Annotated[int, typer.Option(help="drop rows before this Unix time")] = _PREP.min_timestamp,
    max_timestamp: Annotated[int, typer.Option(help="drop rows at or after this Unix time")] = _PREP.max_timestamp,
    seed: Annotated[int, typer.Option(help="seed for negative sampling")] = _PREP.seed,
    progress: Annotated[bool, typer.Option(help="show progress on stderr")] = True,
) -> None:
    """Build training/validation/test samples from a Taobao-format behaviour log."""
    from training.prepare import prepare as run_prepare

    cfg = PrepareConfig(
        behaviors=tuple(b.strip() for b in behaviors.split(",") if b.strip()),
        min_events=min_events,
        history_len=history_len,
        positives_per_user=positives_per_user,
        positive_stride=positive_stride,
        negatives_per_positive=negatives,
        min_timestamp=min_timestamp,
        max_timestamp=max_timestamp,
        seed=seed,
    )
    result = run_prepare(cfg, input, out, progress=progress)
    meta = result.meta
    counts: dict = meta["counts"]  # type: ignore[assignment]
    if result.synthetic:
        typer.secho("SYNTHETIC data (planted structure, not real behaviour): truth.npz written", fg=typer.colors.YELLOW)
    typer.echo(f"input     {meta['input']['path']}")  # type: ignore[index]
    dropped = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items() if v)
    typer.echo(f"rows      {counts['rows_read']} read, {counts['rows_kept']} kept; dropped: {dropped or 'none'}")
    typer.echo(
        f"vocab     {counts['users']} users, {counts['items']} items, {counts['categories']} categories "
        f"({counts['items_with_multiple_categories']} item(s) with several categories -> most frequent kept)"
    )
    typer.echo("samples   " + ", ".join(f"{k} {v}" for k, v in counts["samples"].items()))
    typer.echo(f"time      {meta['seconds']['total']} s ({meta['rows_per_second']:,.0f} rows/s)")  # type: ignore[index]
    typer.echo(f"wrote     {out}/sequences/, {{train,val,test}}/, vocab.npz, item_cate.npy, meta.json")


def synth(
    out: Annotated[Path, typer.Option("--out", help="CSV file to write (.csv or .csv.gz); truth goes to FILE.truth.npz")],
    users: Annotated[int, typer.Option(help="number of users")] = 1000,
    events_per_user: Annotated[int, typer.Option(help="events per user (10k-50k for lifelong sequences)")] = 200,
    categories: Annotated[int, typer.Option(help="number of categories")] = 100,
    items: Annotated[int, typer.Option(help="number of items (Zipf popularity, one category each)")] = 20000,
    interests: Annotated[int, typer.Option(help="interest categories per user")] = 4,
    related: Annotated[int, typer.Option(help="related categories per category in the relation matrix")] = 3,
    decay: Annotated[float, typer.Option(help="relevance decay per position: decay[p] = DECAY**(p-1)")] = 0.9,
    explore: Annotated[float, typer.Option(help="share of events drawn from the user's interests")] = 0.2,
    zipf: Annotated[float, typer.Option(help="Zipf exponent of item popularity")] = 1.1,
    seed: Annotated[int, typer.Option(help="random seed: the same seed gives the same log")] = 0,
    progress: Annotated[bool, typer.Option(help="show progress on stderr")] = True,
) -> None:
    """Write a SYNTHETIC Taobao-format log with planted structure and its ground-truth relevance table."""
    from training.synth import SynthConfig, write_log

    cfg = SynthConfig(
        users=users,
        events_per_user=events_per_user,
        categories=categories,
        items=items,
        interests_per_user=interests,
        related_per_category=related,
        decay=decay,
        explore=explore,
        zipf=zipf,
        seed=seed,
    )
    result = write_log(cfg, out, progress=progress)
    typer.secho(
        f"SYNTHETIC log (planted structure, not real behaviour): {result.rows} rows -> {result.log}",
        fg=typer.colors.YELLOW,
    )
    typer.echo(f"ground truth -> {result.truth}  ({result.seconds:.1f} s)")


def bench_prepare(
    out: Annotated[Path, typer.Option("--out", help="JSON file for the figures (a PNG of the stages goes beside it)")],
    rows: Annotated[int, typer.Option(help="rows of the generated synthetic log")] = 10_000_000,
    events_per_user: Annotated[int, typer.Option(help="events per synthetic user")] = 500,
    work: Annotated[
        Optional[Path], typer.Option("--work", help="where the log and prepared data go (default: a temporary folder, removed after)")
    ] = None,
    progress: Annotated[bool, typer.Option(help="show progress on stderr")] = True,
    work_dir: Annotated[Optional[Path], typer.Option("--work-dir", hidden=True)] = None,  # the old spelling of --work
) -> None:
    """Measure `dare prepare` throughput (rows/s) on a generated SYNTHETIC log; write JSON + PNG."""
    from training.prepare import benchmark

    work_dir = renamed("--work-dir", "--work", work_dir) or work
    report = benchmark(rows, events_per_user, out, work_dir=work_dir, progress=progress)
    typer.echo(
        f"prepare: {report['rows']:,} rows in {report['prepare_seconds']:.1f} s = {report['rows_per_second']:,.0f} rows/s "
        f"(synthetic log, {report['events_per_user']} events/user) -> {out}"
    )


def train(
    data: Annotated[Path, typer.Option("--data", help="folder written by `dare prepare`")],
    out: Annotated[Path, typer.Option("--out", help="run folder: checkpoint, config.json, metrics.json")],
    model: Annotated[str, typer.Option("--model", help="dare, twin or twin-proj")] = "dare",
    att_dim: Annotated[int, typer.Option("--att-dim", help="per-field attention embedding dim")] = 16,
    repr_dim: Annotated[Optional[int], typer.Option("--repr-dim", help="per-field representation dim, dare only (default: the att dim)")] = None,
    topk: Annotated[int, typer.Option("--topk", help="behaviours retrieved by the search stage")] = 20,
    epochs: Annotated[int, typer.Option("--epochs", help="maximum epochs (early stopping usually ends training first)")] = 20,
    patience: Annotated[int, typer.Option("--patience", help="stop after this many validation passes without a better AUC")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 128,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate")] = 0.01,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    aux_loss: Annotated[bool, typer.Option("--aux-loss/--no-aux-loss", help="the auxiliary loss over all positions (on in the reference)")] = True,
    search: Annotated[str, typer.Option("--search", help="topk (the model's search) or recency (the K most recent: an ablation)")] = "topk",
    evals_per_epoch: Annotated[int, typer.Option("--evals-per-epoch", help="validation passes per epoch")] = 4,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="fp32, or bf16 (autocast the forward passes; CUDA, and CPU where supported)")] = "fp32",
    max_samples: Annotated[Optional[int], typer.Option("--max-samples", help="stop after this many training samples (a budget for very large data)")] = None,
    sparse_embeddings: Annotated[bool, typer.Option("--sparse-embeddings", help="sparse embedding gradients + SparseAdam (rows in the batch only; for very large item tables)")] = False,
    nproc: Annotated[int, typer.Option("--nproc", help="data-parallel processes (torchrun + DistributedDataParallel; gloo on CPU, NCCL on CUDA)")] = 1,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars on stderr")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", hidden=True)] = False,  # the old spelling of --no-progress
) -> None:
    """Train DARE, TWIN or TWIN-proj; keep the best checkpoint by validation AUC; write metrics.json."""
    from training.train import TrainOptions, train as run_train

    options = TrainOptions(
        model=model, att_dim=att_dim, repr_dim=repr_dim, top_k=topk, epochs=epochs, batch_size=batch_size, lr=lr,
        seed=seed, aux_loss=aux_loss, device=device, evals_per_epoch=evals_per_epoch, patience=patience, search=search,
        precision=precision, max_samples=max_samples, sparse_embeddings=sparse_embeddings,
    )  # fmt: skip
    progress = progress and not renamed("--quiet", "--no-progress", quiet)
    if nproc != 1:
        from training.distributed import launch

        m = launch(data, options, out, nproc, progress=progress)
    else:
        m = run_train(data, options, out, progress=progress).metrics
    ndcg = m["test_ndcg_at_k"]
    typer.echo(
        f"{out}: test AUC {m['test_auc']:.4f}, GAUC {m['test_gauc']:.4f}, logloss {m['test_logloss']:.4f}, "
        f"NDCG@{m['ndcg_k']} {'n/a' if ndcg is None else f'{ndcg:.4f}'} ({m['ndcg_truth']}); "
        f"best val AUC {m['val_auc']:.4f} at step {m['best_step']}/{m['steps']} (epoch {m['best_epoch']}), "
        f"stopped by {m['stop_reason']}; {m['train_seconds']:.0f} s ({m['train_samples_per_second']:,.0f} training samples/s)"
    )


def compare(
    data: Annotated[Path, typer.Option("--data", help="folder written by `dare prepare`")],
    out: Annotated[Path, typer.Option("--out", help="folder for runs, results.md and the charts")],
    seeds: Annotated[int, typer.Option("--seeds", help="seeds per grid row: 0..N-1 (paired across rows)")] = 5,
    att_dims: Annotated[str, typer.Option("--att-dims", help="comma-separated dims; every model runs at att = repr = d")] = "16,32,64",
    decoupled: Annotated[str, typer.Option("--decoupled", help="extra DARE rows att:repr, comma-separated ('' for none)")] = "16:64",
    models: Annotated[str, typer.Option("--models", help="comma-separated: dare,twin,twin-proj,dare-recency")] = "dare,twin,twin-proj,dare-recency",
    topk: Annotated[int, typer.Option("--topk")] = 20,
    epochs: Annotated[int, typer.Option("--epochs", help="maximum epochs per run (early stopping usually ends it first)")] = 20,
    patience: Annotated[int, typer.Option("--patience", help="validation passes without a better AUC before stopping")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 128,
    lr: Annotated[float, typer.Option("--lr")] = 0.01,
    aux_loss: Annotated[bool, typer.Option("--aux-loss/--no-aux-loss")] = True,
    evals_per_epoch: Annotated[int, typer.Option("--evals-per-epoch")] = 4,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda")] = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars on stderr")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", hidden=True)] = False,  # the old spelling of --no-progress
) -> None:
    """Train DARE, TWIN, TWIN-proj and DARE-recency over seeds and dims beside model-free baselines; write a table,
    paired differences, a verdict per paper claim, and charts."""
    import shlex
    import sys

    from training.compare import CompareOptions, compare as run_compare

    pairs = []
    for part in (p.strip() for p in decoupled.split(",") if p.strip()):
        att, sep, rep = part.partition(":")
        if not sep or not att.strip().isdigit() or not rep.strip().isdigit():
            raise DareError(f"--decoupled: {part!r} is not att:repr (e.g. 16:64)")
        pairs.append((int(att), int(rep)))
    options = CompareOptions(
        models=tuple(m.strip() for m in models.split(",") if m.strip()), att_dims=int_list("--att-dims", att_dims),
        decoupled=tuple(pairs), seeds=seeds, top_k=topk, epochs=epochs, patience=patience, batch_size=batch_size,
        lr=lr, aux_loss=aux_loss, device=device, evals_per_epoch=evals_per_epoch,
    )  # fmt: skip
    command = shlex.join(["dare", *sys.argv[1:]])
    progress = progress and not renamed("--quiet", "--no-progress", quiet)
    result = run_compare(data, options, out, command=command, progress=progress)
    typer.echo(result.markdown)
    typer.echo(f"wrote {out}/results.md, results.json, results.png, learning_curves.png ({len(result.runs)} runs)")


def curve(
    data: Annotated[Path, typer.Option("--data", help="folder written by `dare prepare`")],
    out: Annotated[Path, typer.Option("--out", help="folder for runs, curve.md, curve.json and curve.png")],
    rows: Annotated[str, typer.Option("--rows", help="comma-separated label:att:repr (labels as in dare compare)")] = "dare:16:16,twin:16:16",
    fractions: Annotated[str, typer.Option("--fractions", help="comma-separated shares of the training users")] = "0.25,0.5,1",
    seeds: Annotated[int, typer.Option("--seeds")] = 3,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars on stderr")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", hidden=True)] = False,  # the old spelling of --no-progress
) -> None:
    """Test AUC vs training-set size for a few models beside the model-free baselines (is it the model or the data?)."""
    import shlex
    import sys

    from training.curve import CurveOptions, curve as run_curve

    parsed = []
    for part in (p.strip() for p in rows.split(",") if p.strip()):
        bits = part.split(":")
        if len(bits) != 3 or not bits[1].isdigit() or not bits[2].isdigit():
            raise DareError(f"--rows: {part!r} is not label:att:repr (e.g. dare:16:64)")
        parsed.append((bits[0], int(bits[1]), int(bits[2])))
    try:
        shares = tuple(float(f) for f in fractions.split(",") if f.strip())
    except ValueError:
        raise DareError(f"--fractions: {fractions!r} is not a comma-separated list of numbers") from None
    options = CurveOptions(rows=tuple(parsed), fractions=shares, seeds=seeds)
    progress = progress and not renamed("--quiet", "--no-progress", quiet)
    result = run_curve(data, options, out, command=shlex.join(["dare", *sys.argv[1:]]), progress=progress)
    typer.echo((out / "curve.md").read_text(encoding="utf-8"))
    typer.echo(f"wrote {out}/curve.md, curve.json, curve.png ({sum(len(p['runs']) for p in result['points'])} runs)")  # type: ignore[attr-defined]


def export(
    run: Annotated[Path, typer.Option("--run", help="run folder written by `dare train`")],
    out: Annotated[Path, typer.Option("--out", help="model folder to write (manifest.json, *.onnx, vocab.npz)")],
    name: Annotated[Optional[str], typer.Option("--name", help="model name in the manifest [default: <kind>-att<d>]")] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (13..20)")] = 17,
) -> None:
    """Export a trained run to ONNX + manifest.json, verified against PyTorch."""
    from training.export import export_run

    manifest = export_run(run, out, name=name, opset=opset)
    worst = max(p.max_abs_diff for p in manifest.parity)
    typer.echo(
        f"wrote {out}: {manifest.name} version {manifest.version} ({manifest.model_kind}, att {manifest.att_dim}, "
        f"repr {manifest.repr_dim}, top-{manifest.top_k}); parity onnxruntime vs torch max abs diff {worst:.2g} "
        f"over {len(manifest.parity)} checks"
    )

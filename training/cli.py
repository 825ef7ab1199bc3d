"""Training-side commands: prepare, synth, train, compare, export. Implementations are imported lazily
so that `dare --help` and the serving commands never pay for torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare)
    app.command("synth")(synth)
    app.command("train")(train)
    app.command("compare")(compare)
    app.command("export")(export)


def prepare(
    input: Annotated[Path, typer.Option("--input", help="Taobao-format CSV (.csv or .csv.gz), no header")],
    out: Annotated[Path, typer.Option("--out", help="folder for samples, vocabularies and meta.json")],
) -> None:
    """Build training/validation/test samples from a Taobao-format behaviour log."""
    raise NotImplementedError("owned by the data work package")


def synth(
    out: Annotated[Path, typer.Option("--out", help="CSV file to write (.csv or .csv.gz)")],
) -> None:
    """Write a SYNTHETIC Taobao-format log with planted structure and its ground-truth relevance table."""
    raise NotImplementedError("owned by the data work package")


def train(
    data: Annotated[Path, typer.Option("--data", help="folder written by `dare prepare`")],
    out: Annotated[Path, typer.Option("--out", help="run folder: checkpoint, config.json, metrics.json")],
) -> None:
    """Train DARE, TWIN or TWIN-proj; keep the best checkpoint by validation AUC; write metrics.json."""
    raise NotImplementedError("owned by the training work package")


def compare(
    data: Annotated[Path, typer.Option("--data", help="folder written by `dare prepare`")],
    out: Annotated[Path, typer.Option("--out", help="folder for runs, results.md and results.png")],
) -> None:
    """Train DARE, TWIN and TWIN-proj over seeds and attention dims; write a table and a chart."""
    raise NotImplementedError("owned by the training work package")


def export(
    run: Annotated[Path, typer.Option("--run", help="run folder written by `dare train`")],
    out: Annotated[Path, typer.Option("--out", help="model folder to write (manifest.json, *.onnx, vocab.npz)")],
) -> None:
    """Export a trained run to ONNX + manifest.json, verified against PyTorch."""
    raise NotImplementedError("owned by the model/export work package")

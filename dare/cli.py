"""`dare ...`: composes the commands of each half. Heavy imports (torch, onnxruntime) happen inside commands."""

from __future__ import annotations

import sys

import typer

from dare_common import DareError

app = typer.Typer(
    name="dare",
    help="DARE long-sequence CTR: prepare data, train, export to ONNX, serve, benchmark and load-test.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from training.cli import register as register_training
    from service.cli import register as register_service
    from loadtest.cli import register as register_loadtest
    from dare.demo import register as register_demo
    from dare.bench import register as register_bench

    register_training(app)
    register_service(app)
    register_loadtest(app)
    register_demo(app)
    register_bench(app)


def main() -> None:
    _register()
    try:
        app()
    except DareError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

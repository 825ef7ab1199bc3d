"""`dare ...`: composes the commands of each half. Heavy imports (torch, onnxruntime) happen inside commands."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from dare_common import DareError, __version__

app = typer.Typer(
    name="dare",
    help="DARE long-sequence CTR: prepare data, train, export to ONNX, serve, benchmark and load-test.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dare {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="print the version and exit", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """The group's own options (its help text is the Typer's `help`)."""


def _command():
    """The click command of `app`. A flag takes no value, so its help shows no type: Typer's help would show
    `<bool>` for one without a --no- form (and for --help itself), so their metavar is set to nothing."""
    command = typer.main.get_command(app)
    for cmd in [command, *command.commands.values()]:
        for param in [*cmd.params, cmd.get_help_option(typer.Context(cmd))]:
            if param is not None and getattr(param, "is_flag", False):
                param.metavar = ""
    return command


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
        _command()(prog_name="dare")
    except DareError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

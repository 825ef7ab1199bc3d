"""`dare ...`: composes the commands of each half. Heavy imports (torch, onnxruntime) happen inside commands."""

from __future__ import annotations

import importlib
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


# The module whose `register(app)` adds each subcommand. `dare <command>` imports only its own module, so a command
# does not pay for importing (and, without bytecode caches, compiling) all the others; `dare --help` imports all.
COMMANDS = {
    **dict.fromkeys(("prepare", "synth", "bench-prepare", "train", "compare", "curve", "export"), "training.cli"),
    **dict.fromkeys(("serve", "load"), "service.cli"),
    **dict.fromkeys(("loadtest", "soak"), "loadtest.cli"),
    "demo": "dare.demo",
    "bench": "dare.bench",
}


def _register(command: str | None = None) -> None:
    """Add `command`'s module's subcommands to `app`, or every module's for None or a name that is not a command."""
    modules = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for module in modules:
        importlib.import_module(module).register(app)


def main() -> None:
    # The root takes no option with a value, so the first word that is not an option names the subcommand.
    _register(next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None))
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

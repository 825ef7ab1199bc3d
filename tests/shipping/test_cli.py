"""The `dare` command surface: --version, one option name for one thing across every subcommand, no `<bool>` in
help, the old spellings hidden but working, and `dare serve` on a busy port failing fast in one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import typer

from dare_common import __version__, renamed
from tests.shipping.conftest import ROOT, dare_help, dare_subcommands, pyproject

# The one spelling of each thing, and the spellings it replaced (kept as hidden, deprecated aliases).
CANONICAL = {"--redis": "--redis-url", "--progress": "--quiet", "--work": "--work-dir", "--input": "--sample"}
# One name, two meanings, on purpose: `compare --models` lists model kinds (the plural of `train --model`), every other
# `--models` is the folder of model folders; `curve --rows` are table rows, `bench-prepare --rows` log rows.
SAME_NAME_OTHER_TYPE = {("--models", "compare"), ("--rows", "curve")}


def dare(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dare.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def commands() -> dict:
    import dare.cli

    dare.cli._register()
    return dare.cli._command().commands


def test_version() -> None:
    result = dare("--version")
    assert result.returncode == 0 and result.stdout == f"dare {__version__}\n", result
    assert __version__ == pyproject()["project"]["version"]


def test_help_shows_no_bool_metavar() -> None:
    assert {"serve", "train", "demo", "bench"} <= dare_subcommands()
    for sub in ["", *sorted(dare_subcommands())]:
        text = dare_help(*([sub] if sub else []))
        assert "<bool>" not in text and "BOOLEAN" not in text, f"dare {sub} --help:\n{text}"
    assert "--version" in dare_help()


def test_one_option_name_means_one_thing() -> None:
    types: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    hidden: dict[str, set[str]] = defaultdict(set)
    for name, command in commands().items():
        for param in command.params:
            if param.param_type_name != "option":
                continue
            if param.hidden:
                hidden[name].update(param.opts)
                continue
            shown = "flag" if param.is_flag else param.display_type(typer.Context(command))
            for opt in (*param.opts, *param.secondary_opts):
                visible = [o for o in (*param.opts, *param.secondary_opts) if not o.startswith("--no-")]
                assert opt not in CANONICAL.values(), f"dare {name} shows the old spelling {opt}"
                if (opt, name) not in SAME_NAME_OTHER_TYPE:
                    types[opt][shown].add(name)
            if "--progress" in visible:
                assert param.secondary_opts == ["--no-progress"], f"dare {name}: {param.opts} {param.secondary_opts}"
    mixed = {opt: dict(by_type) for opt, by_type in types.items() if len(by_type) > 1}
    assert not mixed, f"one option name, several types: {mixed}"
    assert {"serve", "load", "demo"} <= types["--redis"]["<str>"], types["--redis"]
    assert {"train", "compare", "curve", "load", "bench", "prepare"} <= types["--progress"]["flag"]
    assert {"demo", "bench", "bench-prepare", "loadtest", "soak"} <= set().union(*types["--work"].values())
    # The old spellings are still accepted, hidden, where they existed.
    assert {"--redis-url", "--sample"} <= hidden["demo"] and "--quiet" in hidden["train"]
    assert "--work-dir" in hidden["bench"] and "--data" in hidden["soak"]


def test_an_old_spelling_still_works_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    assert renamed("--quiet", "--no-progress", True) is True
    assert "warning: --quiet is deprecated, use --no-progress" in capsys.readouterr().err
    assert renamed("--quiet", "--no-progress", False) is False and renamed("--x", "--y", None) is None
    assert capsys.readouterr().err == ""
    # Through the real command: the alias is parsed, noted, and the command goes on to its own input check.
    result = dare("train", "--quiet", "--data", "/nonexistent/prepared", "--out", "/nonexistent/run")
    assert "warning: --quiet is deprecated, use --no-progress" in result.stderr
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_serve_on_a_busy_port_fails_in_one_line_before_starting_anything(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DARE_")}
        env["DARE_DATA_DIR"] = str(tmp_path / "var")  # the embedded Redis would create it
        began = time.monotonic()
        result = dare("serve", "--models", str(tmp_path / "models"), "--port", str(port), env=env)
        seconds = time.monotonic() - began
    assert result.returncode == 2, result
    assert result.stderr == f"error: port {port} on 127.0.0.1 is already in use (pass --port or set DARE_PORT)\n"
    assert result.stdout == ""
    assert not (tmp_path / "var").exists(), "the embedded Redis was started before the port was checked"
    assert seconds < 30
    bad_host = dare("serve", "--models", str(tmp_path / "models"), "--host", "no-such-host.invalid", env=env)
    assert bad_host.returncode == 2 and len(bad_host.stderr.splitlines()) == 1
    assert bad_host.stderr.startswith("error: --host no-such-host.invalid: cannot resolve it")


def test_each_command_is_registered_by_the_module_the_cli_imports_for_it() -> None:
    import importlib

    import dare.cli

    for module in dict.fromkeys(dare.cli.COMMANDS.values()):
        app = typer.Typer()
        importlib.import_module(module).register(app)
        names = {c.name for c in app.registered_commands}
        assert names == {c for c, m in dare.cli.COMMANDS.items() if m == module}, module
    assert set(dare.cli.COMMANDS) == set(commands())

"""Serving-side commands: serve, load, bench. Never imports torch or `training`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Owned by the serving work package: adds `serve`, `load` and `bench`."""

"""`dare demo`: the README's first command, end to end on the bundled sample."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Owned by the shipping work package: adds `demo`."""

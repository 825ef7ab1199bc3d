"""Load-test commands (Locust, headless)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Owned by the shipping work package: adds `loadtest` (and the soak command)."""

"""What every half of the project shares, below all of them: the version, the one exception family that the CLI
turns into a clean message (no traceback) and exit code 2, and the parsing of comma-separated options.

service/, training/, loadtest/ and the `dare` CLI import this; it imports none of them."""

from __future__ import annotations

import sys

__version__ = "0.1.0"


class DareError(Exception):
    """Bad input a user can act on: a malformed file, a missing folder, an option out of range."""


def renamed(old: str, new: str, value):
    """The value of a hidden option spelling kept for old scripts (`--quiet` -> `--no-progress`), with a note on
    stderr when it is used; every command shows the new spelling only."""
    if value not in (None, False):
        print(f"warning: {old} is deprecated, use {new}", file=sys.stderr)
    return value


def int_list(option: str, text: str) -> tuple[int, ...]:
    """'16, 32,64' -> (16, 32, 64); a DareError naming `option` for anything else, or for an empty list."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise DareError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise DareError(f"{option} must name at least one value")
    return values

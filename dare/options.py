"""Parsing of the CLI's comma-separated options, shared by every command so they all fail the same clear way."""

from __future__ import annotations

from dare.errors import DareError


def int_list(option: str, text: str) -> tuple[int, ...]:
    """'16, 32,64' -> (16, 32, 64); a DareError naming `option` for anything else, or for an empty list."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise DareError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise DareError(f"{option} must name at least one value")
    return values

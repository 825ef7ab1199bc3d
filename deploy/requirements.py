"""Print the pinned requirements of the core dependencies plus the given extras, read from pyproject.toml.

The Dockerfile installs dependencies from this list *before* it copies the code, so a code change does not
invalidate the (slow) dependency layer; and pyproject.toml stays the one place where versions are pinned.

    python deploy/requirements.py serve          # core + serve (the serving image: no torch)
    python deploy/requirements.py train serve    # core + train + serve (the trainer image)
    python deploy/requirements.py --exclude torch train serve   # leave out what is installed separately
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement (`uvicorn[standard]==1` -> `uvicorn`)."""
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def resolve(pyproject: Path, extras: list[str], exclude: list[str] = ()) -> list[str]:
    """Core dependencies + the named extras, de-duplicated in order, without the excluded names."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise KeyError(f"{pyproject}: no extra named {unknown} (has {sorted(optional)})")
    skip = {requirement_name(name) for name in exclude}
    seen: set[str] = set()
    out: list[str] = []
    for requirement in [*project.get("dependencies", []), *(r for extra in extras for r in optional[extra])]:
        if requirement in seen or requirement_name(requirement) in skip:
            continue
        seen.add(requirement)
        out.append(requirement)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="extras of pyproject.toml to add to the core dependencies")
    parser.add_argument("--exclude", action="append", default=[], help="a distribution name to leave out")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    try:
        print("\n".join(resolve(args.pyproject, args.extras, args.exclude)))
    except (OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The lock files: every dependency, transitive ones included, at one exact version, compiled from pyproject.toml.

    python deploy/lock.py            # `make lock`: re-compile requirements/*.txt with `uv pip compile` (PyPI)
    python deploy/lock.py --check    # offline: is every lock current with pyproject.toml? exit 1 naming what is not

One lock per install set (LOCKS): `serve.txt` (core + serve: the serving image), `train.txt` (core + train + serve +
tools: the train image), `dev.txt` (every extra: `make install`). Each starts with the requirements it was compiled
from (`# input: ...`, one a line), so `--check` needs no network: it compares them with pyproject.toml's, and checks
that every direct requirement is pinned at a version its range allows. torch is locked as its CPU build
(`torch==2.13.0+cpu`, from a local wheel or PyTorch's CPU index), so no lock holds the CUDA libraries (nvidia-*,
triton) that PyPI's default torch wheel pulls in.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK_DIR = ROOT / "requirements"
# lock name -> the extras of pyproject.toml it installs on top of the core dependencies
LOCKS: dict[str, list[str]] = {"serve": ["serve", "otel"], "train": ["train", "serve", "tools"],
                               "dev": ["train", "serve", "tools", "dev", "otel"]}  # fmt: skip
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"  # the images' and the machines' platform (glibc >= 2.28, as the torch wheel needs)
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_ONLY = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")
_INPUT = "# input: "
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)")


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement (`uvicorn[standard]==1` -> `uvicorn`)."""
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def resolve(pyproject: Path, extras: list[str]) -> list[str]:
    """Core dependencies + the named extras, de-duplicated in order: the input of one lock."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise KeyError(f"{pyproject}: no extra named {unknown} (has {sorted(optional)})")
    out: list[str] = []
    for requirement in [*project.get("dependencies", []), *(r for extra in extras for r in optional[extra])]:
        if requirement not in out:
            out.append(requirement)
    return out


def read_lock(path: Path) -> tuple[list[str], dict[str, str]]:
    """(the input requirements recorded in the lock, {distribution name: pinned version})."""
    inputs: list[str] = []
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(_INPUT):
            inputs.append(line[len(_INPUT) :])
        elif match := _PIN.match(line):
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(3)
    return inputs, pins


def problems(pyproject: Path = ROOT / "pyproject.toml", lock_dir: Path = LOCK_DIR) -> list[str]:
    """Everything that makes a lock stale or unsafe; empty when every lock is current. Needs no network."""
    found: list[str] = []
    for name, extras in LOCKS.items():
        path = lock_dir / f"{name}.txt"
        if not path.is_file():
            found.append(f"{path.name}: missing")
            continue
        inputs, pins = read_lock(path)
        wanted = resolve(pyproject, extras)
        if inputs != wanted:
            added = [r for r in wanted if r not in inputs]
            removed = [r for r in inputs if r not in wanted]
            found.append(f"{path.name}: compiled from other requirements than pyproject.toml's "
                         f"(new or changed: {added}; gone: {removed})")  # fmt: skip
        for requirement in map(Requirement, wanted):
            key = requirement_name(str(requirement))
            if key not in pins:
                found.append(f"{path.name}: {requirement} is not pinned")
            elif not requirement.specifier.contains(Version(pins[key]), prereleases=True):
                found.append(f"{path.name}: {key}=={pins[key]} is outside pyproject.toml's {requirement}")
        cuda = sorted(n for n in pins if CUDA_ONLY.match(n))
        if cuda:
            found.append(f"{path.name}: holds CUDA-only packages {cuda} (torch must be locked as its +cpu build)")
        if "torch" in pins and not pins["torch"].endswith("+cpu"):
            found.append(f"{path.name}: torch=={pins['torch']} is not the CPU build (+cpu)")
    return found


def compile_locks(wheels: Path | None) -> None:
    """Re-compile every lock with `uv pip compile` (from PyPI; torch's CPU build from `wheels` or PyTorch's index)."""
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(uv).is_file():
        raise SystemExit("error: uv is not installed (it is in the dev extra: make install)")
    if wheels is not None and any(wheels.glob("torch-*+cpu-*.whl")):
        torch_source = ["--find-links", str(wheels)]
    else:
        torch_source = ["--extra-index-url", TORCH_CPU_INDEX, "--index-strategy", "unsafe-best-match"]
    LOCK_DIR.mkdir(exist_ok=True)
    for name, extras in LOCKS.items():
        inputs = resolve(ROOT / "pyproject.toml", extras)
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "requirements.in"
            # torch's CPU build: the local version label keeps the resolver off PyPI's CUDA wheel and its deps.
            source.write_text("\n".join(r + "+cpu" if requirement_name(r) == "torch" else r for r in inputs) + "\n")
            out = Path(tmp) / "lock.txt"
            if (LOCK_DIR / f"{name}.txt").is_file():  # uv keeps its pins where they still fit: a re-lock moves little
                shutil.copy(LOCK_DIR / f"{name}.txt", out)
            subprocess.run(
                [uv, "pip", "compile", str(source), "-o", str(out), "--quiet", "--no-header",
                 "--python-version", PYTHON_VERSION, "--python-platform", PLATFORM, *torch_source],
                check=True, cwd=ROOT, env={**os.environ, "UV_NO_CONFIG": "1"},
            )  # fmt: skip
            body = out.read_text(encoding="utf-8").replace(f"-r {source}", "pyproject.toml")
        header = [f"# The {name} lock: core + {' + '.join(extras)} of pyproject.toml, every dependency pinned.",
                  f"# Written by `make lock` (deploy/lock.py: uv pip compile, Python {PYTHON_VERSION}, {PLATFORM});",
                  "# `python deploy/lock.py --check` (a test) fails when pyproject.toml no longer matches these inputs.",
                  *(_INPUT + r for r in inputs), ""]  # fmt: skip
        (LOCK_DIR / f"{name}.txt").write_text("\n".join(header) + body, encoding="utf-8")
        print(f"requirements/{name}.txt: {len(read_lock(LOCK_DIR / f'{name}.txt')[1])} pins")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="check the locks against pyproject.toml (no network)")
    parser.add_argument("--wheels", type=Path, default=Path(os.environ.get("DARE_TORCH_WHEELS", "/opt/wheels")),
                        help="a folder with the torch +cpu wheel (default: $DARE_TORCH_WHEELS or /opt/wheels)")
    args = parser.parse_args(argv)
    if args.check:
        found = problems()
        for problem in found:
            print(f"stale lock: {problem}", file=sys.stderr)
        if found:
            print("run `make lock` and commit requirements/", file=sys.stderr)
        return 1 if found else 0
    compile_locks(args.wheels if args.wheels.is_dir() else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

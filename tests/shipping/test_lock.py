"""The lock files (requirements/*.txt, written by `make lock`) are current with pyproject.toml, hold no CUDA
package, and are what `make install` installed. Offline: no resolver runs here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.shipping.conftest import ROOT
from tests.shipping.test_dockerfile import deploy_lock


def test_every_lock_is_current_with_pyproject() -> None:
    assert deploy_lock.problems() == []
    result = subprocess.run([sys.executable, "deploy/lock.py", "--check"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.fixture
def copy(tmp_path: Path) -> tuple[Path, Path]:
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    return tmp_path / "pyproject.toml", tmp_path / "requirements"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('"tqdm>=4.70,<5"', '"tqdm>=4.70,<4.71"', "compiled from other requirements"),  # a narrowed range
        ('"tqdm>=4.70,<5"', '"tqdm>=4.70,<5",\n    "left-pad>=1"', "left-pad>=1 is not pinned"),  # a new dependency
        ('"scipy>=1.17,<2",', "", "gone: ['scipy>=1.17,<2']"),  # a removed one
    ],
)
def test_the_check_fails_when_pyproject_changes_without_the_lock(copy, old: str, new: str, expected: str) -> None:
    pyproject, locks = copy
    text = pyproject.read_text(encoding="utf-8")
    assert old in text
    pyproject.write_text(text.replace(old, new, 1), encoding="utf-8")
    found = deploy_lock.problems(pyproject, locks)
    assert any(expected in problem for problem in found), found


def test_the_check_catches_a_pin_outside_its_range_and_a_cuda_torch(copy) -> None:
    pyproject, locks = copy
    dev = locks / "dev.txt"
    text = dev.read_text(encoding="utf-8")
    text = re.sub(r"^tqdm==\S+", "tqdm==4.0.0", text, flags=re.M)
    text = re.sub(r"^torch==\S+", "torch==2.13.0\nnvidia-cudnn-cu12==9.1.0.70", text, flags=re.M)
    dev.write_text(text, encoding="utf-8")
    found = "\n".join(deploy_lock.problems(pyproject, locks))
    assert "dev.txt: tqdm==4.0.0 is outside" in found
    assert "dev.txt: holds CUDA-only packages ['nvidia-cudnn-cu12']" in found
    assert "dev.txt: torch==2.13.0 is not the CPU build" in found
    (locks / "serve.txt").unlink()
    assert "serve.txt: missing" in deploy_lock.problems(pyproject, locks)


def test_make_install_installed_exactly_the_dev_lock() -> None:
    """`make install` installs requirements/dev.txt with --no-deps: this venv holds each pinned version."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "pip install --quiet --progress-bar on --no-deps -r requirements/dev.txt" in makefile
    assert "$(BIN)/python -m pip check" in makefile
    pins = deploy_lock.read_lock(ROOT / "requirements" / "dev.txt")[1]
    assert len(pins) > 50 and pins["torch"].endswith("+cpu")
    wrong = {}
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"(locked, installed) differ, run `make install`: {wrong}"

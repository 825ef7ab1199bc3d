"""Fixtures of the serving tests: isolated settings, apps wired to the test Redis, model folders."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _no_dare_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their own Settings: DARE_* variables in the developer's shell must not leak into them."""
    for name in list(os.environ):
        if name.startswith("DARE_") or name == "PROMETHEUS_MULTIPROC_DIR":
            monkeypatch.delenv(name)

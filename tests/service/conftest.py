"""Fixtures of the serving tests: isolated settings, apps wired to the test Redis, model folders."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.core.config import Settings
from service.main import create_app


@pytest.fixture(autouse=True)
def _no_dare_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their own Settings: DARE_* variables in the developer's shell must not leak into them."""
    for name in list(os.environ):
        if name.startswith("DARE_") or name == "PROMETHEUS_MULTIPROC_DIR":
            monkeypatch.delenv(name)



@pytest.fixture
def make_client(redis_url: str, tmp_path: Path) -> Callable[..., AbstractContextManager[TestClient]]:
    """`with make_client(**settings) as client:` a TestClient (lifespan run) of an app on the test Redis.

    Defaults: the per-test Redis, an empty models dir under tmp_path; any Settings field can be overridden."""

    @contextmanager
    def make(**overrides: object) -> Iterator[TestClient]:
        values: dict[str, object] = {"redis_url": redis_url, "models_dir": tmp_path / "no-models", "data_dir": tmp_path / "var"}
        values.update(overrides)
        app = create_app(Settings(**values))  # type: ignore[arg-type]
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client

    return make

"""Fixtures of the serving tests: isolated settings, apps wired to the test Redis, model folders."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
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


V1_RECORD_DTYPE = np.dtype([("item_id", "<i8"), ("category_id", "<u4"), ("timestamp", "<u4")])


def encode_v1(items: list[int], cates: list[int], stamps: list[int]) -> bytes:
    """A stored value as the format-version-1 encoder of the previous release wrote it (service/store.py before
    2026-12: the header `DSEQ`, 1, 16, 0 and int64 item ids), for the tests that read and append to old values."""
    records = np.empty(len(items), dtype=V1_RECORD_DTYPE)
    records["item_id"], records["category_id"], records["timestamp"] = items, cates, stamps
    return b"DSEQ" + struct.pack("<BBH", 1, 16, 0) + records.tobytes()

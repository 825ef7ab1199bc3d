"""Shared fixtures. Redis: real `redis-server` processes that the tests start themselves on a free port and a
unix socket in a temporary folder -- never the Redis that may run on 127.0.0.1:6379.

- `redis_server` (session): one server for the whole run; `redis_url` (function) flushes it and returns its URL
  (restarting it first if a test stopped it).
- `make_redis_server` (function): a factory for private servers (extra `redis-server` arguments allowed) that a
  test may stop, restart or misconfigure; all are stopped at teardown.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import service.redis_server
from service.redis_server import free_port, redis_server_binary

__all__ = ["free_port", "redis_server_binary"]


class RedisServer(service.redis_server.RedisServer):
    """A private server (service/redis_server.py) that a test may also stall; `stop()` kills it, as a crash would."""

    def stall(self, seconds: float) -> threading.Thread:
        """DEBUG SLEEP from a background thread (the server needs --enable-debug-command yes); returns the running
        thread once the server really is stalled. Its client never retries: a retry would sleep the server again."""
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                             socket_timeout=seconds + 10, retry=Retry(NoBackoff(), 0))  # fmt: skip
        sleeper = threading.Thread(target=lambda: client.execute_command("DEBUG", "SLEEP", str(seconds)), daemon=True)
        sleeper.start()
        self.wait_until_blocked()
        return sleeper

    def wait_until_blocked(self, within_s: float = 5.0) -> None:
        """Return once the server is stalled (e.g. inside DEBUG SLEEP sent from another thread): a raw PING gets
        no answer. A raw socket, because redis-py would retry a timed-out PING until the server wakes up."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                # 0.25 s of silence: far longer than a loaded machine takes to answer PING, so an awake server is
                # never mistaken for a stalled one.
                sock.settimeout(0.25)
                sock.sendall(b"PING\r\n")
                try:
                    sock.recv(64)  # +PONG, or -NOAUTH with a password: either way the server is awake
                except TimeoutError:
                    return
            time.sleep(0.01)
        raise AssertionError(f"redis-server on port {self.port} never stalled within {within_s} s")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-session")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session Redis, emptied for this test (and restarted if an earlier test stopped it)."""
    redis_server.start()
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def make_redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    servers: list[RedisServer] = []

    def make(*extra_args: str, password: str | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", extra_args=tuple(extra_args), password=password)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


# ---------------------------------------------------------------------------------------------------------------
# Model folders (owned by the model/export work package). Every model here is RANDOMLY INITIALISED, not trained:
# its scores mean nothing, but they exercise the exact export/serving path. torch is imported lazily so that
# tests which never ask for these fixtures do not pay for it.

TEST_ITEM_RAW_IDS = tuple(range(1000, 1058))  # vocab rows 2..59 (0 = padding, 1 = out-of-vocabulary)
TEST_CATE_RAW_IDS = tuple(range(10, 20))  # vocab rows 2..11


def write_test_data_folder(folder: Path, item_raw_ids: tuple[int, ...] = TEST_ITEM_RAW_IDS) -> Path:
    """A minimal prepared-data folder for save_run: vocab.npz and meta.json (no samples). `item_raw_ids` (sorted,
    unique) replaces TEST_ITEM_RAW_IDS; ids of 2**63 or more make item_raw uint64, as `dare prepare` writes it."""
    import json

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    items = np.array(item_raw_ids, dtype=np.uint64 if max(item_raw_ids) >= 2**63 else np.int64)
    cates = np.array(TEST_CATE_RAW_IDS, dtype=np.int64)
    np.savez(
        folder / "vocab.npz",
        item_raw=items, item_index=np.arange(2, 2 + len(items), dtype=np.int64),
        cate_raw=cates, cate_index=np.arange(2, 2 + len(cates), dtype=np.int64),
    )  # fmt: skip
    (folder / "meta.json").write_text(json.dumps({"data_fingerprint": "random-init-test-fixture"}))
    return folder


def randomize_for_tests(model: object, seed: int = 0) -> None:
    """Give a freshly built model larger random weights and BatchNorm statistics, so that probabilities and top-K
    choices differ clearly between candidates (the N(0, 0.01) init scores everything ~0.5) without saturating."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    with torch.no_grad():
        table_ids = {id(p) for p in model.tables.parameters()}  # type: ignore[attr-defined]
        for name, param in model.named_parameters():  # type: ignore[attr-defined]
            if id(param) in table_ids:
                param.copy_(randn(param.shape, 1.0))
            elif param.dim() == 2:  # Linear / projection weights: keep activations O(1)
                param.copy_(randn(param.shape, param.shape[1] ** -0.5))
            elif isinstance(model.get_submodule(name.rsplit(".", 1)[0]), torch.nn.PReLU):  # type: ignore[attr-defined]
                param.copy_(0.25 + randn(param.shape, 0.1))
            elif name.endswith("weight"):  # BatchNorm scale
                param.copy_(1 + randn(param.shape, 0.1))
            else:
                param.copy_(randn(param.shape, 0.1))
        for name, buffer in model.named_buffers():  # type: ignore[attr-defined]
            if name.endswith("running_mean"):
                buffer.copy_(randn(buffer.shape, 0.1))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
        for table in model.tables.modules():  # type: ignore[attr-defined]
            if isinstance(table, torch.nn.Embedding):
                table.weight[0].zero_()  # padding stays zero
    model.eval()  # type: ignore[attr-defined]


def export_random_model(
    folder: Path,
    kind: str = "dare",
    att_dim: int = 8,
    repr_dim: int = 8,
    top_k: int = 5,
    max_position: int = 50,
    seed: int = 0,
    name: str | None = None,
    search: str = "topk",
    item_raw_ids: tuple[int, ...] = TEST_ITEM_RAW_IDS,
) -> Path:
    """Build a RANDOMLY INITIALISED model, save it as a run (folder/run) and export it (folder/model); return
    the model folder. The run folder beside it gives the PyTorch model back via training.run.load_run."""
    import torch

    from training.config import ModelConfig, TrainConfig
    from training.export import export_run
    from training.model import build_model
    from training.run import save_run

    torch.manual_seed(seed)
    model_cfg = ModelConfig(
        kind=kind, item_rows=2 + len(item_raw_ids), cate_rows=2 + len(TEST_CATE_RAW_IDS),  # type: ignore[arg-type]
        att_dim=att_dim, repr_dim=repr_dim, top_k=top_k, max_position=max_position, search=search,  # type: ignore[arg-type]
    )  # fmt: skip
    model = build_model(model_cfg)
    randomize_for_tests(model, seed)
    cfg = TrainConfig(model=model_cfg, seed=seed)
    save_run(folder / "run", model, cfg, {"note_random_init": 1}, write_test_data_folder(folder / "data", item_raw_ids))
    export_run(folder / "run", folder / "model", name=name or f"random-{kind}-att{att_dim}", progress=False)
    return folder / "model"


@pytest.fixture(scope="session")
def exported_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder from a RANDOMLY INITIALISED DARE model (att 8, repr 16, top-5, vocab of 58 items / 10
    categories: raw ids TEST_ITEM_RAW_IDS / TEST_CATE_RAW_IDS). Its run folder is `exported_model_dir.parent / "run"`.
    Shared by the whole session: do not modify it; copy it first."""
    return export_random_model(tmp_path_factory.mktemp("random-dare"), kind="dare", att_dim=8, repr_dim=16)


@pytest.fixture
def models_dir(tmp_path: Path, exported_model_dir: Path) -> Path:
    """A models folder holding one copy of the session's random DARE model, as `dare-a`."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copytree(exported_model_dir, folder / "dare-a")
    return folder


@pytest.fixture
def make_exported_model() -> Callable[..., Path]:
    """`make_exported_model(tmp_path, kind="dare", att_dim=8, repr_dim=8, top_k=5, max_position=50, seed=0,
    name=None) -> model folder` of a RANDOMLY INITIALISED model (run folder at `<model folder>.parent / "run"`)."""
    return export_random_model

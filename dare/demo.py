"""`dare demo`: the README's first command, end to end on the bundled Taobao sample.

    prepare the sample -> train DARE at two attention dims -> export both -> load the sequences into an embedded
    Redis (a redis-server of its own, no external service) -> serve on :8000 -> score one real user, print the curl example

Each build step runs the public `dare` subcommand that a person would run (so the demo exercises exactly what the
README documents) and records a stamp in `<work>/.demo/` with a key made of its inputs (the sample's sha256, the
options, the upstream step's key). A second run skips every step whose stamp matches and whose output still checks
out (prepared meta.json readable, metrics.json with a test AUC, the model folder valid against its manifest, the
store holding the sample's users), so it only starts the service. A step interrupted half way leaves no stamp and
is redone from a clean folder.

`--no-serve` stops after the build: the one-shot `trainer` of docker-compose.yml runs it with four attention
dims and the compose Redis. `--exit-after-score` stops after the first successful score (for checks and CI).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable

import numpy as np
import typer
from rich.console import Console

from dare_common import DareError, int_list, renamed, taobao
from dare.processes import stop_process
from loadtest.processes import dare_args, http_status

SAMPLE = taobao.SAMPLE
STAMP_DIR = ".demo"
REPR_DIM = 64
READY_TIMEOUT_S = 180.0

console = Console(stderr=True, highlight=False)


def model_name(att_dim: int) -> str:
    """The model folder (and served model) name for DARE at one attention dim: `dare-att16`, `dare-att64`, ..."""
    return f"dare-att{att_dim}"


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo builds and where; the defaults are what `make demo` runs."""

    sample: Path = SAMPLE
    work: Path = Path("var")
    models: Path | None = None  # default: <work>/models
    att_dims: tuple[int, ...] = (16, 64)
    repr_dim: int = REPR_DIM
    epochs: int = 1
    seed: int = 0
    redis_url: str | None = None  # None: an embedded redis-server keeping its data in <work>/redis
    host: str = "127.0.0.1"
    port: int = 8000
    serve: bool = True
    exit_after_score: bool = False

    @property
    def models_dir(self) -> Path:
        return self.models if self.models is not None else self.work / "models"

    def __post_init__(self) -> None:
        if not self.att_dims:
            raise DareError("--att-dims: give at least one attention dim, e.g. 16,64")
        bad = [d for d in self.att_dims if d < 1]
        if bad:
            raise DareError(f"--att-dims: attention dims must be >= 1, got {bad}")
        if self.epochs < 1:
            raise DareError(f"--epochs must be >= 1, got {self.epochs}")
        if not self.sample.is_file():
            raise DareError(f"--input {self.sample}: no such file (the bundled sample is {SAMPLE})")


# -------------------------------------------------------------------------------------------------------------
# Stamps: a step is up to date when its stamp key matches and its output still checks out
# -------------------------------------------------------------------------------------------------------------


def step_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stamps:
    folder: Path

    def path(self, step: str) -> Path:
        return self.folder / f"{step}.json"

    def matches(self, step: str, key: str) -> bool:
        try:
            return json.loads(self.path(step).read_text(encoding="utf-8")).get("key") == key
        except (OSError, ValueError, AttributeError):
            return False

    def write(self, step: str, key: str, **info: object) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"key": key, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        self.path(step).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    def clear(self, step: str) -> None:
        self.path(step).unlink(missing_ok=True)


def _json_file(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def prepared_ok(folder: Path) -> bool:
    return _json_file(folder / "meta.json") is not None and all(
        (folder / split / "user.npy").is_file() for split in ("train", "val", "test")  # training/layout.py
    )


def run_ok(folder: Path) -> bool:
    metrics = _json_file(folder / "metrics.json")
    return metrics is not None and isinstance(metrics.get("test_auc"), (int, float))


def model_ok(folder: Path) -> bool:
    from service.contract import ModelFolderError, load_manifest

    try:
        load_manifest(folder)
    except ModelFolderError:
        return False
    return True


# -------------------------------------------------------------------------------------------------------------
# The sample: a real user and real candidate items for the printed example
# -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    user_id: str
    history_events: int
    candidates: list[dict[str, int]]

    def body(self) -> dict[str, object]:
        return {"user_id": self.user_id, "candidates": self.candidates}


def pick_example(sample: Path, n_candidates: int = 5) -> Example:
    """The user with the longest history in the sample, and candidates that are real items with their categories:
    some from the user's favourite category (likely clicks) and some popular items from other categories. The sample
    is read by the reader every command shares (dare_common.taobao), every behaviour type kept."""
    frame = taobao.read_log(sample).frame
    user_of, item_of, cate_of_row = (frame[c].to_numpy() for c in ("user", "item", "cate"))
    users, events = np.unique(user_of, return_counts=True)
    user = users[np.argmax(events)]
    cates, per_cate = np.unique(cate_of_row[user_of == user], return_counts=True)
    favourite = cates[np.argmax(per_cate)]
    items, first, count = np.unique(item_of, return_index=True, return_counts=True)
    by_popularity = np.argsort(-count, kind="stable")
    items, item_cates = items[by_popularity], cate_of_row[first][by_popularity]
    in_favourite = items[item_cates == favourite][: n_candidates // 2 + 1]
    others = items[item_cates != favourite][: n_candidates - len(in_favourite)]
    cate_of = dict(zip(items.tolist(), item_cates.tolist()))
    candidates = [{"item_id": i, "category_id": cate_of[i]} for i in [*in_favourite.tolist(), *others.tolist()]]
    return Example(user_id=str(user), history_events=int(events.max()), candidates=candidates)


# -------------------------------------------------------------------------------------------------------------
# Running the steps
# -------------------------------------------------------------------------------------------------------------


def run_dare(*args: str, env: dict[str, str] | None = None) -> None:
    """Run one `dare` subcommand with its own progress bars on the terminal; a failure is a DareError."""
    command = dare_args(*args)  # with this interpreter, so the demo works without .venv/bin on PATH
    console.print(f"    [dim]$ dare {' '.join(args)}[/dim]")
    result = subprocess.run(command, env={**os.environ, **(env or {})}, check=False)
    if result.returncode != 0:
        raise DareError(f"`dare {' '.join(args)}` failed with exit code {result.returncode} (its output is above)")


@dataclass
class Step:
    name: str
    key: str
    output: Path | None
    is_valid: Callable[[], bool]
    run: Callable[[], None]
    info: dict[str, object] = field(default_factory=dict)


def execute(steps: list[Step], stamps: Stamps) -> None:
    total = len(steps)
    for number, step in enumerate(steps, start=1):
        label = f"[bold][{number}/{total}][/bold] {step.name}"
        if stamps.matches(step.name, step.key) and step.is_valid():
            console.print(f"{label} [green]up to date, skipped[/green]")
            continue
        console.print(f"{label} ...")
        stamps.clear(step.name)
        if step.output is not None and step.output.exists():
            shutil.rmtree(step.output)  # a half-built or outdated output: start clean
        started = time.perf_counter()
        step.run()
        if not step.is_valid():
            raise DareError(f"step {step.name!r} finished but its output {step.output} does not check out")
        stamps.write(step.name, step.key, seconds=round(time.perf_counter() - started, 1), **step.info)
        console.print(f"{label} [green]done[/green] in {time.perf_counter() - started:.1f} s")


def build_steps(cfg: DemoConfig, redis_url: Callable[[], str], store_has_users: Callable[[], bool]) -> list[Step]:
    """prepare -> (train, export) per attention dim -> load. `redis_url()` is asked only when the load step runs,
    so the embedded Redis is not started (and left idle) while the models train."""
    from service.contract import sha256_file

    sample_sha = sha256_file(cfg.sample)
    data_dir = cfg.work / "data"
    prepare_key = step_key("prepare", sample_sha)
    steps = [
        Step(
            name="prepare",
            key=prepare_key,
            output=data_dir,
            is_valid=lambda: prepared_ok(data_dir),
            run=lambda: run_dare("prepare", "--input", str(cfg.sample), "--out", str(data_dir)),
        )
    ]
    for dim in cfg.att_dims:
        name = model_name(dim)
        run_dir = cfg.work / "runs" / name
        model_dir = cfg.models_dir / name
        train_key = step_key("train", prepare_key, dim, cfg.repr_dim, cfg.epochs, cfg.seed)
        train_args = [
            "train", "--data", str(data_dir), "--model", "dare", "--att-dim", str(dim), "--repr-dim",
            str(cfg.repr_dim), "--epochs", str(cfg.epochs), "--seed", str(cfg.seed), "--out", str(run_dir),
        ]  # fmt: skip
        steps.append(
            Step(
                name=f"train-{name}",
                key=train_key,
                output=run_dir,
                is_valid=lambda run_dir=run_dir: run_ok(run_dir),
                run=lambda args=train_args: run_dare(*args),
            )
        )
        steps.append(
            Step(
                name=f"export-{name}",
                key=step_key("export", train_key, name),
                output=model_dir,
                is_valid=lambda model_dir=model_dir: model_ok(model_dir),
                run=lambda run_dir=run_dir, model_dir=model_dir, name=name: run_dare(
                    "export", "--run", str(run_dir), "--out", str(model_dir), "--name", name
                ),
            )
        )
    steps.append(
        Step(
            name="load",
            key=step_key("load", sample_sha, cfg.redis_url or "embedded"),
            output=None,
            is_valid=store_has_users,
            run=lambda: run_dare("load", "--input", str(cfg.sample), "--redis", redis_url()),
        )
    )
    return steps


# -------------------------------------------------------------------------------------------------------------
# The store and the service
# -------------------------------------------------------------------------------------------------------------


def start_embedded_redis(work: Path, stack: ExitStack) -> str:
    """The service's own embedded Redis (append-only file under `work/redis/`, restarted if it dies); returns its URL.

    Append-only persistence means a rerun finds the loaded sequences again, even after a hard stop.
    """
    from service.redis_server import RedisServer

    embedded = RedisServer.embedded(work).start().supervise()
    stack.callback(embedded.stop)
    return embedded.url


def user_has_history(redis_url: str, user_id: str) -> bool:
    """Whether the store holds events for this user, asked through the service's own store code."""
    from service.errors import StoreUnavailableError
    from service.store import SequenceStore, connect

    try:
        store = SequenceStore(connect(redis_url, connect_timeout_s=5, socket_timeout_s=5))
    except StoreUnavailableError:
        return False
    try:
        return store.read(user_id, max_events=1).exists
    except StoreUnavailableError:
        return False
    finally:
        store.close()


def http_json(url: str, body: object | None = None, timeout: float = 10.0) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None


def wait_until_ready(process: subprocess.Popen, base_url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    with console.status(f"waiting for {base_url}/readyz"):
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise DareError(f"`dare serve` exited with code {process.returncode} before it was ready (see above)")
            try:
                if http_status(f"{base_url}/readyz") == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
    raise DareError(f"the service at {base_url} was not ready after {timeout_s:.0f} s")


def curl_example(base_url: str, body: dict[str, object]) -> str:
    return (
        f"curl -s -X POST {base_url}/score -H 'Content-Type: application/json' \\\n"
        f"     -d '{json.dumps(body, separators=(',', ':'))}'"
    )


def check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As uvicorn binds: connections of a server that just stopped (TIME_WAIT) do not count, a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise DareError(f"port {port} on {host} is already in use: stop what runs there or pass --port") from None


def serve_and_score(cfg: DemoConfig, redis_url: str, example: Example, stack: ExitStack) -> None:
    check_port_free(cfg.host, cfg.port)
    base_url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
    console.print(f"[bold]serve[/bold] {cfg.models_dir} on {base_url}")
    default = model_name(cfg.att_dims[-1])
    env = {**os.environ, "DARE_REDIS_URL": redis_url, "DARE_DEFAULT_MODEL": default}
    command = dare_args("serve", "--models", str(cfg.models_dir), "--host", cfg.host, "--port", str(cfg.port))
    # Its own session: a terminal's Ctrl-C reaches only the demo, which then stops the service with exactly one
    # SIGTERM. (In the demo's process group the service would get the SIGINT too, and if the demo's SIGTERM landed
    # first, uvicorn would take the SIGINT as a second signal and force-quit mid-shutdown, with a traceback.)
    process = subprocess.Popen(command, env=env, start_new_session=True)
    stack.callback(stop_process, process)
    wait_until_ready(process, base_url)

    status, answer = http_json(f"{base_url}/score", example.body())
    if status != 200 or not isinstance(answer, dict):
        raise DareError(f"POST /score answered {status}: {answer}")
    console.rule("[bold green]DARE is serving")
    console.print(f"user {example.user_id} ({example.history_events} events in the sample), "
                  f"model {answer.get('model')}:")
    for candidate, score in zip(example.candidates, answer.get("scores", [])):
        console.print(f"  item {candidate['item_id']:>8} (category {candidate['category_id']:>7})  p(click) = {score:.4f}")
    other = [m for m in (model_name(d) for d in cfg.att_dims) if m != answer.get("model")]
    print("\nTry it:\n")
    print(curl_example(base_url, example.body()))
    if other:
        print(f"\nAnother model: add \"model\": \"{other[0]}\" to the body. Loaded models: {base_url}/models")
    print(f"\nAPI docs:  {base_url}/docs\nMetrics:   {base_url}/metrics\n")
    if cfg.exit_after_score:
        console.print("[green]first score succeeded; stopping (--exit-after-score)[/green]")
        return
    console.print("Serving until Ctrl-C.")
    # Not a bare wait(): the kernel may hand Ctrl-C to any thread of this process (polars' worker threads, since the
    # example was picked with polars), and then a main thread blocked in waitpid() would never see it. Waking up to
    # poll lets Python run the handler in the main thread.
    while process.poll() is None:
        time.sleep(0.2)
    if process.returncode not in (0, 130, -signal.SIGINT, -signal.SIGTERM):  # 130: `dare` interrupted
        raise DareError(f"`dare serve` exited with code {process.returncode}")


def run_demo(cfg: DemoConfig) -> None:
    started = time.perf_counter()
    stamps = Stamps(cfg.work / STAMP_DIR)
    example = pick_example(cfg.sample)
    with ExitStack() as stack:
        urls: list[str] = []

        def redis_url() -> str:
            if not urls:
                urls.append(cfg.redis_url or start_embedded_redis(cfg.work, stack))
            return urls[0]

        steps = build_steps(cfg, redis_url, lambda: user_has_history(redis_url(), example.user_id))
        execute(steps, stamps)
        console.print(f"built in {time.perf_counter() - started:.1f} s")
        if cfg.serve:
            serve_and_score(cfg, redis_url(), example, stack)


def demo(
    work: Annotated[Path, typer.Option("--work", help="folder for prepared data, runs, the embedded Redis, stamps")] = Path("var"),
    models: Annotated[Path | None, typer.Option("--models", help="where the model folders go (default: WORK/models)")] = None,
    att_dims: Annotated[str, typer.Option("--att-dims", help="attention dims to train, comma-separated")] = "16,64",
    repr_dim: Annotated[int, typer.Option("--repr-dim", help="representation dim of every model")] = REPR_DIM,
    epochs: Annotated[int, typer.Option("--epochs", help="training epochs per model (1 keeps the demo quick)")] = 1,
    input: Annotated[Path, typer.Option("--input", help="Taobao-format CSV(.gz) to build from")] = SAMPLE,
    redis: Annotated[str | None, typer.Option("--redis", envvar="DARE_REDIS_URL", help="use this Redis instead of the embedded one")] = None,
    host: Annotated[str, typer.Option("--host", help="address the service binds")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port the service listens on")] = 8000,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="start the service after building")] = True,
    exit_after_score: Annotated[bool, typer.Option("--exit-after-score", help="stop after the first successful score")] = False,
    sample: Annotated[Path | None, typer.Option("--sample", hidden=True)] = None,  # the old spelling of --input
    redis_url: Annotated[str | None, typer.Option("--redis-url", hidden=True)] = None,  # the old spelling of --redis
) -> None:
    """Prepare the bundled sample, train + export DARE at two attention dims, load Redis, serve on :8000."""
    dims = int_list("--att-dims", att_dims)
    cfg = DemoConfig(
        sample=renamed("--sample", "--input", sample) or input, work=work, models=models, att_dims=dims,
        repr_dim=repr_dim, epochs=epochs, redis_url=renamed("--redis-url", "--redis", redis_url) or redis or None,
        host=host, port=port, serve=serve, exit_after_score=exit_after_score,
    )  # fmt: skip
    def stop_on_sigterm(_signum: int, _frame: object) -> None:
        # `docker stop`, systemd, `kill`: stop as on Ctrl-C, so the service and the embedded Redis go down with us.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        run_demo(cfg)
    except KeyboardInterrupt:
        # The children got the same Ctrl-C; the ExitStack above has already stopped the service and Redis.
        console.print("\n[yellow]demo stopped; a rerun picks up where this one left off[/yellow]")


def register(app: typer.Typer) -> None:
    """Owned by the shipping work package: adds `demo`."""
    app.command("demo")(demo)


__all__ = ["DemoConfig", "model_name", "run_demo", "register"]

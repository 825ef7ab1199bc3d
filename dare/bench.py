"""`dare bench`: where a scoring call spends its time, per stage and per attention dim, and how the service compares
with its floor and the search with its peers, in one run.

It imports both the service's in-process `ScoringEngine` and the PyTorch model, which is why it lives in `dare`
(the service never imports torch). One run:

1. starts a private `redis-server` on a free port (never the machine's shared Redis) and stores SYNTHETIC lifelong
   sequences in the service's binary format: `training.synth` histories (Zipf item popularity, planted category
   structure, sorted timestamps), 5% of the items unknown to the vocabulary (the out-of-vocabulary row). Users of
   W1, W2, W3 and W4 hold the last 200, 10,000, 50,000 and 100,000 events of the same generated sequences.
2. for each attention dim builds a RANDOMLY INITIALISED DARE model (representation dim fixed) and writes a model
   folder with `dare export`'s own code (parity-verified against PyTorch). Random weights are fine for latency:
   no operator's cost depends on the values; the scores mean nothing.
3. times, round-robin (each round visits every workload x dim x backend in a shuffled order, so load from other
   processes hits all of them alike):
     onnxruntime  `ScoringEngine.score` as the service runs it; stages `store_fetch`, `id_mapping`, `search`,
                  `scoring` (the engine's own timers) and `total` (the whole call)
     torch        the same store fetch and id mapping, then `CTRModel.search` / `CTRModel.score` + sigmoid in
                  PyTorch eager (inference mode) with as many threads as onnxruntime gets; same stage names
     http         (`--http`, backend onnxruntime, stage `http`): POST /score to a real `dare serve` on the same
                  Redis and model folders, over one keep-alive connection (a lean raw-socket HTTP/1.1 client)
4. with `--http`, back to back on the same user and candidates (so the service is as warm as the in-process
   engine): the in-process call, POST /score, and the same body POSTed to the framework floor (`floor_app`: bare
   uvicorn + FastAPI parsing the body and answering as many scores, no service code); then POST /score at a fixed
   10 requests/s, open loop, for 30 s per long workload at the smallest dim (`measure_fixed_rate`).
5. the search against its peers, interleaved call by call on the same embedding tables and histories (W2-W4):
   the fused kernel (service/search.py), FAISS exact inner-product top-K (`faiss.knn`, BLAS path) and numpy
   (gather, matmul, argpartition), one thread each, wall and CPU time; and the kernel's arithmetic rate (4 C N d
   flops per call: every candidate against every event, item and category) as a share of this CPU's measured
   single-thread peak (the best of a few single-thread float32 GEMMs through numpy's BLAS).
6. writes FILE.json (records {att_dim, workload, backend, stage, p50_ms, p99_ms}), FILE.meta.json (settings,
   machine, load average, command, CPU-time medians, the back-to-back and peer rows, the target ratios), FILE.md
   (tables + ratios) and FILE.png (latency vs attention dim).

`--quick` shrinks everything (2 dims, short histories, 3 timed rounds) for the smoke test; its numbers mean little.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import numpy as np
import typer

from dare_common import DareError, int_list, renamed
from dare.processes import stop_process

if TYPE_CHECKING:
    from service.registry import LoadedModel
    from service.store import SequenceStore

REPO_ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("onnxruntime", "torch")
STAGES = ("store_fetch", "id_mapping", "search", "scoring", "total")
HTTP_STAGE = "http"
OUTSIDE_STAGE = "http_outside_search"  # POST /score less the search the same answer reports (its timings_ms)
PAIRED_MIN_SECONDS = 3.0  # per (workload, dim) cell of the back-to-back HTTP measurement
# The kernel as served, then its two pass-1 variants (only where the CPU can run both: AVX-512 BF16), then its peers.
PEERS = ("fused kernel", "fused, float32 pass 1", "fused, bfloat16 pass 1", "faiss", "numpy")
VARIANTS = PEERS[1:3]
OTHERS = ("faiss", "numpy")  # the kernel's peers proper: "best peer" is the faster of these
MODEL_PREFIX = "bench-dare"


class BenchError(DareError):
    """The benchmark cannot run: a bad option, the service would not start, a backend disagrees."""


@dataclass(frozen=True)
class Workload:
    name: str  # "W1" .. "W4"
    history: int  # N: events stored for (and read from) each user
    candidates: int  # C per call


FULL_WORKLOADS = (Workload("W1", 200, 100), Workload("W2", 10_000, 200), Workload("W3", 50_000, 200), Workload("W4", 100_000, 200))
QUICK_WORKLOADS = (Workload("W1", 50, 20), Workload("W2", 400, 40), Workload("W3", 1_000, 40), Workload("W4", 2_000, 40))
LONG = ("W2", "W3", "W4")  # the long-sequence workloads: the HTTP / in-process targets and the search peers


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
    seed: int = 0
    work_dir: Path | None = None
    quick: bool = False
    progress: bool = True

    def check(self) -> None:
        """The options a person sets (the rest are fixed sizes, full or quick)."""
        if not self.att_dims or any(d < 1 for d in self.att_dims):
            raise BenchError(f"--att-dims must be positive integers, got {list(self.att_dims)}")
        if len(set(self.att_dims)) != len(self.att_dims):
            raise BenchError(f"--att-dims has duplicates: {list(self.att_dims)}")
        for name in ("repr_dim", "repeats", "threads"):
            if getattr(self, name) < 1:
                raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise BenchError(f"--warmup must be >= 0, got {self.warmup}")
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
    """POST over one keep-alive HTTP/1.1 connection: the request written in one send (TCP_NODELAY), the status line,
    Content-Length and body read straight off the socket, as an ad server's connection pool would. The standard
    library's http.client adds 0.1-0.7 ms per call on the 2-core machine, all of it in the client."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.head = f"POST /score HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: ".encode()
        self.pending = b""  # bytes read past the previous response (none, with one request in flight)

    def post(self, body: bytes) -> tuple[bytes, float]:
        """The answer's body and the seconds from sending to the whole answer; BenchError unless 200."""
        t0 = time.perf_counter()
        self.sock.sendall(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
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
        seconds = time.perf_counter() - t0
        if status != 200:
            raise BenchError(f"POST /score on port {self.port} answered {status}: {payload[:300]!r}")
        return payload, seconds

    def score(self, body: bytes) -> tuple[np.ndarray, float, dict[str, float]]:
        """POST /score: the scores (parsed, within the time), the seconds, and the service's own stage timings (ms)."""
        import orjson

        t0 = time.perf_counter()
        payload, _ = self.post(body)
        answer = orjson.loads(payload)
        return np.asarray(answer["scores"], dtype=np.float32), time.perf_counter() - t0, answer["timings_ms"]

    def _read_more(self, buf: bytes) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise BenchError(f"the server on port {self.port} closed the connection")
        return buf + chunk

    def close(self) -> None:
        self.sock.close()


def floor_app() -> Any:
    """The framework floor: uvicorn + FastAPI answering POST /score's body (parsed as JSON) with as many scores, and
    nothing of the service (no auth, validation, store, graphs or metrics). `uvicorn --factory dare.bench:floor_app`."""
    import orjson
    from fastapi import Body, FastAPI, Response

    app = FastAPI()

    @app.post("/score")
    async def score(body: dict[str, Any] = Body()) -> Response:  # noqa: B008 - FastAPI's way
        scores = [0.5] * len(body.get("candidates", ()))
        return Response(orjson.dumps({"user_id": body.get("user_id"), "scores": scores}), media_type="application/json")

    return app


def start_service(models_dir: Path, redis_url: str, threads: int, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`dare serve` (1 worker) on a free port, on the bench's Redis and models; waits for /readyz."""
    from loadtest.processes import start_dare_serve
    from service.redis_server import free_port

    port = free_port()
    env = {**os.environ, "DARE_REDIS_URL": redis_url, "DARE_LOG_LEVEL": "warning", "DARE_ORT_INTRA_OP_THREADS": str(threads),
           "DARE_REQUEST_TIMEOUT_S": "60"}  # fmt: skip
    process = start_dare_serve(["--models", str(models_dir), "--workers", "1"], port, log, env, error=BenchError, ready_within_s=180)
    return process, port


@contextmanager
def floor_server(log: Path) -> Iterator[tuple[int, int]]:
    """`floor_app` on uvicorn (its defaults, as `dare serve` but bare) on a free port; yields (port, pid) once it
    answers."""
    from service.redis_server import free_port

    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--factory", "dare.bench:floor_app", "--port", str(port), "--log-level", "warning"]
    with log.open("wb") as fh:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise BenchError(f"the floor server exited with code {process.returncode}; see {log}")
            try:
                HttpClient(port).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(f"the floor server did not answer within 60 s; see {log}") from None
                time.sleep(0.1)
        yield port, process.pid
    finally:
        stop_process(process)


def score_body(cfg: BenchConfig, data: BenchData, workload: str, dim: int, user: str, candidate_set: int) -> bytes:
    import orjson

    items, cates = data.candidates[workload][candidate_set]
    return orjson.dumps({"user_id": user, "model": model_name(dim, cfg.repr_dim),
                         "candidates": [{"item_id": int(i), "category_id": int(c)} for i, c in zip(items, cates)]})  # fmt: skip


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
    samples = Samples()
    rng = np.random.default_rng(cfg.seed + 1)
    backends = ["onnxruntime", "torch"] + (["http"] if http_client is not None else [])
    jobs = [(w, d, b) for w in cfg.workloads for d in cfg.att_dims for b in backends]
    for r in _progress(range(cfg.warmup + cfg.repeats), cfg, desc=f"timing {len(jobs)} (workload, dim, backend) per round"):
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
                probs, timings = result.probs, {**result.timings, "total": time.perf_counter() - t0}
            elif backend == "torch":
                probs, timings = torch_paths[d].score(user, items, cates)
            else:  # POST /score, recorded as the onnxruntime backend's `http` stage (the service runs onnxruntime)
                assert http_client is not None
                probs, seconds, stages_ms = http_client.score(score_body(cfg, data, w.name, d, user, s))
                # Also the time this answer spent outside its own search (store, ids, scoring, HTTP).
                timings = {HTTP_STAGE: seconds, OUTSIDE_STAGE: seconds - stages_ms["search"] / 1000.0}
            cpu_seconds = time.process_time() - c0
            probs_of[(w.name, d, backend)] = probs
            if timed:
                if backend != "http":  # the service's CPU time is not this process's
                    samples.cpu.setdefault((w.name, d, backend), []).append(cpu_seconds)
                for stage, seconds in timings.items():
                    samples.add(w.name, d, "onnxruntime" if backend == "http" else backend, stage, seconds)
        # The same user and candidates went through every backend this round: their answers must agree.
        for (w_name, d, backend), probs in probs_of.items():
            if backend != "onnxruntime":
                samples.diff(backend, probs_of[(w_name, d, "onnxruntime")], probs)
    return samples


def measure_http_paired(cfg: BenchConfig, data: BenchData, engine: Any, loaded: dict[int, Any],
                        servers: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:  # fmt: skip
    """The in-process call, POST /score and the same body to the framework floor, back to back on the same user and
    candidates (rotating their order), for every workload and dim: p50 of each. In the main table the service idles
    while this process runs the other cells, so each HTTP call also wakes it up with its caches cold; here it is as
    busy as the in-process engine, as under steady traffic. `servers`: "http" and "floor" -> (port, pid).

    Also CPU time per call: this process's around the in-process call, and each server process's own (psutil) over
    the cell divided by its requests. On a shared machine a server that sleeps between requests waits for a core on
    every wake-up, which the in-process call never does; CPU time is what the code costs, whoever else runs."""
    import psutil

    clients = {name: HttpClient(port) for name, (port, _) in servers.items()}
    processes = {name: psutil.Process(pid) for name, (_, pid) in servers.items()}

    def cpu(name: str) -> float:
        times = processes[name].cpu_times()
        return times.user + times.system

    import orjson

    names = ("in_process", "http", "floor")
    rows: list[dict[str, Any]] = []
    try:
        for w in _progress(cfg.workloads, cfg, desc="HTTP, in-process and floor, back to back"):
            for d in cfg.att_dims:
                timings: dict[str, list[float]] = {name: [] for name in names}
                outside: list[float] = []  # each POST /score less the search its answer reports
                cpu_before, in_process_cpu = {name: cpu(name) for name in clients}, 0.0
                # Small calls are cheap and their p50s noisy: at least PAIRED_MIN_SECONDS of rounds per cell (up to
                # 10x --repeats), so a W1 ratio rests on a few hundred rounds rather than 50.
                started, r = time.perf_counter(), 0
                # (quick: 0.3 s without the round cap, so that the servers' CPU times, counted in 10 ms clock ticks,
                # are above zero: a quick run's 10 x --repeats rounds of W1 cost the floor a few ms, often no tick)
                min_seconds, cap = (0.3, None) if cfg.quick else (PAIRED_MIN_SECONDS, cfg.warmup + 10 * cfg.repeats)
                while r < cfg.warmup + cfg.repeats or (time.perf_counter() - started < min_seconds and (cap is None or r < cap)):
                    user, s = data.users[w.name][r % cfg.users], r % cfg.candidate_sets
                    items, cates = data.candidates[w.name][s]
                    body = score_body(cfg, data, w.name, d, user, s)
                    for name in names[r % 3 :] + names[: r % 3]:
                        if name == "in_process":
                            c0, t0 = time.process_time(), time.perf_counter()
                            engine.score(user, items, cates, model=loaded[d])
                            seconds, in_process_cpu = time.perf_counter() - t0, in_process_cpu + time.process_time() - c0
                        else:
                            payload, seconds = clients[name].post(body)
                            if name == "http" and r >= cfg.warmup:
                                outside.append(seconds - orjson.loads(payload)["timings_ms"]["search"] / 1000.0)
                        if r >= cfg.warmup:
                            timings[name].append(seconds)
                    r += 1
                p50 = {name: round(float(np.median(v)) * 1000.0, 4) for name, v in timings.items()}
                per_call = {name: round((cpu(name) - cpu_before[name]) / r * 1000.0, 4) for name in clients}
                rows.append({"workload": w.name, "att_dim": d, "in_process_p50_ms": p50["in_process"],
                             "http_p50_ms": p50["http"], "floor_p50_ms": p50["floor"], "rounds": len(timings["http"]),
                             "http_outside_search_p50_ms": round(float(np.median(outside)) * 1000.0, 4),
                             "in_process_cpu_ms": round(in_process_cpu / r * 1000.0, 4), "http_server_cpu_ms": per_call["http"],
                             "floor_server_cpu_ms": per_call["floor"]})  # fmt: skip
    finally:
        for client in clients.values():
            client.close()
    return rows


FIXED_RATE = 10.0  # requests/s of the fixed-rate measurement (issue 19's W3 latency target)
FIXED_SECONDS = 30.0


def measure_fixed_rate(cfg: BenchConfig, data: BenchData, port: int) -> list[dict[str, Any]]:
    """POST /score at a fixed FIXED_RATE requests/s for FIXED_SECONDS per long workload at the smallest att dim, open
    loop: request i is due at start + i / rate and its latency runs from then, so an answer that comes late delays
    the next request's start and that wait is counted (two connections take turns). Also the p50 of each stage as
    the service timed it (the answers' timings_ms): set beside the back-to-back stages, they show what the machine
    costs a request that finds it idle (here: every 100 ms)."""
    import threading

    import orjson

    dim = min(cfg.att_dims)
    seconds = 1.0 if cfg.quick else FIXED_SECONDS
    rows = []
    for w in _progress([w for w in cfg.workloads if w.name in LONG], cfg, desc=f"POST /score at {FIXED_RATE:g} requests/s"):
        bodies = [score_body(cfg, data, w.name, dim, data.users[w.name][i % cfg.users], i % cfg.candidate_sets)
                  for i in range(cfg.users * cfg.candidate_sets)]  # fmt: skip
        count, connections = int(FIXED_RATE * seconds), 2
        latency: list[float] = [0.0] * count
        stages: list[dict[str, float]] = [{}] * count
        errors: list[str] = []
        start = time.perf_counter() + 0.05

        def send(first: int) -> None:
            try:
                client = HttpClient(port)
                try:
                    for i in range(first, count, connections):
                        due = start + i / FIXED_RATE
                        time.sleep(max(due - time.perf_counter(), 0.0))
                        payload, _ = client.post(bodies[i % len(bodies)])
                        latency[i] = time.perf_counter() - due
                        stages[i] = orjson.loads(payload)["timings_ms"]
                finally:
                    client.close()
            except (OSError, BenchError) as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=send, args=(k,)) for k in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise BenchError(f"POST /score at {FIXED_RATE:g} requests/s ({w.name}): {errors[0]}")
        ms = np.array(latency) * 1000.0
        outside = ms - np.array([s["search"] for s in stages])  # each answer's time outside its own search
        rows.append({"workload": w.name, "att_dim": dim, "rate": FIXED_RATE, "requests": count,
                     **{f"p{q}_ms": round(float(np.percentile(ms, q)), 3) for q in (50, 95, 99)}, "max_ms": round(float(ms.max()), 3),
                     "stages_p50_ms": {k: round(float(np.median([s[k] for s in stages])), 3) for k in stages[0]},
                     "outside_search_p50_ms": round(float(np.median(outside)), 3)})  # fmt: skip
    return rows


def measure_search_peers(cfg: BenchConfig, data: BenchData, store: SequenceStore, loaded: dict[int, Any]) -> list[dict[str, Any]]:
    """The fused kernel, FAISS and numpy on the same histories and candidates (W2-W4), interleaved call by call in
    shuffled order; one thread each. All three compute the exact top-K of score(c, t) = <scale item[c], item[t]> +
    <scale cate[c], cate[t]> + poscol[min(N - t, max_position)] over the model's attention tables, written for the
    peers as one inner product over [item, cate, poscol] (gathered per call) and turned into softmax weights. The
    peers' retrieved events are checked against the kernel's (`same_events`: share of candidates retrieving the same
    events, events alike in item, category and clamped position counting as the same: they score the same)."""
    import faiss
    from threadpoolctl import threadpool_limits

    from service.search import kernel_bf16

    workloads = [w for w in cfg.workloads if w.name in LONG]
    if not workloads or any(loaded[d].fused is None for d in cfg.att_dims):
        return []
    faiss.omp_set_num_threads(1)
    faiss.cvar.distance_compute_blas_threshold = 1  # the BLAS path (sgemm) for any number of queries
    vocab = loaded[cfg.att_dims[0]].vocab  # one vocabulary for every dim
    inputs = {}
    for w in workloads:
        for u, user in enumerate(data.users[w.name]):
            hist = store.read(user, w.history).events
            for s, (items, cates) in enumerate(data.candidates[w.name]):
                inputs[(w.name, u, s)] = (vocab.item(hist["item_id"]), vocab.cate(hist["category_id"].astype(np.int64)),
                                          vocab.item(items), vocab.cate(cates))  # fmt: skip

    def keys_and_queries(fused: Any, hi: np.ndarray, hc: np.ndarray, ci: np.ndarray, cc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(hi)
        position = np.minimum(n - np.arange(n), fused.max_position)  # [N], most recent = 1
        keys = np.concatenate([fused.item[hi], fused.cate[hc], fused.position_column[position][:, None]], axis=1)  # [N, 2d+1]
        queries = np.concatenate([fused.scale * fused.item[ci], fused.scale * fused.cate[cc], np.ones((len(ci), 1), np.float32)], axis=1)  # [C, 2d+1]
        return np.ascontiguousarray(keys, dtype=np.float32), np.ascontiguousarray(queries, dtype=np.float32)

    def softmax(scores: np.ndarray) -> np.ndarray:
        e = np.exp(scores - scores.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def run(peer: str, fused: Any, hi: np.ndarray, hc: np.ndarray, ci: np.ndarray, cc: np.ndarray) -> np.ndarray:
        k = fused.top_k
        if peer == "fused kernel":
            return fused.run(hi, hc, ci, cc)[0]
        if peer in VARIANTS:
            return variants[(fused.att_dim, peer)].run(hi, hc, ci, cc)[0]
        keys, queries = keys_and_queries(fused, hi, hc, ci, cc)
        if peer == "faiss":
            scores, index = faiss.knn(queries, keys, k, metric=faiss.METRIC_INNER_PRODUCT)  # [C, K] each, best first
        else:
            all_scores = queries @ keys.T  # [C, N]
            index = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]  # [C, K], unordered
            scores = np.take_along_axis(all_scores, index, axis=1)
            order = np.argsort(-scores, axis=1)
            index, scores = np.take_along_axis(index, order, axis=1), np.take_along_axis(scores, order, axis=1)
        softmax(scores)  # the weights, as the kernel returns them (part of the work timed)
        return index

    def retrieved(index: np.ndarray, hi: np.ndarray, hc: np.ndarray, fused: Any) -> np.ndarray:
        """Per candidate, the sorted (item row, category row, clamped position) keys of the retrieved events."""
        safe = np.maximum(index, 0)
        position = np.minimum(len(hi) - safe, fused.max_position)
        key = (hi[safe] * fused.cate.shape[0] + hc[safe]) * (fused.max_position + 1) + position
        return np.sort(np.where(index >= 0, key, -1), axis=1)

    both = kernel_bf16()  # the CPU runs pass 1 in either precision: time both, whichever the service chose
    variants = {}
    for d in cfg.att_dims if both else ():
        fused = loaded[d].fused
        variants[(d, VARIANTS[0])] = replace(fused, bf16=None)
        variants[(d, VARIANTS[1])] = fused if fused.bf16 is not None else fused.with_bf16()
    jobs = [(w.name, d, p) for w in workloads for d in cfg.att_dims for p in PEERS if both or p not in VARIANTS]
    wall: dict[tuple[str, int, str], list[float]] = {j: [] for j in jobs}
    cpu: dict[tuple[str, int, str], list[float]] = {j: [] for j in jobs}
    same: dict[tuple[str, int, str], list[float]] = {j: [] for j in jobs}
    rng = np.random.default_rng(cfg.seed + 2)
    with threadpool_limits(limits=1):
        for r in _progress(range(cfg.warmup + cfg.repeats), cfg, desc="search: fused kernel vs FAISS vs numpy"):
            results: dict[tuple[str, int, str], np.ndarray] = {}
            for j in rng.permutation(len(jobs)):
                w, d, peer = jobs[j]
                args = inputs[(w, r % cfg.users, r % cfg.candidate_sets)]
                c0, t0 = time.process_time(), time.perf_counter()
                index = run(peer, loaded[d].fused, *args)
                seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
                results[(w, d, peer)] = retrieved(index, args[0], args[1], loaded[d].fused)
                if r >= cfg.warmup:
                    wall[(w, d, peer)].append(seconds)
                    cpu[(w, d, peer)].append(cpu_seconds)
            for (w, d, peer), index in results.items():
                same[(w, d, peer)].append(float((index == results[(w, d, "fused kernel")]).all(axis=1).mean()))
    flops = {w.name: 4.0 * w.candidates * w.history for w in workloads}  # x d: C x N dot products of 2d, 2 flops each
    return [{"workload": w, "att_dim": d, "peer": p, "p50_ms": round(float(np.median(wall[(w, d, p)])) * 1000.0, 4),
             "cpu_p50_ms": round(float(np.median(cpu[(w, d, p)])) * 1000.0, 4), "same_events": round(float(np.mean(same[(w, d, p)])), 4),
             "gflops": round(flops[w] * d / float(np.median(wall[(w, d, p)])) / 1e9, 2)}
            for w, d, p in jobs]  # fmt: skip


SATURATION_CALLERS = 4  # callers at once in the saturation rounds: DARE_SCORING_THREADS' default


def search_variants(loaded: Any, search_threads: int) -> dict[str, tuple[Any, int]]:
    """The search as it was before the split and the bfloat16 pass 1 (float32, one thread), with the split only, and as
    the service runs it: name -> (model, search threads). The float32 variants are the same tables without the
    bfloat16 copies."""
    float32 = replace(loaded, fused=replace(loaded.fused, bf16=None)) if loaded.fused is not None else loaded
    variants = {"float32, 1 thread": (float32, 1), f"float32, split over {search_threads}": (float32, search_threads)}
    if loaded.fused is not None and loaded.fused.bf16 is not None:
        variants[f"bfloat16 pass 1, split over {search_threads}"] = (loaded, search_threads)
    return variants


def measure_saturation(cfg: BenchConfig, data: BenchData, store: Any, registry: Any, loaded: dict[int, Any]) -> list[dict[str, Any]]:
    """Per long workload at the smallest att dim and per search variant (`search_variants`): the in-process call's
    p50 one call at a time, and the answers/s of SATURATION_CALLERS threads calling at once (each calls again as soon
    as it has its answer), after `warmup` untimed rounds. Rounds alternate between the variants, so load from other
    processes hits all alike."""
    from concurrent.futures import ThreadPoolExecutor

    from service.core.config import DEFAULT_SEARCH_THREADS
    from service.engine import ScoringEngine

    dim = min(cfg.att_dims)
    variants = search_variants(loaded[dim], DEFAULT_SEARCH_THREADS)
    engines = {name: ScoringEngine(store, registry, max_history=max(w.history for w in cfg.workloads), search_threads=threads)
               for name, (_, threads) in variants.items()}  # fmt: skip
    rounds, seconds = (1, 0.2) if cfg.quick else (6, 1.5)
    latency: dict[tuple[str, str], list[float]] = {}
    rate: dict[tuple[str, str], list[float]] = {}
    with ThreadPoolExecutor(SATURATION_CALLERS) as pool:
        for r in _progress(range(cfg.warmup + rounds), cfg, desc="saturation: search variants"):
            timed = r >= cfg.warmup
            for w in [w for w in cfg.workloads if w.name in LONG]:
                for name, (model, _) in variants.items():
                    engine = engines[name]

                    def call(i: int, w: Workload = w, engine: Any = engine, model: Any = model) -> None:
                        items, cates = data.candidates[w.name][i % cfg.candidate_sets]
                        engine.score(data.users[w.name][i % cfg.users], items, cates, model=model)

                    for i in range(5):
                        t0 = time.perf_counter()
                        call(r + i)
                        if timed:
                            latency.setdefault((w.name, name), []).append(time.perf_counter() - t0)

                    def caller(start: int) -> int:
                        done, end = 0, time.perf_counter() + seconds
                        while time.perf_counter() < end:
                            call(start + done)
                            done += 1
                        return done

                    t0 = time.perf_counter()
                    answers = sum(pool.map(caller, range(SATURATION_CALLERS)))
                    if timed:
                        rate.setdefault((w.name, name), []).append(answers / (time.perf_counter() - t0))
    for engine in engines.values():
        engine.splitter.shutdown()
    return [{"workload": w, "att_dim": dim, "search": name, "p50_ms": round(float(np.median(latency[(w, name)])) * 1000.0, 4),
             "answers_per_s": round(float(np.median(rate[(w, name)])), 2), "rounds": [round(x, 2) for x in rate[(w, name)]]}
            for (w, name) in rate]  # fmt: skip


def peak_gflops(repeats: int = 5, n: int = 1024) -> float:
    """This CPU's single-thread float32 arithmetic peak as measured: the best of `repeats` n x n x n GEMMs through
    numpy's BLAS on one thread (2 n^3 flops each)."""
    from threadpoolctl import threadpool_limits

    a, b = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    best = float("inf")
    with threadpool_limits(limits=1):
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def to_records(samples: Samples) -> list[dict[str, Any]]:
    """The JSON records: {att_dim, workload, backend, stage, p50_ms, p99_ms}, sorted for people."""
    order = {s: i for i, s in enumerate((*STAGES, HTTP_STAGE, OUTSIDE_STAGE))}
    records = []
    for (workload, dim, backend, stage), seconds in samples.values.items():
        ms = np.asarray(seconds) * 1000.0
        records.append({
            "att_dim": dim, "workload": workload, "backend": backend, "stage": stage,
            "p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
        })  # fmt: skip
    records.sort(key=lambda r: (r["workload"], BACKENDS.index(r["backend"]), order[r["stage"]], r["att_dim"]))
    return records


@dataclass(frozen=True)
class Ratio:
    name: str
    workload: str
    detail: str  # which dims / stages
    value: float
    goal: str  # ">= 4" / "<= 1.25"
    met: bool


def _at_least(name: str, workload: str, detail: str, value: float, goal: float) -> Ratio:
    return Ratio(name, workload, detail, value, f">= {goal:g}", value >= goal)


def _at_most(name: str, workload: str, detail: str, value: float, goal: float) -> Ratio:
    return Ratio(name, workload, detail, value, f"<= {goal:g}", value <= goal)


def target_ratios(records: list[dict[str, Any]], cfg: BenchConfig, meta: dict[str, Any] | None = None) -> list[Ratio]:
    """The targets as same-run ratios of p50s: search dim scaling at W2 (largest / smallest dim), PyTorch eager /
    onnxruntime at W2 (whole call, every dim), POST /score over HTTP / in-process at W2 and W3. With `meta` (the
    back-to-back and peer rows): the same in CPU time and back to back, the service's own overhead at W1 against
    the framework floor, and the fused kernel against the faster of FAISS and numpy at W2 and W3, att min."""
    p50 = {(r["workload"], r["att_dim"], r["backend"], r["stage"]): float(r["p50_ms"]) for r in records}
    lo, hi = min(cfg.att_dims), max(cfg.att_dims)
    names = [w.name for w in cfg.workloads]
    w2 = "W2" if "W2" in names else names[0]
    long = [w for w in names if w in LONG]
    ratios: list[Ratio] = []
    a, b = p50.get((w2, hi, "onnxruntime", "search")), p50.get((w2, lo, "onnxruntime", "search"))
    if a is not None and b and hi != lo:
        ratios.append(_at_least("search att_dim scaling", w2, f"search p50 att{hi} / att{lo}", a / b, 4))
    for d in cfg.att_dims:
        t, o = p50.get((w2, d, "torch", "total")), p50.get((w2, d, "onnxruntime", "total"))
        if t is not None and o:
            ratios.append(_at_least("torch eager / onnxruntime", w2, f"total p50, att{d}", t / o, 2))
    for w in long:
        for d in cfg.att_dims:
            h, o = p50.get((w, d, "onnxruntime", HTTP_STAGE)), p50.get((w, d, "onnxruntime", "total"))
            if h is not None and o:
                ratios.append(_at_most("HTTP / in-process", w, f"POST /score p50 / in-process total p50, att{d}", h / o, 1.25))
    if meta is None:
        return ratios
    peers = {(p["workload"], p["att_dim"], p["peer"]): p for p in meta.get("search_peers", [])}
    if (w2, lo, "fused kernel") in peers and (w2, hi, "fused kernel") in peers and hi != lo:
        v = peers[(w2, hi, "fused kernel")]["cpu_p50_ms"] / peers[(w2, lo, "fused kernel")]["cpu_p50_ms"]
        ratios.append(_at_least("search att_dim scaling (CPU time)", w2, f"fused search CPU p50 att{hi} / att{lo}", v, 4))
    cpu = meta.get("cpu_p50_ms", {})
    for d in cfg.att_dims:
        t, o = cpu.get(f"{w2}|{d}|torch"), cpu.get(f"{w2}|{d}|onnxruntime")
        if t is not None and o:
            ratios.append(_at_least("torch eager / onnxruntime (CPU time)", w2, f"total CPU p50, att{d}", t / o, 2))
    for row in meta.get("http_paired", []):
        w, d = row["workload"], row["att_dim"]
        if w in long:
            ratios.append(_at_most("HTTP / in-process (back to back)", w, f"POST /score p50 / in-process p50, att{d}",
                                   row["http_p50_ms"] / row["in_process_p50_ms"], 1.25))  # fmt: skip
            if row["in_process_cpu_ms"]:
                ratios.append(_at_most("HTTP / in-process (CPU time)", w, f"server CPU per POST /score / in-process CPU, att{d}",
                                       row["http_server_cpu_ms"] / row["in_process_cpu_ms"], 1.25))  # fmt: skip
        elif w == "W1":
            overhead = row["http_p50_ms"] - row["in_process_p50_ms"]
            ratios.append(_at_most("service overhead / framework floor", w, f"(POST /score - in-process) / floor p50, att{d}",
                                   overhead / row["floor_p50_ms"], 1.5))  # fmt: skip
            overhead_cpu = row["http_server_cpu_ms"] - row["in_process_cpu_ms"]
            if row["floor_server_cpu_ms"]:
                ratios.append(_at_most("service overhead / framework floor (CPU time)", w,
                                       f"(server CPU per POST /score - in-process CPU) / floor server CPU, att{d}",
                                       overhead_cpu / row["floor_server_cpu_ms"], 1.5))  # fmt: skip
    for w in long:
        kernel = peers.get((w, lo, "fused kernel"))
        others = [peers[(w, lo, p)]["p50_ms"] for p in OTHERS if (w, lo, p) in peers]
        if kernel is not None and others:
            ratios.append(_at_least("fused kernel vs best peer", w, f"best of FAISS, numpy p50 / fused kernel p50, att{lo}",
                                    min(others) / kernel["p50_ms"], 1.5))  # fmt: skip
        float32, bf16 = (peers.get((w, lo, v)) for v in VARIANTS)
        if float32 is not None and bf16 is not None and w == "W3":
            ratios.append(_at_least("bfloat16 pass 1 (served where it pays)", w, f"kernel p50, float32 pass 1 / bfloat16 pass 1, att{lo}",
                                    float32["p50_ms"] / bf16["p50_ms"], 1.3))  # fmt: skip
    rates = {(r["workload"], r["search"]): r["answers_per_s"] for r in meta.get("saturation", [])}
    for (w, name), served in rates.items():
        before = rates.get((w, "float32, 1 thread"))
        if w == w2 and name != "float32, 1 thread" and before:
            ratios.append(_at_least("answers/s at saturation, vs the search before the split and bfloat16", w,
                                    f"{name} / float32, 1 thread, att{lo}", served / before, 1.0))  # fmt: skip
    # Absolute targets (ms): W4's POST /score, and what W3 spends outside the search (store, ids, scoring, HTTP).
    w3, w4 = p50.get(("W3", lo, "onnxruntime", HTTP_STAGE)), p50.get(("W4", lo, "onnxruntime", HTTP_STAGE))
    if w4 is not None and not cfg.quick:
        ratios.append(_at_most("POST /score p50 ms", "W4", f"att{lo}", w4, 25))
    outside = p50.get(("W3", lo, "onnxruntime", OUTSIDE_STAGE))
    if outside is not None and not cfg.quick:
        ratios.append(_at_most("ms outside the search", "W3", f"p50 of POST /score - the answer's own search, att{lo}", outside, 4))
    for row in meta.get("http_paired", []):
        if row["workload"] == "W3" and row["att_dim"] == lo and not cfg.quick:
            ratios.append(_at_most("ms outside the search (back to back)", "W3", f"p50 of POST /score - the answer's own search, att{lo}",
                                   row["http_outside_search_p50_ms"], 4))  # fmt: skip
    for row in meta.get("fixed_rate", []):
        if row["workload"] == "W3" and not cfg.quick:
            rate = f"{row['rate']:g} requests/s"
            ratios.append(_at_most(f"POST /score p99 ms at {rate}", "W3", f"open loop, att{row['att_dim']}", row["p99_ms"], 15))
            ratios.append(_at_most(f"ms outside the search at {rate}", "W3", f"p50 of POST /score - the answer's own search, att{row['att_dim']}",
                                   row["outside_search_p50_ms"], 4))  # fmt: skip
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
        "## Targets (ratios of p50s from this run; CPU time: this process's CPU time; back to back and peers: the "
        "tables below)",
        "",
        "| target | workload | what | ratio | goal | met |",
        "|---|---|---|---:|---|---|",
    ]
    lines += [f"| {r.name} | {r.workload} | {r.detail} | {r.value:.2f} | {r.goal} | {'yes' if r.met else '**no**'} |" for r in ratios]
    lines += ["", "## Latency per stage: p50 ms (p99 ms)", ""]
    lines.append("| workload | backend | stage | " + " | ".join(f"att {d}" for d in dims) + " |")
    lines.append("|---|---|---|" + "---:|" * len(dims))
    cells = {(r["workload"], r["backend"], r["stage"], r["att_dim"]): r for r in records}
    for w, b, s in dict.fromkeys((r["workload"], r["backend"], r["stage"]) for r in records):
        row = [f"{c['p50_ms']:.3f} ({c['p99_ms']:.3f})" if (c := cells.get((w, b, s, d))) else "" for d in dims]
        name = {HTTP_STAGE: "POST /score (HTTP)", OUTSIDE_STAGE: "POST /score outside its search"}.get(s, s)
        lines.append(f"| {w} | {b} | {name} | " + " | ".join(row) + " |")
    if meta.get("http_paired"):
        lines += ["", "## POST /score, in-process and the framework floor, back to back (p50 ms)", "",
                  "The in-process call, POST /score to `dare serve`, and the same body POSTed to `floor_app` (bare "
                  "uvicorn + FastAPI, no service code), one after another on the same user and candidates, so the "
                  "service is as warm as the in-process engine.", "",
                  "Wall p50 ms, and in brackets CPU ms per call: the bench process's for the in-process call, each server "
                  "process's own for POST /score and the floor.", "",
                  "| workload | att dim | in-process | POST /score | HTTP / in-process | service overhead (POST - in-process) | framework floor | overhead / floor | POST /score outside its search |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for row in meta["http_paired"]:
            o, h, f = row["in_process_p50_ms"], row["http_p50_ms"], row["floor_p50_ms"]
            oc, hc, fc = row["in_process_cpu_ms"], row["http_server_cpu_ms"], row["floor_server_cpu_ms"]
            cpu_ratio = f"{hc / oc:.2f}" if oc else "-"
            cpu_floor = f"{(hc - oc) / fc:.2f}" if fc else "-"
            lines.append(f"| {row['workload']} | {row['att_dim']} | {o:.3f} ({oc:.3f}) | {h:.3f} ({hc:.3f}) | {h / o:.2f} ({cpu_ratio}) | "
                         f"{h - o:.3f} ({hc - oc:.3f}) | {f:.3f} ({fc:.3f}) | {(h - o) / f:.2f} ({cpu_floor}) | {row['http_outside_search_p50_ms']:.3f} |")
    if meta.get("fixed_rate"):
        lines += ["", f"## POST /score at a fixed rate ({meta['fixed_rate'][0]['rate']:g} requests/s, open loop)", "",
                  "Each request is due at a fixed time and timed from then (two keep-alive connections take turns), so "
                  "the service sits idle between requests, as under light traffic. Stage p50s: the service's own timers "
                  "in the same answers, to set beside the per-stage table above, whose calls follow each other closely. "
                  + ("On this machine a fixed pure-Python loop ran {ratio:.2f}x slower right after {idle_ms:.0f} ms idle than "
                     "straight after another run ({busy_us:.0f} vs {after_idle_us:.0f} us, medians).".format(**idle)
                     if (idle := meta.get("slowdown_after_idle")) else ""), "",
                  "| workload | att dim | requests | p50 ms | p95 ms | p99 ms | max ms | store_fetch | id_mapping | search | scoring | outside the search |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for row in meta["fixed_rate"]:
            st = row["stages_p50_ms"]
            lines.append(f"| {row['workload']} | {row['att_dim']} | {row['requests']} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} | "
                         f"{row['p99_ms']:.2f} | {row['max_ms']:.2f} | {st['store_fetch']:.2f} | {st['id_mapping']:.2f} | "
                         f"{st['search']:.2f} | {st['scoring']:.2f} | {row['outside_search_p50_ms']:.2f} |")
    if meta.get("search_peers"):
        lines += ["", "## The search and its peers, interleaved call by call: p50 ms wall (CPU)", "",
                  "Same tables, histories and candidates; one thread each; the peers gather [item, cate, position] "
                  "rows, score them (FAISS `knn` inner product on its BLAS path; numpy matmul + argpartition) and take "
                  "the softmax of the top-K. The fused kernel runs as served (pass 2 always float32; pass 1 in "
                  f"{', '.join(f'att {d}: {p}' for d, p in meta['pass1_served'].items())}: DARE_SEARCH_PRECISION=auto "
                  "times both when a model loads); `fused, float32 pass 1` and `fused, bfloat16 pass 1` are the same "
                  "kernel with each (shown where the CPU has AVX-512 BF16). `same` = share of candidates whose retrieved "
                  "events equal the kernel's. Kernel "
                  "GFLOP/s: 4 C N d flops per call over its wall p50; peak: the best single-thread float32 GEMM through "
                  f"numpy's BLAS in this run, {meta['peak_gflops']:.1f} GFLOP/s.", "",
                  "| workload | att dim | " + " | ".join(PEERS) + " | same (faiss, numpy) | kernel GFLOP/s (share of peak) |",
                  "|---|---:|" + "---:|" * len(PEERS) + "---|---:|"]  # fmt: skip
        peers = {(p["workload"], p["att_dim"], p["peer"]): p for p in meta["search_peers"]}
        for w, d in dict.fromkeys((p["workload"], p["att_dim"]) for p in meta["search_peers"]):
            cells_ = [f"{peers[(w, d, p)]['p50_ms']:.3f} ({peers[(w, d, p)]['cpu_p50_ms']:.3f})" if (w, d, p) in peers else "-" for p in PEERS]
            same = ", ".join(f"{peers[(w, d, p)]['same_events']:.2f}" for p in OTHERS)
            rate = peers[(w, d, "fused kernel")]["gflops"]
            lines.append(f"| {w} | {d} | " + " | ".join(cells_) + f" | {same} | {rate:.1f} ({rate / meta['peak_gflops']:.0%}) |")
    if meta.get("saturation"):
        lines += ["", f"## The search variants at saturation ({SATURATION_CALLERS} threads calling the in-process engine at once)", "",
                  "Rounds alternate between the variants: the search as it was before the split and the bfloat16 pass 1 "
                  "(float32, one thread), with the split, and as served. p50: one call at a time; answers/s: the median "
                  "round.", "", "| workload | att dim | search | p50 ms, one call at a time | answers/s at saturation | rounds |",
                  "|---|---:|---|---:|---:|---|"]  # fmt: skip
        for row in meta["saturation"]:
            lines.append(f"| {row['workload']} | {row['att_dim']} | {row['search']} | {row['p50_ms']:.3f} | "
                         f"{row['answers_per_s']:.1f} | {', '.join(f'{x:.0f}' for x in row['rounds'])} |")
    lines += ["", "Stages: store_fetch (Redis read + decode), id_mapping (raw ids -> rows), search (the service's "
              f"search: {'the fused kernel (service/search.py) from 10 x top-K events, else search.onnx' if meta.get('fused_search') is True else 'search.onnx'} "
              "/ CTRModel.search), scoring (score.onnx / CTRModel.score + sigmoid), total (the whole in-process call); "
              "POST /score: end to end over HTTP to `dare serve` (1 worker), one keep-alive connection, a lean "
              "raw-socket client.", ""]  # fmt: skip
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


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def slowdown_after_idle(rounds: int = 20, idle_s: float = 0.1) -> dict[str, float]:
    """How much slower this CPU runs a fixed pure-Python loop (~0.1 ms, no memory traffic) right after `idle_s` of
    sleep than straight after another run: on a virtual machine whose cores idle, the first milliseconds of a request
    can run slower, which the fixed-rate rows pay and the back-to-back rows do not."""

    def loop() -> float:
        t0, x = time.perf_counter(), 0
        for i in range(3_000):
            x += i
        return time.perf_counter() - t0

    warm, cold = [], []
    for _ in range(rounds):
        loop()
        warm.append(loop())
        time.sleep(idle_s)
        cold.append(loop())
    w, c = float(np.median(warm)), float(np.median(cold))
    return {"busy_us": round(w * 1e6, 1), "after_idle_us": round(c * 1e6, 1), "idle_ms": idle_s * 1000.0, "ratio": round(c / w, 2)}


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


def run(cfg: BenchConfig, command: str = "dare bench") -> tuple[list[dict[str, Any]], list[Path]]:
    """The whole benchmark; returns the records and the files written."""
    cfg = quick_config(cfg) if cfg.quick else cfg  # idempotent
    cfg.check()
    import onnxruntime as ort
    import torch

    from service.engine import ScoringEngine
    from service.redis_server import RedisServer
    from service.registry import InferenceOptions, ModelRegistry
    from service.core.config import DEFAULT_SEARCH_THREADS
    from service.search import kernel_available
    from service.store import SequenceStore, connect

    started = time.perf_counter()
    load_before = _load()
    torch.set_num_threads(cfg.threads)
    with ExitStack() as stack:
        if cfg.work_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dare-bench-")))
        else:
            work = cfg.work_dir
            shutil.rmtree(work / "models", ignore_errors=True)  # rebuilt by every run
            work.mkdir(parents=True, exist_ok=True)
        redis_server = stack.enter_context(RedisServer(work / "redis"))
        longest = max(w.history for w in cfg.workloads)
        store = SequenceStore(connect(redis_server.url, socket_timeout_s=30.0), lifelong_max_events=longest)
        stack.callback(store.close)
        data = make_data(cfg, store, work)
        models = build_models(cfg, data, work / "models")

        registry = ModelRegistry(work / "models", InferenceOptions(intra_op_threads=cfg.threads, inter_op_threads=1))
        report = registry.reload()
        if report.rejected:
            raise BenchError(f"the exported models were rejected by the service: {report.rejected}")
        # The service's default DARE_SEARCH_THREADS, so in-process and POST /score run the same code.
        engine = ScoringEngine(store, registry, max_history=longest, search_threads=DEFAULT_SEARCH_THREADS)
        loaded = {d: registry.current.get(model_name(d, cfg.repr_dim)) for d in cfg.att_dims}
        fused_search: bool | str = all(loaded[d].fused is not None for d in cfg.att_dims) or (
            kernel_available()[1] or "the models carry no attention tables"
        )
        torch_paths = {d: TorchPath(store, loaded[d], models[d], longest) for d in cfg.att_dims}

        client = None
        if cfg.http:
            process, port = start_service(work / "models", redis_server.url, cfg.threads, work / "serve.log")
            stack.callback(stop_process, process)
            client = HttpClient(port)
            stack.callback(client.close)
        samples = measure(cfg, data, engine, loaded, torch_paths, client)
        http_paired, fixed_rate = [], []
        if client is not None:
            servers = {"http": (client.port, process.pid), "floor": stack.enter_context(floor_server(work / "floor.log"))}
            http_paired = measure_http_paired(cfg, data, engine, loaded, servers)
            fixed_rate = measure_fixed_rate(cfg, data, client.port)
        search_peers = measure_search_peers(cfg, data, store, loaded)
        saturation = measure_saturation(cfg, data, store, registry, loaded)

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
        "http_paired": http_paired,
        "fixed_rate": fixed_rate,
        "search_peers": search_peers,
        "saturation": saturation,
        "peak_gflops": round(peak_gflops(), 2),
        "slowdown_after_idle": slowdown_after_idle(rounds=3 if cfg.quick else 20),
        "fused_search": fused_search,  # True, or why search.onnx ran instead
        "pass1_served": {d: "search.onnx" if (f := loaded[d].fused) is None else "bfloat16" if f.bf16 is not None else "float32"
                         for d in cfg.att_dims},  # fmt: skip
        "random_init": True,
        "synthetic_data": True,
    }
    return records, write_outputs(cfg, records, meta)


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
    quick: Annotated[bool, typer.Option("--quick", help="tiny sizes for a smoke run (2 dims, short histories)")] = False,
    work: Annotated[
        Optional[Path], typer.Option("--work", help="keep Redis data, models and serve.log here (default: a temporary folder)")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars on stderr")] = True,
    work_dir: Annotated[Optional[Path], typer.Option("--work-dir", hidden=True)] = None,  # the old spelling of --work
) -> None:
    """Latency per stage (store fetch, id mapping, search, scoring, total) at W1/W2/W3 for each attention dim, in
    onnxruntime (the service's engine), PyTorch eager and over HTTP, against the framework floor, and the search
    against FAISS and numpy; writes JSON, a markdown table and a PNG chart."""
    cfg = BenchConfig(out=out, att_dims=int_list("--att-dims", att_dims), repr_dim=repr_dim, repeats=repeats, warmup=warmup, threads=threads,
                      http=http, quick=quick, work_dir=renamed("--work-dir", "--work", work_dir) or work, seed=seed,
                      progress=progress)  # fmt: skip
    records, files = run(cfg, command=shlex.join(["dare", *sys.argv[1:]]))
    typer.echo(files[2].read_text(encoding="utf-8"))
    typer.echo("wrote " + ", ".join(str(f) for f in files))

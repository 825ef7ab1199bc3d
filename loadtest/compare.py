"""`dare loadtest`: Locust, headless, against each attention dim in turn; a markdown table and a PNG chart.

For each workload (the real bundled sample; long sequences of 10k events per user resampled from it) it

    1. loads the workload's users into a private redis-server (FLUSHALL first; never the machine's shared Redis),
    2. starts `dare serve` pinned to the service's cores, the load generator pinned to the others,
    3. for each model (att dims 16, 32, 64, 128 by default) and each load — `fixed` (the same request rate for every
       model, so latencies compare) and `rising` (closed-loop users ramping up, so throughput compares) — runs
       `locust --headless --csv` with loadtest/locustfile.py, which validates every answer,
    4. takes exact latency percentiles from the raw latencies the locustfile writes (Locust's CSV rounds them),
       requests/s and failures from Locust's CSV.

It writes `<out>/loadtest.json` (one record per run), `<out>/loadtest.md` (the table) and `<out>/loadtest.png`.
Every Locust run is bounded by `--duration`; the whole command by roughly workloads x models x 2 x duration.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dare_common import DareError
from dare.processes import stop_process
from loadtest.processes import dare_args, pinned, read_locust_stats, start_dare_serve
from service.redis_server import RedisServer, free_port
from dare_common.taobao import SAMPLE, iter_rows
from loadtest.scenario import Payloads, ScenarioSettings

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
WORKLOADS = ("real", "long")
LONG_USER_BASE = 90_000_000  # the long workload's user ids: above the sample's
LONG_START = 1_511_539_200  # 2017-11-25 00:00 UTC, the first day of the Taobao log
LOADS = ("fixed", "rising")


class LoadtestError(DareError):
    """A load test cannot run: models missing, the service would not start, Locust produced no statistics."""


@dataclass(frozen=True)
class LoadtestConfig:
    models: Path
    att_dims: tuple[int, ...] = (16, 32, 64, 128)
    workloads: tuple[str, ...] = WORKLOADS
    duration_s: int = 20
    fixed_users: int = 4
    fixed_rate: float = 5.0  # requests/s per user: 4 users x 5/s = 20 requests/s, the same for every model
    ramp_users: int = 16
    real_candidates: int = 100
    long_candidates: int = 200
    long_users: int = 40
    long_events: int = 10_000
    workers: int = 1
    service_cpus: tuple[int, ...] = (0,)
    locust_cpus: tuple[int, ...] = (1,)
    out: Path = Path("docs/loadtest")
    work: Path = Path("var/loadtest")
    sample: Path = SAMPLE
    port: int = 0  # 0 = a free port

    def __post_init__(self) -> None:
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown:
            raise LoadtestError(f"--workloads: unknown {unknown}; choose from {list(WORKLOADS)}")
        if self.duration_s < 5:
            raise LoadtestError(f"--duration must be at least 5 s, got {self.duration_s}")
        if not self.models.is_dir():
            raise LoadtestError(f"--models {self.models}: no such folder (build models with `dare demo --no-serve "
                                f"--att-dims 16,32,64,128`)")
        available = set(os.sched_getaffinity(0))
        for option, cpus in (("--service-cpus", self.service_cpus), ("--locust-cpus", self.locust_cpus)):
            if not cpus or not set(cpus) <= available:
                raise LoadtestError(f"{option}: cores {list(cpus)} not all available (this process may use "
                                    f"{sorted(available)})")


@dataclass
class RunResult:
    workload: str
    load: str
    model: str
    att_dim: int
    candidates: int
    users: int
    duration_s: float
    requests: int
    failures: int
    rps: float
    peak_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    failure_reasons: list[str] = field(default_factory=list)


# -------------------------------------------------------------------------------------------------------------
# Models, workloads, processes
# -------------------------------------------------------------------------------------------------------------


def find_models(folder: Path, att_dims: tuple[int, ...]) -> dict[int, str]:
    """att_dim -> model name for the DARE model folders under `folder` (validated against their manifests)."""
    from service.contract import ModelFolderError, load_manifest

    found: dict[int, str] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            manifest = load_manifest(sub, verify_hashes=False)
        except ModelFolderError:
            continue
        if manifest.model_kind == "dare":
            found.setdefault(manifest.att_dim, manifest.name)
    missing = [d for d in att_dims if d not in found]
    if missing:
        raise LoadtestError(
            f"{folder}: no DARE model with attention dim {missing} (found {sorted(found) or 'none'}); build them with "
            f"`dare demo --no-serve --att-dims {','.join(map(str, att_dims))} --models {folder}`"
        )
    return {d: found[d] for d in att_dims}


def run_checked(command: list[str], what: str, timeout_s: float, **kwargs: object) -> None:
    try:
        result = subprocess.run(command, timeout=timeout_s, check=False, **kwargs)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired:
        raise LoadtestError(f"{what} did not finish within {timeout_s:.0f} s") from None
    if result.returncode != 0:
        raise LoadtestError(f"{what} failed with exit code {result.returncode}")


def workload_file(cfg: LoadtestConfig, workload: str) -> Path:
    """The Taobao-format file a workload loads and draws its payloads from (built once, then reused).

    The long workload's users are SYNTHETIC, their events real: `long_users` users of `long_events` page views each,
    drawn (by popularity, with replacement) from the bundled sample's page views, one second apart. So the histories
    and candidates hold items and categories the models know, as in production; ids that no model knows (`dare
    synth`'s) all map to the out-of-vocabulary rows, and equal candidates are scored once (service/engine.py), so such
    a request searches for one candidate, not 200."""
    if workload == "real":
        return cfg.sample
    path = cfg.work / f"resampled-{cfg.long_users}u-{cfg.long_events}e.csv"
    done = path.with_name(path.name + ".done")  # written last: a run interrupted half way is redone
    if not (path.is_file() and done.is_file()):
        print(f"long workload: {cfg.long_users} SYNTHETIC users x {cfg.long_events:,} page views resampled from "
              f"{cfg.sample} -> {path}", flush=True)  # fmt: skip
        views = [(item, cate) for _user, item, cate, behaviour, _ts in iter_rows(cfg.sample) if behaviour == "pv"]
        rng = random.Random(0)
        cfg.work.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as out:
            for u in range(cfg.long_users):
                user = LONG_USER_BASE + u
                out.writelines(f"{user},{item},{cate},pv,{LONG_START + t}\n"
                               for t, (item, cate) in enumerate(rng.choices(views, k=cfg.long_events)))  # fmt: skip
        done.write_text("ok\n", encoding="utf-8")
    return path


def start_service(cfg: LoadtestConfig, redis_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DARE_REDIS_URL": redis_url, "DARE_LOG_LEVEL": "warning"}
    return start_dare_serve(["--models", str(cfg.models), "--host", "127.0.0.1", "--workers", str(cfg.workers)], port, log,
                            env, error=LoadtestError, ready_within_s=120, preexec_fn=pinned(cfg.service_cpus))  # fmt: skip


def locust_env(cfg: LoadtestConfig, data: Path, model: str, candidates: int, load: str, raw: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "DARE_LOADTEST_DATA": str(data),
        "DARE_LOADTEST_MODEL": model,
        "DARE_LOADTEST_CANDIDATES": str(candidates),
        "DARE_LOADTEST_RAW": str(raw),
        "DARE_LOADTEST_RATE": str(cfg.fixed_rate if load == "fixed" else 0),
    }
    if load == "rising":
        env |= {"DARE_LOADTEST_SHAPE": "ramp", "DARE_LOADTEST_RAMP_USERS": str(cfg.ramp_users),
                "DARE_LOADTEST_RAMP_SECONDS": str(cfg.duration_s)}  # fmt: skip
    else:
        env.pop("DARE_LOADTEST_SHAPE", None)
    return env


def run_locust(cfg: LoadtestConfig, base_url: str, data: Path, workload: str, load: str, dim: int, model: str) -> RunResult:
    candidates = cfg.real_candidates if workload == "real" else cfg.long_candidates
    prefix = cfg.work / "locust" / f"{workload}-{load}-{model}"
    raw = Path(f"{prefix}_latencies.txt")
    for stale in prefix.parent.glob(f"{prefix.name}_*"):
        stale.unlink()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", base_url,
        "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "5",
        "--run-time", f"{cfg.duration_s}s",
    ]  # fmt: skip
    if load == "fixed":
        command += ["--users", str(cfg.fixed_users), "--spawn-rate", str(cfg.fixed_users)]
    env = locust_env(cfg, data, model, candidates, load, raw)
    started = time.perf_counter()
    with Path(f"{prefix}.log").open("wb") as log:
        try:
            finished = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False,
                           timeout=cfg.duration_s + 60, preexec_fn=pinned(cfg.locust_cpus))  # fmt: skip
        except subprocess.TimeoutExpired:
            raise LoadtestError(f"Locust did not stop within {cfg.duration_s + 60} s; see {prefix}.log") from None
    elapsed = time.perf_counter() - started
    # Locust exits 1 when any request failed; failures are a result here, counted below, not an error.
    if finished.returncode not in (0, 1):
        tail = Path(f"{prefix}.log").read_text(errors="replace")[-1500:]
        raise LoadtestError(f"Locust exited with code {finished.returncode} ({workload} {load} {model}):\n{tail}")
    requests, failures, rps, reasons = read_locust_stats(prefix, "/score", LoadtestError, max_reasons=5)
    completed = np.loadtxt(raw, ndmin=2) if raw.is_file() and raw.stat().st_size else np.zeros((0, 2))
    p50, p95, p99 = np.percentile(completed[:, 1], [50, 95, 99]) if len(completed) else (float("nan"),) * 3
    peak = peak_rps(completed[:, 0])
    return RunResult(
        workload=workload, load=load, model=model, att_dim=dim, candidates=candidates,
        users=cfg.fixed_users if load == "fixed" else cfg.ramp_users, duration_s=round(elapsed, 1),
        requests=requests, failures=failures, rps=round(rps, 2), peak_rps=round(peak, 2),
        p50_ms=round(float(p50), 3), p95_ms=round(float(p95), 3), p99_ms=round(float(p99), 3),
        failure_reasons=reasons,
    )  # fmt: skip


def peak_rps(finished_at: np.ndarray) -> float:
    """The most successful answers in any whole second of the run (the last, partial second left out)."""
    if len(finished_at) < 2:
        return 0.0
    seconds = np.floor(finished_at - finished_at.min()).astype(np.int64)  # (R,) second of the run
    counts = np.bincount(seconds)
    return float(counts[:-1].max()) if len(counts) > 1 else float(counts[0])


def warm_up(base_url: str, model: str, payloads: Payloads, candidates: int, requests: int = 20) -> None:
    """A few requests per model before measuring, so onnxruntime's first-call allocations are not in the figures."""
    rng = random.Random(1)
    headers = {"Content-Type": "application/json", **ScenarioSettings.from_env().headers}  # Locust sends the same
    for _ in range(requests):
        body = payloads.request(rng, candidates, model)
        request = urllib.request.Request(f"{base_url}/score", data=json.dumps(body).encode(),
                                         headers=headers)  # fmt: skip
        try:
            urllib.request.urlopen(request, timeout=30).read()
        except urllib.error.HTTPError as exc:
            raise LoadtestError(f"warm-up /score for {model} answered {exc.code}: {exc.read()[:300]!r}") from None


# -------------------------------------------------------------------------------------------------------------
# The whole comparison, the table, the chart
# -------------------------------------------------------------------------------------------------------------


def machine_facts(cfg: LoadtestConfig) -> dict[str, object]:
    return {
        "cpus_total": os.cpu_count(),
        "service_cpus": list(cfg.service_cpus),
        "locust_cpus": list(cfg.locust_cpus),
        "service_workers": cfg.workers,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def run_comparison(cfg: LoadtestConfig, progress: bool = True) -> list[RunResult]:
    from tqdm.auto import tqdm

    models = find_models(cfg.models, cfg.att_dims)
    results: list[RunResult] = []
    total = len(cfg.workloads) * len(models) * len(LOADS)
    bar = tqdm(total=total, desc="locust runs", unit="run", disable=not progress)
    with RedisServer(cfg.work / "redis") as redis:
        import redis as redis_client

        for workload in cfg.workloads:
            data = workload_file(cfg, workload)
            redis_client.Redis.from_url(redis.url).flushall()
            bar.set_postfix_str(f"loading {workload} into redis")
            run_checked(dare_args("load", "--input", str(data), "--redis", redis.url), f"dare load {data}",
                        timeout_s=900)  # fmt: skip
            port = cfg.port or free_port()
            base_url = f"http://127.0.0.1:{port}"
            service = start_service(cfg, redis.url, port, cfg.work / f"serve-{workload}.log")
            try:
                payloads = Payloads.from_csv(data, max_users=100, seed=1)
                for dim, model in models.items():
                    candidates = cfg.real_candidates if workload == "real" else cfg.long_candidates
                    warm_up(base_url, model, payloads, candidates)
                    for load in LOADS:
                        bar.set_postfix_str(f"{workload} {load} {model}")
                        results.append(run_locust(cfg, base_url, data, workload, load, dim, model))
                        bar.update()
            finally:
                stop_process(service)
    bar.close()
    return results


def markdown_table(results: list[RunResult]) -> str:
    lines = [
        "| workload | load | model | att dim | candidates | requests | failures | rps (mean) | rps (peak) "
        "| p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.workload} | {r.load} | {r.model} | {r.att_dim} | {r.candidates} | {r.requests} | {r.failures} "
            f"| {r.rps:.1f} | {r.peak_rps:.1f} | {r.p50_ms:.2f} | {r.p95_ms:.2f} | {r.p99_ms:.2f} |"
        )
    return "\n".join(lines) + "\n"


def draw_chart(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(w, ld) for w in dict.fromkeys(r.workload for r in results) for ld in LOADS]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7), squeeze=False)
    for col, (workload, load) in enumerate(panels):
        runs = sorted((r for r in results if r.workload == workload and r.load == load), key=lambda r: r.att_dim)
        dims = [r.att_dim for r in runs]
        top, bottom = axes[0][col], axes[1][col]
        for attr, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")):
            top.plot(dims, [getattr(r, attr) for r in runs], marker="o", label=label)
        top.set_title(f"{workload} / {load} load")
        top.set_xscale("log", base=2)
        top.set_xticks(dims, [str(d) for d in dims])
        top.set_ylabel("latency (ms)")
        top.grid(alpha=0.3)
        top.legend(fontsize=8)
        bottom.bar([str(d) for d in dims], [r.peak_rps if load == "rising" else r.rps for r in runs], color="tab:gray")
        bottom.set_ylabel("peak rps" if load == "rising" else "mean rps")
        bottom.set_xlabel("attention dim")
        for x, r in enumerate(runs):
            if r.failures:
                bottom.annotate(f"{r.failures} failed", (x, 0), ha="center", va="bottom", color="tab:red", fontsize=8)
    fig.suptitle("POST /score under Locust: latency and throughput by attention dim (DARE)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(cfg: LoadtestConfig, results: list[RunResult], command: str) -> tuple[Path, Path, Path]:
    cfg.out.mkdir(parents=True, exist_ok=True)
    facts = machine_facts(cfg)
    json_path, md_path, png_path = cfg.out / "loadtest.json", cfg.out / "loadtest.md", cfg.out / "loadtest.png"
    json_path.write_text(
        json.dumps({"command": command, "machine": facts, "config": _config_dict(cfg),
                    "runs": [asdict(r) for r in results]}, indent=2) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    header = (
        f"Command: `{command}`\n\n"
        f"Machine: {facts['cpus_total']} cores; service pinned to cores {facts['service_cpus']} "
        f"({cfg.workers} worker(s)), Locust pinned to cores {facts['locust_cpus']}. "
        f"Fixed load: {cfg.fixed_users} users x {cfg.fixed_rate:g} requests/s; rising load: 1 -> {cfg.ramp_users} "
        f"closed-loop users over {cfg.duration_s} s. Latencies are exact percentiles of every successful request "
        f"as seen by the load generator.\n\n"
    )
    md_path.write_text(header + markdown_table(results), encoding="utf-8")
    draw_chart(results, png_path)
    return json_path, md_path, png_path


def _config_dict(cfg: LoadtestConfig) -> dict[str, object]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}

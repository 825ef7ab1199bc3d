"""`dare soak`: sustained load on one `dare serve` at a fixed rate near its measured capacity (Locust, headless).

    1. loads the data file into a private, throw-away redis-server (never the machine's shared Redis),
    2. starts `dare serve` pinned to the service's cores (Locust gets the others),
    3. measures capacity with a short closed-loop Locust run (skipped when `--rate` is given) and takes
       `--capacity-fraction` of it as the fixed rate,
    4. runs Locust (loadtest/locustfile.py: FastHttpUser, constant throughput per user, every answer validated)
       for `--duration` seconds while sampling the resident memory of the server's process tree (psutil),
    5. reports failed requests, RSS growth after the warm-up, and p50/p99 per minute; writes
       `<out>/soak.json`, `<out>/soak.md` and `<out>/soak.png`.

The verdict (exit code 1 when it fails): zero failed requests and RSS growth after warm-up below
`--max-rss-growth` percent. Latency is reported, not judged. Every child process has a deadline, so the command is
bounded by roughly load + capacity probe + duration + 3 minutes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from dare_common import DareError, int_list, renamed
from dare_common.taobao import SAMPLE
from dare.processes import stop_process
from loadtest.processes import dare_args, pinned, read_locust_stats, start_dare_serve
from service.redis_server import RedisServer, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


class SoakError(DareError):
    """The soak cannot run: bad options, the service would not start, Locust wrote no results."""


@dataclass(frozen=True)
class SoakConfig:
    models: Path
    model: str = ""  # model to score with; "" = the service's default
    data: Path = SAMPLE  # loaded into the private Redis; users and candidate items are drawn from it
    duration_s: int = 600
    warmup_s: int = 60  # RSS growth is measured from the end of the warm-up
    rate: float = 0.0  # total requests/s; 0 = measure capacity, then use capacity_fraction of it
    capacity_fraction: float = 0.75
    capacity_probe_s: int = 20
    capacity_users: int = 8  # closed-loop users of the capacity probe
    users: int = 8  # Locust users sharing the fixed rate
    candidates: int = 100
    workers: int = 1
    service_cpus: tuple[int, ...] = (0,)
    locust_cpus: tuple[int, ...] = (1,)
    sample_every_s: float = 2.0  # RSS sampling period
    max_rss_growth_pct: float = 5.0
    out: Path = Path("docs/reliability")
    work: Path = Path("var/soak")

    def __post_init__(self) -> None:
        if not self.models.is_dir():
            raise SoakError(f"--models {self.models}: no such folder (build one with `dare demo --no-serve`)")
        if not self.data.is_file():
            raise SoakError(f"--data {self.data}: no such file")
        if self.duration_s < 10:
            raise SoakError(f"--duration must be at least 10 s, got {self.duration_s}")
        if not 0 <= self.warmup_s < self.duration_s:
            raise SoakError(f"--warmup must be within 0..duration ({self.duration_s}), got {self.warmup_s}")
        if self.rate < 0 or not math.isfinite(self.rate):
            raise SoakError(f"--rate must be >= 0 (0 = measure capacity), got {self.rate}")
        if not 0 < self.capacity_fraction <= 1:
            raise SoakError(f"--capacity-fraction must be within (0, 1], got {self.capacity_fraction}")
        if self.users < 1 or self.capacity_users < 1 or self.candidates < 1 or self.workers < 1:
            raise SoakError("--users, --capacity-users, --candidates and --workers must be >= 1")
        if self.capacity_probe_s < 5:
            raise SoakError(f"--capacity-probe must be at least 5 s, got {self.capacity_probe_s}")
        available = set(os.sched_getaffinity(0))
        for option, cpus in (("--service-cpus", self.service_cpus), ("--locust-cpus", self.locust_cpus)):
            if not cpus or not set(cpus) <= available:
                raise SoakError(f"{option}: cores {list(cpus)} not all available (this process may use {sorted(available)})")


@dataclass
class Minute:
    minute: int  # 0-based minute of the soak
    requests: int  # answers (successful or not) Locust counted in this minute
    failures: int
    ok: int  # successful answers with a latency
    p50_ms: float
    p99_ms: float


@dataclass
class SoakResult:
    rate: float  # the fixed total rate asked for (requests/s)
    capacity_rps: float | None  # measured closed-loop capacity (None when --rate was given)
    duration_s: float
    requests: int
    failures: int
    failure_reasons: list[str]
    achieved_rps: float
    p50_ms: float  # over the whole run, successful requests
    p99_ms: float
    p99_after_warmup_min_ms: float  # spread of the per-minute p99 after the warm-up: how stable it stays
    p99_after_warmup_max_ms: float
    rss_warm_mb: float  # median RSS of the server just after the warm-up
    rss_end_mb: float  # median RSS over the last samples
    rss_max_mb: float
    rss_growth_pct: float  # (end - warm) / warm
    passed: bool
    minutes: list[Minute] = field(default_factory=list)
    rss_samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MB)
    # The machine's 1-minute load average during the run: other jobs on the same cores show up here.
    load_samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, load)


# -------------------------------------------------------------------------------------------------------------
# Processes
# -------------------------------------------------------------------------------------------------------------


def start_service(cfg: SoakConfig, redis_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env |= {"DARE_REDIS_URL": redis_url, "DARE_LOG_LEVEL": "warning"}
    return start_dare_serve(["--models", str(cfg.models), "--host", "127.0.0.1", "--workers", str(cfg.workers)], port, log,
                            env, error=SoakError, ready_within_s=180, preexec_fn=pinned(cfg.service_cpus, new_session=True),
                            group=True)  # fmt: skip


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (the uvicorn workers of `dare serve --workers N`)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class RssSampler:
    """A background thread sampling the server's RSS (and the machine's load average) every `period` seconds."""

    def __init__(self, pid: int, period: float) -> None:
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, float]] = []  # (unix time, bytes)
        self.load: list[tuple[float, float]] = []  # (unix time, 1-minute load average)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            self.samples.append((now, float(tree_rss_bytes(self.pid))))
            self.load.append((now, os.getloadavg()[0]))
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# -------------------------------------------------------------------------------------------------------------
# Locust
# -------------------------------------------------------------------------------------------------------------


@dataclass
class LocustRun:
    started: float  # unix time Locust was launched
    requests: int
    failures: int
    rps: float
    reasons: list[str]
    completed: np.ndarray  # [R, 2]: unix completion time, latency ms (successful requests)
    history: list[tuple[float, int, int]]  # (unix time, cumulative requests, cumulative failures)


def run_locust(cfg: SoakConfig, base_url: str, prefix: Path, users: int, per_user_rate: float, seconds: int,
               progress: bool) -> LocustRun:  # fmt: skip
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for stale in prefix.parent.glob(f"{prefix.name}_*"):
        stale.unlink()
    raw = Path(f"{prefix}_latencies.txt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARE_LOADTEST_")}
    env |= {
        "DARE_LOADTEST_DATA": str(cfg.data),
        "DARE_LOADTEST_MODEL": cfg.model,
        "DARE_LOADTEST_CANDIDATES": str(cfg.candidates),
        "DARE_LOADTEST_RATE": repr(per_user_rate),
        "DARE_LOADTEST_RAW": str(raw),
    }
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", base_url,
        "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "5",
        "--run-time", f"{seconds}s", "--users", str(users), "--spawn-rate", str(users),
    ]  # fmt: skip
    from tqdm.auto import tqdm

    started = time.time()
    with Path(f"{prefix}.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=pinned(cfg.locust_cpus, new_session=True))  # fmt: skip
        deadline = time.monotonic() + seconds + 120
        with tqdm(total=seconds, desc=prefix.name, unit="s", disable=not progress) as bar:
            while process.poll() is None:
                if time.monotonic() > deadline:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    raise SoakError(f"Locust did not stop within {seconds + 120} s; see {prefix}.log")
                time.sleep(1.0)
                bar.n = min(seconds, int(time.time() - started))
                bar.refresh()
    # Locust exits 1 when a request failed: a result, counted below. Anything else is an error.
    if process.returncode not in (0, 1):
        tail = Path(f"{prefix}.log").read_text(errors="replace")[-1500:]
        raise SoakError(f"Locust exited with code {process.returncode}:\n{tail}")
    requests, failures, rps, reasons = read_locust_stats(prefix, "Aggregated", SoakError, max_reasons=10)
    completed = np.zeros((0, 2))
    if raw.is_file() and raw.stat().st_size:
        completed = np.loadtxt(raw, ndmin=2)  # [R, 2]
        if completed.shape[1] != 2:
            raise SoakError(f"{raw}: expected 'completion time, latency' per line (loadtest/locustfile.py)")
    return LocustRun(started, requests, failures, rps, reasons, completed, _read_history(prefix))


def _read_history(prefix: Path) -> list[tuple[float, int, int]]:
    """Locust's cumulative request and failure counts, about once a second."""
    path = Path(f"{prefix}_stats_history.csv")
    if not path.is_file():
        return []
    out = []
    with path.open(newline="") as fh:
        for r in csv.DictReader(fh):
            if r.get("Name") == "Aggregated":
                try:
                    out.append((float(r["Timestamp"]), int(r["Total Request Count"]), int(r["Total Failure Count"])))
                except (KeyError, ValueError):
                    continue
    return out


# -------------------------------------------------------------------------------------------------------------
# The soak
# -------------------------------------------------------------------------------------------------------------


def per_minute(run: LocustRun, duration_s: float) -> list[Minute]:
    minutes = max(1, math.ceil(duration_s / 60))
    t = run.completed[:, 0] - run.started if len(run.completed) else np.zeros(0)  # [R] seconds into the run
    ms = run.completed[:, 1] if len(run.completed) else np.zeros(0)  # [R]
    hist = sorted(run.history)

    def cumulative(at: float) -> tuple[int, int]:
        before = [(req, fail) for ts, req, fail in hist if ts - run.started <= at]
        return before[-1] if before else (0, 0)

    rows = []
    for m in range(minutes):
        lo, hi = 60.0 * m, 60.0 * (m + 1)
        inside = ms[(t >= lo) & (t < hi)]
        req_lo, fail_lo = cumulative(lo)
        # the last minute ends with Locust's final totals (its history file is written once a second)
        req_hi, fail_hi = cumulative(hi) if m < minutes - 1 else (run.requests, run.failures)
        p50, p99 = (np.percentile(inside, [50, 99]) if inside.size else (math.nan, math.nan))
        rows.append(Minute(m, req_hi - req_lo, fail_hi - fail_lo, int(inside.size), round(float(p50), 3),
                           round(float(p99), 3)))  # fmt: skip
    return rows


def rss_growth(samples: list[tuple[float, float]], started: float, warmup_s: float) -> tuple[float, float, float, float]:
    """(warm MB, end MB, max MB, growth %) from (unix time, bytes) samples: medians of the 5 samples right after
    the warm-up and of the last 5, so one sample caught mid-allocation does not decide."""
    after = [(t - started, b) for t, b in samples if t - started >= warmup_s and b > 0]
    if len(after) < 2:
        raise SoakError("too few memory samples after the warm-up (is --duration much longer than --warmup?)")
    warm = float(np.median([b for _, b in after[:5]]))
    end = float(np.median([b for _, b in after[-5:]]))
    peak = max(b for _, b in after)
    mb = 1024.0 * 1024.0
    return warm / mb, end / mb, peak / mb, (end - warm) / warm * 100.0


def run_soak(cfg: SoakConfig, progress: bool = True) -> SoakResult:
    cfg.work.mkdir(parents=True, exist_ok=True)
    with RedisServer(cfg.work / "redis") as redis:
        loaded = subprocess.run(dare_args("load", "--input", str(cfg.data), "--redis", redis.url, "--no-progress"),
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
        if loaded.returncode != 0:
            raise SoakError(f"dare load {cfg.data} failed: {loaded.stderr[-1000:]}")
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        service = start_service(cfg, redis.url, port, cfg.work / "serve.log")
        try:
            capacity = None
            rate = cfg.rate
            if rate == 0:
                probe = run_locust(cfg, base_url, cfg.work / "locust" / "capacity", cfg.capacity_users, 0.0,
                                   cfg.capacity_probe_s, progress)  # fmt: skip
                if probe.failures:
                    raise SoakError(f"the capacity probe saw {probe.failures} failed requests: {probe.reasons[:3]}")
                capacity = probe.rps
                rate = round(capacity * cfg.capacity_fraction, 2)
                if rate <= 0:
                    raise SoakError("the capacity probe measured 0 requests/s; see the Locust log")
            with RssSampler(service.pid, cfg.sample_every_s) as sampler:
                run = run_locust(cfg, base_url, cfg.work / "locust" / "soak", cfg.users, rate / cfg.users,
                                 cfg.duration_s, progress)  # fmt: skip
            if service.poll() is not None:
                raise SoakError(f"`dare serve` died during the soak (exit code {service.returncode})")
        finally:
            stop_process(service, 30, group=True)

    warm, end, peak, growth = rss_growth(sampler.samples, run.started, cfg.warmup_s)
    minutes = per_minute(run, cfg.duration_s)
    ms = run.completed[:, 1] if len(run.completed) else np.array([math.nan])
    after = [m.p99_ms for m in minutes if m.minute * 60 >= cfg.warmup_s and not math.isnan(m.p99_ms)]
    after = after or [m.p99_ms for m in minutes]
    return SoakResult(
        rate=rate, capacity_rps=capacity, duration_s=cfg.duration_s, requests=run.requests, failures=run.failures,
        failure_reasons=run.reasons, achieved_rps=round(run.rps, 2),
        p50_ms=round(float(np.percentile(ms, 50)), 3), p99_ms=round(float(np.percentile(ms, 99)), 3),
        p99_after_warmup_min_ms=round(min(after), 3), p99_after_warmup_max_ms=round(max(after), 3),
        rss_warm_mb=round(warm, 1), rss_end_mb=round(end, 1), rss_max_mb=round(peak, 1),
        rss_growth_pct=round(growth, 2), passed=run.failures == 0 and growth < cfg.max_rss_growth_pct,
        minutes=minutes,
        rss_samples=[(round(t - run.started, 1), round(b / 2**20, 2)) for t, b in sampler.samples],
        load_samples=[(round(t - run.started, 1), round(load, 2)) for t, load in sampler.load],
    )  # fmt: skip


# -------------------------------------------------------------------------------------------------------------
# Outputs
# -------------------------------------------------------------------------------------------------------------


def markdown(cfg: SoakConfig, result: SoakResult, command: str) -> str:
    cap = f"{result.capacity_rps:.1f} requests/s measured, x {cfg.capacity_fraction:g}" if result.capacity_rps else "given"
    lines = [
        f"Command: `{command}`",
        "",
        f"Fixed rate {result.rate:g} requests/s ({cap}) from {cfg.users} Locust users, {cfg.candidates} candidates "
        f"per request, {cfg.duration_s} s, warm-up {cfg.warmup_s} s; service pinned to cores {list(cfg.service_cpus)} "
        f"({cfg.workers} worker(s)), Locust to {list(cfg.locust_cpus)}.",
        "",
        f"- requests: {result.requests}, failed: **{result.failures}**, achieved {result.achieved_rps:g} requests/s",
        f"- latency (successful requests, whole run): p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms; "
        f"per-minute p99 after warm-up between {result.p99_after_warmup_min_ms:.2f} and "
        f"{result.p99_after_warmup_max_ms:.2f} ms",
        f"- server RSS: {result.rss_warm_mb:.1f} MB after warm-up -> {result.rss_end_mb:.1f} MB at the end "
        f"(**{result.rss_growth_pct:+.2f} %**, limit {cfg.max_rss_growth_pct:g} %), peak {result.rss_max_mb:.1f} MB",
        f"- machine load average (1 min) during the run: {min(l for _, l in result.load_samples):.2f} .. "
        f"{max(l for _, l in result.load_samples):.2f} on {os.cpu_count()} cores (other jobs included)",
        f"- verdict: **{'PASS' if result.passed else 'FAIL'}**",
        "",
        "| minute | requests | failed | p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {m.minute + 1} | {m.requests} | {m.failures} | {m.p50_ms:.2f} | {m.p99_ms:.2f} |" for m in result.minutes]
    if result.failure_reasons:
        lines += ["", "Failures: " + "; ".join(result.failure_reasons)]
    return "\n".join(lines) + "\n"


def draw(cfg: SoakConfig, result: SoakResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, req, mem) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    x = [m.minute + 0.5 for m in result.minutes]  # minute m covers [m, m + 1) minutes after the start
    lat.plot(x, [m.p50_ms for m in result.minutes], marker="o", label="p50")
    lat.plot(x, [m.p99_ms for m in result.minutes], marker="o", label="p99")
    lat.set_ylabel("latency (ms)")
    lat.set_ylim(bottom=0)
    lat.legend()
    lat.grid(alpha=0.3)
    req.bar(x, [m.requests for m in result.minutes], width=0.8, color="tab:gray", label="requests")
    req.bar(x, [m.failures for m in result.minutes], width=0.8, color="tab:red", label="failed")
    req.set_ylabel("requests per minute")
    req.legend()
    mem.plot([s / 60.0 for s, _ in result.rss_samples], [mb for _, mb in result.rss_samples], color="tab:purple")
    mem.axvspan(0, cfg.warmup_s / 60.0, color="tab:orange", alpha=0.15, label="warm-up")
    mem.set_ylabel("server RSS (MB)")
    load = mem.twinx()
    load.plot([s / 60.0 for s, _ in result.load_samples], [v for _, v in result.load_samples], color="tab:green",
              alpha=0.5, linewidth=1)  # fmt: skip
    load.set_ylabel("load average (1 min)", color="tab:green")
    load.set_ylim(bottom=0)
    mem.set_xlabel("minutes since the start of the soak")
    mem.legend()
    mem.grid(alpha=0.3)
    fig.suptitle(f"dare soak: {result.rate:g} requests/s for {cfg.duration_s} s: {result.failures} failed, "
                 f"RSS {result.rss_growth_pct:+.2f} % after warm-up")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(cfg: SoakConfig, result: SoakResult, command: str) -> tuple[Path, Path, Path]:
    cfg.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = cfg.out / "soak.json", cfg.out / "soak.md", cfg.out / "soak.png"
    machine = {"cpus_total": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "load_average": os.getloadavg()}  # fmt: skip
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    json_path.write_text(json.dumps({"command": command, "machine": machine, "config": config,
                                     "result": asdict(result)}, indent=2) + "\n", encoding="utf-8")  # fmt: skip
    md_path.write_text(markdown(cfg, result, command), encoding="utf-8")
    draw(cfg, result, png_path)
    return json_path, md_path, png_path


# -------------------------------------------------------------------------------------------------------------
# The command
# -------------------------------------------------------------------------------------------------------------


def soak(
    models: Annotated[Path, typer.Option("--models", help="folder of model folders to serve")] = Path("var/models"),
    model: Annotated[str, typer.Option("--model", help="model to score with (default: the service's default)")] = "",
    input: Annotated[Path, typer.Option("--input", help="Taobao-format CSV(.gz) loaded into the private Redis")] = SAMPLE,
    duration: Annotated[int, typer.Option("--duration", help="seconds of sustained load")] = 600,
    warmup: Annotated[int, typer.Option("--warmup", help="seconds before RSS growth is measured")] = 60,
    rate: Annotated[float, typer.Option("--rate", help="total requests/s; 0 = measure capacity first")] = 0.0,
    capacity_fraction: Annotated[float, typer.Option("--capacity-fraction", help="share of the measured capacity")] = 0.75,
    capacity_probe: Annotated[int, typer.Option("--capacity-probe", help="seconds of the capacity probe")] = 20,
    users: Annotated[int, typer.Option("--users", help="Locust users sharing the fixed rate")] = 8,
    candidates: Annotated[int, typer.Option("--candidates", help="candidates per /score request")] = 100,
    workers: Annotated[int, typer.Option("--workers", help="`dare serve` worker processes")] = 1,
    service_cpus: Annotated[str, typer.Option("--service-cpus", help="cores the service is pinned to")] = "0",
    locust_cpus: Annotated[str, typer.Option("--locust-cpus", help="cores Locust is pinned to")] = "1",
    max_rss_growth: Annotated[float, typer.Option("--max-rss-growth", help="RSS growth (%) that fails the soak")] = 5.0,
    out: Annotated[Path, typer.Option("--out", help="where soak.json, soak.md and soak.png go")] = Path("docs/reliability"),
    work: Annotated[Path, typer.Option("--work", help="scratch folder: Redis, logs, Locust CSVs")] = Path("var/soak"),
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    data: Annotated[Path | None, typer.Option("--data", hidden=True)] = None,  # the old spelling of --input
) -> None:
    """Sustained load (Locust, fixed rate near capacity): failed requests, server RSS growth, p50/p99 per minute."""
    import shlex

    cfg = SoakConfig(
        models=models, model=model, data=renamed("--data", "--input", data) or input, duration_s=duration, warmup_s=warmup, rate=rate,
        capacity_fraction=capacity_fraction, capacity_probe_s=capacity_probe, users=users, candidates=candidates,
        workers=workers, service_cpus=int_list("--service-cpus", service_cpus),
        locust_cpus=int_list("--locust-cpus", locust_cpus), max_rss_growth_pct=max_rss_growth, out=out, work=work,
    )  # fmt: skip
    result = run_soak(cfg, progress=progress)
    command = "dare " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for path in write_outputs(cfg, result, command):
        typer.echo(f"wrote {path}")
    typer.echo(markdown(cfg, result, command))
    if not result.passed:
        raise typer.Exit(1)

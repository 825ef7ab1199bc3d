"""Load-test commands (Locust, headless): `dare loadtest` compares attention dims under the same load."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from dare_common import int_list


def loadtest(
    models: Annotated[Path, typer.Option("--models", help="folder of model folders (one per attention dim)")] = Path("var/models"),
    att_dims: Annotated[str, typer.Option("--att-dims", help="attention dims to compare, comma-separated")] = "16,32,64,128",
    workloads: Annotated[str, typer.Option("--workloads", help="real (bundled sample) and/or long (synthetic 10k events)")] = "real,long",
    duration: Annotated[int, typer.Option("--duration", help="seconds per Locust run")] = 20,
    fixed_users: Annotated[int, typer.Option("--fixed-users", help="users of the fixed load")] = 4,
    fixed_rate: Annotated[float, typer.Option("--fixed-rate", help="requests/s per user of the fixed load")] = 5.0,
    ramp_users: Annotated[int, typer.Option("--ramp-users", help="closed-loop users the rising load ramps up to")] = 16,
    long_users: Annotated[int, typer.Option("--long-users", help="users in the synthetic long-sequence workload")] = 40,
    long_events: Annotated[int, typer.Option("--long-events", help="events per user in the synthetic workload")] = 10_000,
    workers: Annotated[int, typer.Option("--workers", help="`dare serve` worker processes")] = 1,
    service_cpus: Annotated[str, typer.Option("--service-cpus", help="cores the service is pinned to")] = "0",
    locust_cpus: Annotated[str, typer.Option("--locust-cpus", help="cores the load generator is pinned to")] = "1",
    out: Annotated[Path, typer.Option("--out", help="where loadtest.md, loadtest.png and loadtest.json go")] = Path("docs/loadtest"),
    work: Annotated[Path, typer.Option("--work", help="scratch folder: Locust CSVs, logs, synthetic data")] = Path("var/loadtest"),
) -> None:
    """Run Locust headless against each attention dim at a fixed and a rising load; write a table and a chart."""
    from loadtest.compare import LoadtestConfig, run_comparison, write_outputs

    cfg = LoadtestConfig(
        models=models, att_dims=int_list("--att-dims", att_dims),
        workloads=tuple(w.strip() for w in workloads.split(",") if w.strip()), duration_s=duration,
        fixed_users=fixed_users, fixed_rate=fixed_rate, ramp_users=ramp_users, long_users=long_users,
        long_events=long_events, workers=workers, service_cpus=int_list("--service-cpus", service_cpus),
        locust_cpus=int_list("--locust-cpus", locust_cpus), out=out, work=work,
    )  # fmt: skip
    results = run_comparison(cfg)
    command = "dare " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for path in write_outputs(cfg, results, command):
        typer.echo(f"wrote {path}")
    typer.echo((cfg.out / "loadtest.md").read_text(encoding="utf-8"))


def register(app: typer.Typer) -> None:
    """Owned by the shipping work package: adds `loadtest` (and `soak`, from the reliability package)."""
    app.command("loadtest")(loadtest)
    from loadtest.soak import soak

    app.command("soak")(soak)

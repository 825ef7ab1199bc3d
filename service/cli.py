"""Serving-side commands: serve, load (bench is registered by its own module). Never imports torch or `training`.

Heavy imports (onnxruntime, uvicorn, polars) happen inside the commands so `dare --help` stays fast.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from dare_common import DareError


def register(app: typer.Typer) -> None:
    """Adds `serve` and `load` (`bench` is registered by `dare.bench`)."""
    app.command("serve")(serve)
    app.command("load")(load)


def _set_env(name: str, value: object | None) -> None:
    if value is not None:
        os.environ[f"DARE_{name.upper()}"] = str(value)


def serve(
    models: Annotated[
        Path | None, typer.Option("--models", help="folder of model folders (env DARE_MODELS_DIR, default ./models)")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="bind address (env DARE_HOST, default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option("--port", help="port (env DARE_PORT, default 8000)")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="worker processes (env DARE_WORKERS, default 1)")] = None,
    redis: Annotated[
        str | None, typer.Option("--redis", help="store URL (env DARE_REDIS_URL; unset: an embedded redis-server in the data dir)")
    ] = None,
    default_model: Annotated[str | None, typer.Option("--default-model", help="model for requests naming none (env DARE_DEFAULT_MODEL; default: first by name)")] = None,
) -> None:
    """Serve POST /score (and /events, /models, /metrics, ...) with uvicorn. Every setting is also a DARE_* variable."""
    import uvicorn

    from service.core.config import load_settings
    from service.logs import uvicorn_log_config
    from service.redis_server import RedisServer
    from service.store import check_url
    from service.tracing import check_tracing
    from service.traffic import check_traffic

    for name, value in (("models_dir", models), ("host", host), ("port", port), ("workers", workers),
                        ("redis_url", redis), ("default_model", default_model)):  # fmt: skip
        _set_env(name, value)
    settings = load_settings()  # validates every DARE_* variable now, with a clear message
    if not settings.models_dir.is_dir():
        raise DareError(f"models dir {settings.models_dir} does not exist (pass --models DIR or set DARE_MODELS_DIR)")
    if settings.default_model and not (settings.models_dir / settings.default_model).is_dir():
        raise DareError(f"default model {settings.default_model!r} has no folder in {settings.models_dir}")
    if settings.redis_url is not None:
        check_url(settings.redis_url)
    check_traffic(settings.models_dir, settings.traffic_split, settings.shadow_model)  # a clear error, not a log line
    check_tracing(settings)
    check_port_free(settings.host, settings.port)  # before the embedded Redis starts and the workers load models

    embedded = None
    multiproc_dir = None
    try:
        if settings.redis_url is None:
            # One embedded server for all workers: started here, handed to them as a unix-socket URL, and restarted
            # (same folder and socket: the workers reconnect and find their data) whenever it dies.
            embedded = RedisServer.embedded(settings.data_dir).start().supervise()
            os.environ["DARE_REDIS_URL"] = embedded.url
            typer.echo(f"embedded Redis: {embedded.folder} (socket {embedded.socket_path})")
        if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # prometheus-client multiprocess mode: workers write their values to files that /metrics aggregates.
            multiproc_dir = tempfile.mkdtemp(prefix="dare-prometheus-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
        # uvicorn shuts down gracefully on SIGTERM/SIGINT and then re-raises the signal; with these handlers in place
        # the re-raised signal ends the process through the `finally` below (stopping the embedded Redis) with exit
        # code 0. Without the SIGINT one, asyncio's default Ctrl-C handling cancels the lifespan task mid-shutdown
        # and uvicorn logs a traceback.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        signal.signal(signal.SIGINT, _exit_on_signal)
        uvicorn.run(
            "service.main:create_app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            # uvicorn's httptools protocol behind DARE_MAX_HEADER_BYTES and DARE_CLIENT_TIMEOUT_S (uvicorn has neither).
            http="service.api.client_limits:ClientLimits",
            log_level=settings.log_level,
            # DARE_LOG_FORMAT=json: uvicorn's lines as JSON too, and the service's access lines instead of uvicorn's.
            **({"log_config": uvicorn_log_config("json"), "access_log": False} if settings.log_format == "json" else {}),
            timeout_graceful_shutdown=10,
        )
    finally:
        if embedded is not None:
            embedded.stop()
        if multiproc_dir is not None:
            shutil.rmtree(multiproc_dir, ignore_errors=True)


def check_port_free(host: str, port: int) -> None:
    """A DareError (one line, exit 2) when `host:port` cannot be listened on: in use, not this machine's, or
    privileged. Binds a probe socket as uvicorn binds (SO_REUSEADDR) and closes it at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]  # fmt: skip
    except socket.gaierror as exc:
        raise DareError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DareError(f"port {port} on {host} is already in use (pass --port or set DARE_PORT)") from None
            raise DareError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def load(
    input: Annotated[Path, typer.Option("--input", help="Taobao-format CSV (.csv or .csv.gz), no header")],
    redis: Annotated[
        str | None,
        typer.Option("--redis", envvar="DARE_REDIS_URL", help="store URL; unset: the embedded redis-server in --data-dir"),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", help="users per pipelined round trip")] = 500,
    behaviors: Annotated[str, typer.Option("--behaviors", help="comma-separated behaviour types to keep")] = "pv",
    append: Annotated[bool, typer.Option("--append/--replace", help="append to or replace stored sequences")] = False,
    max_events: Annotated[
        int | None, typer.Option("--max-events", help="lifelong maximum per user (env DARE_LIFELONG_MAX_EVENTS, 100000)")
    ] = None,
    min_timestamp: Annotated[int | None, typer.Option("--min-timestamp", help="drop rows before this (Unix s)")] = None,
    max_timestamp: Annotated[int | None, typer.Option("--max-timestamp", help="drop rows at or after this")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="embedded Redis data (env DARE_DATA_DIR, ./var)")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="also write the counts and rates as JSON here")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Bulk-load users' behaviour sequences from a Taobao-format log into the store (pipelined, with progress)."""
    from rich.console import Console

    from service.core.config import load_settings
    from service.loader import LoadConfig
    from service.loader import load as run_load
    from service.store import SequenceStore

    overrides: dict[str, object] = {"redis_url": redis}
    if max_events is not None:
        overrides["lifelong_max_events"] = max_events
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    settings = load_settings(**overrides)
    cfg = LoadConfig(
        input=input,
        behaviors=tuple(b.strip() for b in behaviors.split(",") if b.strip()),
        batch_users=batch,
        append=append,
        min_timestamp=min_timestamp,
        max_timestamp=max_timestamp,
        progress=progress,
    )
    store = SequenceStore.from_url(
        settings.redis_url,
        data_dir=settings.data_dir,
        key_prefix=settings.key_prefix,
        lifelong_max_events=settings.lifelong_max_events,
        connect_timeout_s=max(settings.redis_connect_timeout_s, 5.0),  # a bulk job may wait longer than a request
        socket_timeout_s=max(settings.redis_socket_timeout_s, 60.0),
    )
    try:
        store.ping()
        result = run_load(cfg, store)
    finally:
        store.close()
    console = Console(stderr=True)
    console.print(
        f"[bold]loaded[/bold] {result.users:,} users, {result.events:,} events into {store.description} "
        f"in {result.total_seconds:.1f} s: [bold]{result.users_per_s:,.0f} users/s, {result.events_per_s:,.0f} "
        f"events/s[/bold] (store writes alone: {result.write_users_per_s:,.0f} users/s, "
        f"{result.write_events_per_s:,.0f} events/s)"
    )
    console.print(
        f"rows read {result.rows_read:,}; truncated last line {result.truncated_last_line}; dropped {result.dropped}; "
        f"trimmed to the lifelong maximum {result.events_trimmed:,}"
    )
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")

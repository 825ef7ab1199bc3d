"""`dare load`: bulk-load a Taobao-format behaviour log into the sequence store, pipelined.

Input: the 5-column UserBehavior CSV (plain or .gz, no header): user_id,item_id,category_id,behavior_type,timestamp,
read by `dare_common.taobao.read_log` under the rules every command shares: blank lines are skipped; a last line cut
mid-row (no newline, not a valid row) is dropped and counted; any other malformed line, a non-integer id or an unknown
behaviour type is a DareError naming the file and the line. Only the behaviour types asked for are kept (default
`pv`). item_id is read as an unsigned 64-bit integer (0..2**64-1; a negative or larger one is a DareError); rows
whose other fields do not fit the stored format (a negative user, category or timestamp, category or timestamp
>= 2**32) are dropped and counted.

Stages, vectorised (no Python loop per row): parse the CSV and keep the wanted rows (polars, streaming) -> one
stable sort by (user, timestamp), skipped when the file already has each user's rows together and in time order ->
per user, one Redis command (SET of the whole encoded sequence, or the atomic append script with `append=True`),
sent in pipelines of `batch_users` users. Each user keeps at most the lifelong maximum of most recent events.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import redis
from redis.cluster import RedisCluster
from tqdm import tqdm

from dare_common import DareError, taobao
from dare_common.taobao import BEHAVIOURS
from service.errors import ServiceError
from service.store import (
    _APPEND_LUA,
    MAX_CATEGORY_ID,
    MAX_TIMESTAMP,
    RECORD_DTYPE,
    SequenceStore,
    append_args,
    encode,
)


@dataclass(frozen=True)
class LoadConfig:
    input: Path
    behaviors: tuple[str, ...] = ("pv",)
    batch_users: int = 500  # users per pipeline round trip
    append: bool = False  # False: each user's sequence is replaced (re-running a load is idempotent)
    min_timestamp: int | None = None  # keep rows with min_timestamp <= timestamp < max_timestamp when set
    max_timestamp: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [b for b in self.behaviors if b not in BEHAVIOURS]
        if unknown or not self.behaviors:
            raise DareError(f"--behaviors must be a non-empty subset of {','.join(BEHAVIOURS)}, got {unknown or '[]'}")
        if self.batch_users < 1:
            raise DareError(f"--batch must be >= 1, got {self.batch_users}")


@dataclass
class LoadReport:
    input: str
    rows_read: int = 0  # complete rows parsed
    truncated_last_line: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    users: int = 0
    events: int = 0  # events written (after the lifelong trim)
    events_trimmed: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    total_seconds: float = 0.0
    users_per_s: float = 0.0  # over the whole command (read + sort + write)
    events_per_s: float = 0.0
    write_users_per_s: float = 0.0  # the store-writing stage alone
    write_events_per_s: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class _Columns:
    user: np.ndarray  # int64 [R]
    item: np.ndarray  # uint64 [R]
    cate: np.ndarray  # int64 [R]
    ts: np.ndarray  # int64 [R]


def read_log(cfg: LoadConfig, report: LoadReport) -> _Columns:
    """The wanted rows that fit the stored format, as typed numpy columns; counts what was dropped into `report`."""

    @contextmanager
    def stage(name: str, total: int | None) -> Iterator[Callable[[int], None]]:
        # Only decompressing has a total (bytes); the parse passes show their time.
        shape = {"unit": "B", "unit_scale": True} if total is not None else {"bar_format": "{desc}: {elapsed}"}
        with tqdm(desc=name, total=total, disable=not cfg.progress, **shape) as bar:
            yield bar.update

    try:
        log = taobao.read_log(cfg.input, cfg.behaviors, cfg.min_timestamp, cfg.max_timestamp, stage)
    except taobao.MalformedLog as exc:
        raise DareError(f"{exc} (not a Taobao-format CSV: {taobao.FORMAT}, no header)") from None
    report.rows_read, report.truncated_last_line = log.rows_read, log.truncated_last_line
    frame = log.frame  # ids narrowed to Int32 where they fit: widened to the stored types here
    cols = _Columns(
        user=frame["user"].to_numpy().astype(np.int64),
        item=frame["item"].to_numpy().astype(np.uint64),
        cate=frame["cate"].to_numpy().astype(np.int64),
        ts=frame["ts"].to_numpy().astype(np.int64),
    )
    fits = (cols.cate >= 0) & (cols.cate <= MAX_CATEGORY_ID) & (cols.user >= 0)
    in_time = (cols.ts >= 0) & (cols.ts <= MAX_TIMESTAMP)
    report.dropped = {
        "behavior_not_kept": log.behavior_not_kept,
        "id_out_of_range": int((~fits).sum()),
        "timestamp_out_of_range": log.timestamp_out_of_range + int((fits & ~in_time).sum()),
    }
    ok = fits & in_time
    return _Columns(cols.user[ok], cols.item[ok], cols.cate[ok], cols.ts[ok])


def group_by_user(cols: _Columns) -> tuple[np.ndarray, np.ndarray]:
    """(user [R], records [R]) with each user's rows contiguous and in time order (stable: equal timestamps keep
    file order, as in `dare prepare`). Logs already laid out that way (the Taobao file, `dare synth`) skip the sort."""
    user, ts = cols.user, cols.ts
    change = user[1:] != user[:-1]
    run_users = user[np.flatnonzero(np.r_[True, change])] if len(user) else user
    contiguous = len(np.unique(run_users)) == len(run_users)  # no user appears in two runs
    in_time = bool(np.all((ts[1:] >= ts[:-1]) | change))
    order = None if contiguous and in_time else np.lexsort((ts, user))  # [R]

    def take(a: np.ndarray) -> np.ndarray:
        return a if order is None else a[order]

    records = np.empty(len(user), dtype=RECORD_DTYPE)  # [R]
    records["item_id"] = take(cols.item)
    records["category_id"] = take(cols.cate)
    records["timestamp"] = take(ts)
    return take(user), records


def load(cfg: LoadConfig, store: SequenceStore) -> LoadReport:
    """Read, group and write every user's sequence; returns the counts and rates."""
    report = LoadReport(input=str(cfg.input))
    started = time.perf_counter()
    cols = read_log(cfg, report)
    users, records = group_by_user(cols)
    del cols
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.empty(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(users)].astype(np.int64)
    user_ids = users[starts].tolist() if len(users) else []
    report.read_seconds = time.perf_counter() - started

    write_started = time.perf_counter()
    cap = store.lifelong_max_events
    # Redis Cluster pipelines refuse EVALSHA, so there an append goes one user at a time through the store's script
    # (each call routed to the user's slot); replacing (SET) pipelines everywhere.
    in_cluster = isinstance(store.client, RedisCluster)
    # Appends go through the store's retry-free writer: a retried pipeline could append a user's events twice.
    client = store.writer if cfg.append else store.client
    append_sha = client.script_load(_APPEND_LUA) if cfg.append and not in_cluster else None
    bar = tqdm(total=len(user_ids), desc="write", unit=" users", unit_scale=True, disable=not cfg.progress)
    try:
        for lo in range(0, len(user_ids), cfg.batch_users):
            hi = min(lo + cfg.batch_users, len(user_ids))
            pipe = client.pipeline(transaction=False)
            for k in range(lo, hi):
                start, end = int(starts[k]), int(ends[k])
                kept_start = max(start, end - cap)
                report.events += end - kept_start
                report.events_trimmed += kept_start - start
                user = str(user_ids[k])
                if not cfg.append:
                    pipe.set(store.key(user), encode(records[kept_start:end]))
                elif append_sha is not None:
                    pipe.evalsha(append_sha, 1, store.key(user), *append_args(records[kept_start:end], cap))
                else:
                    _append_one(store, user, records[kept_start:end])
            if len(pipe):
                _execute(pipe, store)
            bar.update(hi - lo)
    finally:
        bar.close()
    report.users = len(user_ids)
    report.write_seconds = time.perf_counter() - write_started
    report.total_seconds = time.perf_counter() - started
    report.users_per_s = report.users / max(report.total_seconds, 1e-9)
    report.events_per_s = report.events / max(report.total_seconds, 1e-9)
    report.write_users_per_s = report.users / max(report.write_seconds, 1e-9)
    report.write_events_per_s = report.events / max(report.write_seconds, 1e-9)
    return report


def _append_one(store: SequenceStore, user: str, events: np.ndarray) -> None:
    try:
        store.append(user, events)
    except ServiceError as exc:
        raise DareError(f"the store failed during the load ({store.description}): {exc}") from None


def _execute(pipe: redis.client.Pipeline, store: SequenceStore) -> None:
    try:
        results = pipe.execute(raise_on_error=False)
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        raise DareError(f"the store failed during the load ({store.description}): {exc}") from None
    for result in results:
        if isinstance(result, Exception):
            if "DARE_CORRUPT" in str(result):
                raise DareError(f"a stored sequence is corrupt and was left untouched: {result}")
            raise DareError(f"the store refused a write ({store.description}): {result}")

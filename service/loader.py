"""`dare load`: bulk-load a Taobao-format behaviour log into the sequence store, pipelined.

Input: the 5-column UserBehavior CSV (plain or .gz, no header): user_id,item_id,category_id,behavior_type,timestamp.
Quirks handled as `dare prepare` handles them: blank lines are skipped; a last line cut mid-row (no newline, too
few fields) is dropped and counted; any other malformed line, a non-integer id or an unknown behaviour type is a
DareError naming the file and the line. Only the behaviour types asked for are kept (default `pv`). item_id is
read as an unsigned 64-bit integer (0..2**64-1; a negative or larger one is a DareError); rows whose other fields do
not fit the stored format (a negative user, category or timestamp, category or timestamp >= 2**32) are dropped and
counted.

Stages, vectorised (no Python loop per row): stream-parse the CSV with pyarrow in blocks -> keep the wanted rows ->
one stable sort by (user, timestamp), skipped when the file already has each user's rows together and in time
order -> per user, one Redis command (SET of the whole encoded sequence, or the
atomic append script with `append=True`), sent in pipelines of `batch_users` users. Each user keeps at most the
lifelong maximum of most recent events.
"""

from __future__ import annotations

import gzip
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import redis
from redis.cluster import RedisCluster
from tqdm import tqdm

from dare_common import DareError
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

BEHAVIOURS = ("pv", "buy", "cart", "fav")
COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")


@dataclass(frozen=True)
class LoadConfig:
    input: Path
    behaviors: tuple[str, ...] = ("pv",)
    batch_users: int = 500  # users per pipeline round trip
    append: bool = False  # False: each user's sequence is replaced (re-running a load is idempotent)
    min_timestamp: int | None = None  # keep rows with min_timestamp <= timestamp < max_timestamp when set
    max_timestamp: int | None = None
    block_bytes: int = 32 << 20  # CSV parse block size
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


class _TailReader(io.RawIOBase):
    """A readable stream that remembers the last bytes it returned, so the last line can be judged afterwards."""

    TAIL = 4096

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self._raw = raw
        self.tail = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        if n:
            self.tail = (self.tail + data)[-self.TAIL :] if n < self.TAIL else data[-self.TAIL :]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open(path: Path) -> _TailReader:
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    raw = gzip.open(path, "rb") if gzipped else path.open("rb")
    return _TailReader(raw)  # type: ignore[arg-type]


@dataclass
class _Columns:
    user: np.ndarray  # int64 [R]
    item: np.ndarray  # uint64 [R]
    cate: np.ndarray  # int64 [R]
    ts: np.ndarray  # int64 [R]


def read_log(cfg: LoadConfig, report: LoadReport) -> _Columns:
    """Stream-parse the CSV and keep the wanted rows (typed numpy columns)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    path = Path(cfg.input)
    if not path.is_file():
        raise DareError(f"--input {path}: no such file")
    invalid: list[tuple[str, int]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append((row.text, row.actual_columns))
        return "skip"

    convert = pacsv.ConvertOptions(
        column_types={
            "user_id": pa.int64(),
            "item_id": pa.uint64(),
            "category_id": pa.int64(),
            "behavior_type": pa.string(),
            "timestamp": pa.int64(),
        },
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    read_opts = pacsv.ReadOptions(column_names=list(COLUMNS), block_size=cfg.block_bytes, use_threads=True)
    parse = pacsv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=False)
    wanted = pa.array(list(cfg.behaviors))
    known = pa.array(list(BEHAVIOURS))
    parts: list[_Columns] = []
    dropped = {"behavior_not_kept": 0, "id_out_of_range": 0, "timestamp_out_of_range": 0}
    bar = tqdm(desc="read", unit=" rows", unit_scale=True, disable=not cfg.progress)
    source: _TailReader | None = None
    try:
        source = _open(path)
        reader = pacsv.open_csv(
            io.BufferedReader(source, buffer_size=1 << 20), read_options=read_opts, parse_options=parse,
            convert_options=convert,
        )
        for batch in reader:
            report.rows_read += batch.num_rows
            bar.update(batch.num_rows)
            behaviour = batch.column("behavior_type")
            if not pc.all(pc.is_in(behaviour, value_set=known)).as_py():
                bad = pc.filter(behaviour, pc.invert(pc.is_in(behaviour, value_set=known)))[0].as_py()
                raise DareError(f"{path}: unknown behaviour type {bad!r} (expected one of {', '.join(BEHAVIOURS)})")
            keep = pc.is_in(behaviour, value_set=wanted).to_numpy(zero_copy_only=False)
            dropped["behavior_not_kept"] += int((~keep).sum())
            cols = _Columns(*(batch.column(c).to_numpy()[keep] for c in ("user_id", "item_id", "category_id", "timestamp")))
            fits = (cols.cate >= 0) & (cols.cate <= MAX_CATEGORY_ID) & (cols.user >= 0)
            in_time = (cols.ts >= 0) & (cols.ts <= MAX_TIMESTAMP)
            if cfg.min_timestamp is not None:
                in_time &= cols.ts >= cfg.min_timestamp
            if cfg.max_timestamp is not None:
                in_time &= cols.ts < cfg.max_timestamp
            dropped["id_out_of_range"] += int((~fits).sum())
            dropped["timestamp_out_of_range"] += int((fits & ~in_time).sum())
            ok = fits & in_time
            parts.append(_Columns(cols.user[ok], cols.item[ok], cols.cate[ok], cols.ts[ok]))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DareError(f"{path}: not a Taobao-format CSV (user_id,item_id,category_id,behavior_type,timestamp): {exc}") from None
    except (OSError, EOFError) as exc:
        raise DareError(f"{path}: cannot read: {exc}") from None
    finally:
        bar.close()
        if source is not None:
            source.close()
    if invalid:
        # Allowed: exactly one bad row, and it is the file's last line, cut short (no newline, too few fields).
        last_line = source.tail.rsplit(b"\n", 1)[-1].decode("utf-8", errors="replace")
        text, fields = invalid[-1]
        is_cut_tail = len(invalid) == 1 and not source.tail.endswith(b"\n") and text == last_line and fields < 5
        if not is_cut_tail:
            text, fields = next((t, f) for t, f in invalid if not (t == last_line and f < 5))
            raise DareError(
                f"{path}: malformed line {text[:120]!r} ({fields} fields; expected 5: {','.join(COLUMNS)})"
            )
        report.truncated_last_line = 1
    report.dropped = dropped
    if not parts:
        return _Columns(*(np.empty(0, dtype=dtype) for dtype in (np.int64, np.uint64, np.int64, np.int64)))
    return _Columns(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("user", "item", "cate", "ts")))


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

"""The Taobao UserBehavior log and the one set of rules for reading it, shared by `dare prepare`, `dare load`,
`dare demo` and the load test.

Format: CSV, no header, 5 columns `user_id,item_id,category_id,behavior_type,timestamp` (data/taobao-sample/
SOURCE.md), plain or gzip (recognised by its magic bytes, whatever the file's name). item_id is an unsigned 64-bit
integer (hashed ids use the whole range), the other ids and the timestamp signed 64-bit integers, behavior_type one
of `BEHAVIOURS`. Quirks of the real file, handled alike by both readers:

- a last line that does not end in a newline and is not a valid row (the file was cut mid-line) is dropped and
  counted (`truncated_last_line`);
- blank lines are dropped and counted (`blank_lines`);
- any other malformed line (wrong number of fields, an empty field, a non-integer id or timestamp, an unknown
  behaviour type) is a DareError naming the file, the line number and the problem: silently skipping such rows
  would hide a wrong file or a wrong format.

Two readers apply them: `read_log` (polars, columnar and streaming, for whole files: prepare, load, the demo) and
`iter_rows` (the standard library only, one row at a time: the load test, which runs in the Locust image where
there is no polars; docker-compose.yml mounts this folder beside loadtest/).
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from dare_common import DareError

if TYPE_CHECKING:
    import polars as pl

COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
BEHAVIOURS = ("pv", "cart", "fav", "buy")
SAMPLE = Path(__file__).resolve().parent.parent / "data" / "taobao-sample" / "UserBehavior.csv.gz"
FORMAT = ",".join(COLUMNS)
TAIL_BYTES = 4096  # longer than any valid row: where the last line is looked for
UINT32_END = 1 << 32


class MalformedLog(DareError):
    """The file's text is not this format; the message names the file and, where there is one, the line."""


# A stage of a long read: name, total units or None -> a context yielding `advance(units)`; `training.stages`'s
# StageProgress.stage is one. Default: no progress.
Stage = Callable[[str, "int | None"], AbstractContextManager[Callable[[int], None]]]


def _no_progress(_name: str, _total: int | None = None) -> AbstractContextManager[Callable[[int], None]]:
    return nullcontext(lambda _n: None)


def is_gzip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def parse_row(line: bytes | str) -> tuple[int, int, int, str, int] | None:
    """One line as (user, item, category, behaviour, timestamp), or None when it is not a valid row."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    fields = text.strip().split(",")
    if len(fields) != len(COLUMNS) or fields[3] not in BEHAVIOURS:
        return None
    try:
        user, item, cate, ts = (int(f) for f in (fields[0], fields[1], fields[2], fields[4]))
    except ValueError:
        return None
    return user, item, cate, fields[3], ts


def iter_rows(path: Path) -> Iterator[tuple[int, int, int, str, int]]:
    """The log's rows one at a time, by the module's rules, with the standard library only."""
    path = Path(path)
    if not path.is_file():
        raise DareError(f"{path}: no such file")
    raw: IO[bytes] = gzip.open(path, "rb") if is_gzip(path) else path.open("rb")
    try:
        with io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                row = parse_row(line)
                if row is not None:
                    yield row
                elif line.endswith("\n"):
                    raise MalformedLog(f"{path}:{lineno}: not a row of {FORMAT}: {line[:120]!r}")
                # else: the last line, cut mid-row: dropped
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DareError(f"{path}: cannot read: {exc}") from None


@dataclass
class Log:
    """The rows of a log that pass the row filters (complete, timestamp in range, behaviour kept), with counts."""

    frame: pl.DataFrame  # user, item, cate: Int32 when every id fits, else Int64 (UInt64 items); ts: Int64 or UInt32
    rows_read: int  # complete rows parsed (blank lines and the truncated last line not included)
    truncated_last_line: int
    blank_lines: int
    timestamp_out_of_range: int
    behavior_not_kept: int


def _decompress(path: Path, advance: Callable[[int], None]) -> io.BytesIO:
    buf = io.BytesIO()
    try:
        with path.open("rb") as raw, gzip.GzipFile(fileobj=raw) as gz:
            last = 0
            for block in iter(lambda: gz.read(1 << 24), b""):
                buf.write(block)
                pos = raw.tell()
                advance(pos - last)
                last = pos
    except (OSError, EOFError) as exc:  # BadGzipFile is an OSError; a cut gzip stream raises EOFError
        raise DareError(f"{path}: not a readable gzip file ({exc})") from None
    return buf


def _cut_line_start(tail: bytes, tail_offset: int) -> int | None:
    """Where the last line starts when it is cut mid-row (no newline after it, not a valid row), else None."""
    if not tail or tail.endswith(b"\n"):
        return None
    start = tail.rfind(b"\n") + 1
    return None if parse_row(tail[start:]) is not None else tail_offset + start


def _source(path: Path, stage: Stage) -> tuple[Path | io.BytesIO, int]:
    """What polars parses (the file itself, or its text in memory) and whether a cut last line was left out."""
    size = path.stat().st_size
    if is_gzip(path):
        with stage("decompress", size) as advance:
            buf = _decompress(path, advance)
        view = buf.getbuffer()
        offset = max(0, len(view) - TAIL_BYTES)
        cut = _cut_line_start(bytes(view[offset:]), offset)
        view.release()
        if cut is not None:
            buf.truncate(cut)
        if buf.getbuffer().nbytes == 0 and cut is None:
            raise DareError(f"{path}: the file is empty (after decompression)")
        buf.seek(0)
        return buf, int(cut is not None)
    with path.open("rb") as fh:
        fh.seek(max(0, size - TAIL_BYTES))
        cut = _cut_line_start(fh.read(), max(0, size - TAIL_BYTES))
        if cut is None:
            return path, 0  # the common case: polars memory-maps the file itself
        fh.seek(0)
        return io.BytesIO(fh.read(cut)), 1


def _schema() -> dict[str, pl.DataType]:
    import polars as pl

    # item: 64-bit hashed item ids use the whole unsigned range (never read through int64 or a float)
    return {"user": pl.Int64, "item": pl.UInt64, "cate": pl.Int64, "behavior": pl.Enum(BEHAVIOURS), "ts": pl.Int64}


def _malformed(path: Path, lineno: int, text: str, problem: str) -> MalformedLog:
    return MalformedLog(f"{path}:{lineno}: {problem} in malformed line {text[:120]!r} ({text.count(',') + 1} fields; "
                     f"expected {len(COLUMNS)}: {FORMAT})")  # fmt: skip


def _diagnose(source: Path | io.BytesIO, path: Path) -> None:
    """Find the first malformed line (slow path, run only after the typed parse failed) and raise naming it."""
    import polars as pl

    if isinstance(source, io.BytesIO):
        source.seek(0)
    # One string per line (0x1f never occurs in this format), so line numbers are row indices + 1.
    try:
        lines = pl.read_csv(
            source, has_header=False, separator="\x1f", quote_char=None, schema={"line": pl.String}
        ).with_row_index("lineno", offset=1)
    except pl.exceptions.PolarsError:
        return  # not even readable as text lines (binary, invalid UTF-8): the caller reports the parser's message
    lines = lines.filter(pl.col("line").str.strip_chars().str.len_bytes() > 0)
    nfields = lines.select(pl.col("line").str.count_matches(",", literal=True) + 1).to_series()
    bad = lines.filter(nfields != len(COLUMNS)).head(1)
    if bad.height:
        lineno, text = bad.row(0)
        found = f"expected {len(COLUMNS)} comma-separated fields ({FORMAT}), found {text.count(',') + 1}"
        raise MalformedLog(f"{path}:{lineno}: {found} in malformed line {text[:120]!r}")
    names = [f"field_{i}" for i in range(len(COLUMNS))]
    fields = lines.with_columns(pl.col("line").str.split_exact(",", len(COLUMNS) - 1).alias("f")).unnest("f")
    for name, column, dtype in zip(names, COLUMNS, _schema().values(), strict=True):
        value = pl.col(name).str.strip_chars()
        if column == "behavior_type":
            invalid = ~value.is_in(BEHAVIOURS)
        else:
            invalid = value.cast(dtype, strict=False).is_null()
        bad = fields.filter(invalid).head(1)
        if not bad.height:
            continue
        lineno, text = bad["lineno"][0], bad[name][0]
        if column == "behavior_type":
            raise MalformedLog(f"{path}:{lineno}: behavior_type {text!r} is not one of {', '.join(BEHAVIOURS)} "
                            f"(unknown behaviour type {text!r})")  # fmt: skip
        expected = "an integer from 0 to 2**64-1" if column == "item_id" else "an integer"
        hint = " (the file must have no header line)" if lineno == 1 else ""
        raise MalformedLog(f"{path}:{lineno}: {column} {text!r} is not {expected}{hint}")


def read_log(
    path: Path,
    behaviors: tuple[str, ...] = BEHAVIOURS,
    min_timestamp: int | None = None,
    max_timestamp: int | None = None,
    stage: Stage = _no_progress,
) -> Log:
    """Parse a log into typed columns by the module's rules, keeping the rows whose behaviour is in `behaviors` and
    whose timestamp lies in [min_timestamp, max_timestamp) (either bound None: open).

    Two streaming passes over the text (polars' streaming engine), so the unfiltered rows never sit in memory: the
    first counts rows, blank and partial lines and what the filters drop, and finds the id ranges; the second keeps
    the rows that pass, with ids as Int32 when every id fits, and timestamps as UInt32 when the range given fits."""
    import polars as pl

    path = Path(path)
    if not path.exists():
        raise DareError(f"{path}: no such file")
    if not path.is_file():
        raise DareError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DareError(f"{path}: the file is empty")
    source, truncated = _source(path, stage)
    schema = _schema()
    scan = pl.scan_csv(source, has_header=False, schema=schema, quote_char=None)
    nulls = pl.sum_horizontal(pl.all().is_null())
    complete, partial = nulls == 0, (nulls > 0) & (nulls < len(schema))  # a blank line is all nulls
    in_range = pl.lit(True)
    if min_timestamp is not None:
        in_range &= pl.col("ts") >= min_timestamp
    if max_timestamp is not None:
        in_range &= pl.col("ts") < max_timestamp
    wanted = pl.col("behavior").is_in(list(behaviors))
    ids = ("user", "item", "cate")
    with stage("parse csv: count rows", None):
        try:
            stats = scan.select(
                pl.len().alias("rows"),
                (nulls == len(schema)).sum().alias("blank"),
                partial.sum().alias("partial"),
                (complete & ~in_range).sum().alias("ts_out"),
                (complete & in_range & ~wanted).sum().alias("behavior_out"),
                *(pl.col(c).min().alias(f"{c}_min") for c in ids),
                *(pl.col(c).max().alias(f"{c}_max") for c in ids),
            ).collect(engine="streaming").row(0, named=True)
        except pl.exceptions.PolarsError as exc:
            _diagnose(source, path)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MalformedLog(f"{path}: cannot parse as {FORMAT}: {first}") from None
        if stats["partial"]:
            # A line with fewer than 5 fields or an empty field parses with nulls.
            index = int(scan.with_row_index("i").filter(partial).select("i").head(1).collect().item())
            raise _malformed(path, index + 1, _line(source, index), f"fewer than {len(COLUMNS)} fields or an empty field")
    rows_read = stats["rows"] - stats["blank"]
    if rows_read == 0:
        raise MalformedLog(f"{path}: no complete rows (expected {FORMAT} per line, no header)")
    int32 = (-(1 << 31), (1 << 31) - 1)
    # Int32 when every id fits, else each column's own type (Int64; UInt64 for items).
    narrow = all(stats[f"{c}_min"] >= int32[0] and stats[f"{c}_max"] <= int32[1] for c in ids)
    ts_fits = min_timestamp is not None and max_timestamp is not None and 0 <= min_timestamp and max_timestamp <= UINT32_END
    with stage("parse csv: keep rows", None):
        frame = (
            scan.filter(complete & in_range & wanted)
            .select(
                *(pl.col(c).cast(pl.Int32 if narrow else schema[c]) for c in ids),
                pl.col("ts").cast(pl.UInt32 if ts_fits else pl.Int64),
            )
            .collect(engine="streaming")
        )
    return Log(frame, rows_read, truncated, stats["blank"], stats["ts_out"], stats["behavior_out"])


def _line(source: Path | io.BytesIO, index: int) -> str:
    """The text of row `index` (0-based, blank lines counted), for an error message."""
    import polars as pl

    if isinstance(source, io.BytesIO):
        source.seek(0)
    lines = pl.scan_csv(source, has_header=False, separator="\x1f", quote_char=None, schema={"line": pl.String})
    text = lines.slice(index, 1).collect()["line"]
    return text[0] if len(text) else ""

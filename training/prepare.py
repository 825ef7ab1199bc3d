"""`dare prepare`: a Taobao-format behaviour log -> the prepared-data folder described in `training.config`.

Stages (each vectorised over all rows; there is no Python loop per row or per user):

1. read     the 5-column CSV (plain or gzip) into typed columns with `dare_common.taobao.read_log`, whose rules
            every command shares: a last line cut mid-row is dropped and counted as `truncated_last_line`, blank
            lines as `blank_line`; any other malformed line is a `DareError` naming the file, the line number
            and the problem.
2. filter   rows whose timestamp lies outside [min_timestamp, max_timestamp) (`timestamp_out_of_range`), rows
            whose behaviour type was not asked for (`behavior_not_kept`), then users with fewer than
            `min_events` kept events (`user_below_min_events`).
3. vocab    an item seen with several categories keeps the category it has most often among the kept rows
            (ties: the one seen first in the file); every row of that item is rewritten to it, so histories,
            targets and item_cate.npy agree. Users, items and categories then get rows in order of first
            appearance in the file: users 0..U-1, items and categories from 2 (0 = padding, 1 = out of vocabulary).
4. sort     each user's events by timestamp, stable (equal timestamps keep file order).
5. samples  per user with n events (index 0 = oldest): test target n-1, validation target n-2, training targets
            n-3, n-3-stride, ... (`positives_per_user` of them, as long as the target has at least one earlier
            event). A sample's history is the last `history_len` events strictly before its target, left-padded
            with 0, so no target can appear in its own history. Each positive gets `negatives_per_positive`
            negatives drawn in proportion to item frequency (over all kept rows) and redrawn while the item occurs
            anywhere in that user's kept sequence (past or future), which also keeps them distinct from the target;
            the two negatives of one positive may coincide (rare, as in the reference code).
6. write    sequences/ (every user's events once: flat item/category/time arrays and per-user offsets),
            train/, val/, test/ (per sample: user, target position, candidates, labels; no history copies),
            vocab.npz, item_cate.npy, truth.npz (synthetic input only) and finally meta.json, whose presence marks
            a complete folder. The layout is described in training/layout.py.

A synthetic log written by `dare synth` has its ground truth beside it (`X.truth.npz` for `X.csv[.gz]`); prepare
remaps it to category rows into `truth.npz` and marks meta.json `synthetic: true`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
import zipfile

import numpy as np
import orjson
import polars as pl

from dare_common import DareError, taobao
from dare_common.taobao import BEHAVIOURS
from service.contract import OOV_INDEX, PAD_INDEX, VOCAB_ARRAYS, VOCAB_FILE
from training.config import PrepareConfig
from training.layout import INDEX_DTYPE, SEQUENCES_DIR, time_dtype, write_array
from training.stages import StageProgress
from training.synth import truth_path_for

SPLITS = ("train", "val", "test")
META_FILE = "meta.json"
TRUTH_FILE = "truth.npz"
ITEM_CATE_FILE = "item_cate.npy"
FORMAT_VERSION = 2  # 2: sequences stored once, samples point into them (training.layout); 1: [S, L] histories
FIRST_ID_ROW = 2  # rows 0 and 1 are padding and out-of-vocabulary
# Cap on rejection-sampling rounds for negatives; each round redraws only the rejected ones, so on real data a
# handful of rounds suffice. Hitting the cap means some user has seen nearly every popular item.
MAX_NEGATIVE_ROUNDS = 200


class PrepareError(DareError):
    """The prepare options, the output folder, the truth file or what is left after filtering are unusable; the
    message names the option or the file. (A malformed log is a `dare_common.taobao.MalformedLog`.)"""


def default_sample_path() -> Path:
    """The bundled real Taobao sample, found relative to the code so `dare prepare` works from any cwd."""
    return taobao.SAMPLE


def check_config(cfg: PrepareConfig) -> None:
    """Reject option values that cannot produce a usable data set, naming the option."""
    if not cfg.behaviors:
        raise PrepareError("--behaviors: give at least one of " + ", ".join(BEHAVIOURS))
    unknown = [b for b in cfg.behaviors if b not in BEHAVIOURS]
    if unknown:
        raise PrepareError(f"--behaviors: unknown behaviour type(s) {unknown}; known: {', '.join(BEHAVIOURS)}")
    # n >= 4 events leave a test, a validation and at least one training target that has a history.
    if cfg.min_events < 4:
        raise PrepareError(f"--min-events must be >= 4 (test, validation and one training target), got {cfg.min_events}")
    options = {"history_len": "--history-len", "positives_per_user": "--positives-per-user",
               "positive_stride": "--positive-stride", "negatives_per_positive": "--negatives"}  # fmt: skip
    for name, option in options.items():
        if getattr(cfg, name) < 1:
            raise PrepareError(f"{option} must be >= 1, got {getattr(cfg, name)}")
    if cfg.min_timestamp >= cfg.max_timestamp:
        raise PrepareError(f"--min-timestamp ({cfg.min_timestamp}) must be < --max-timestamp ({cfg.max_timestamp})")


# --------------------------------------------------------------------------------------------------------------- read


@dataclass
class RawLog(taobao.Log):
    """The rows of the log that pass the row filters (complete, timestamp in range, behaviour kept), narrowed, and
    the input file's sha256 and size."""

    input_sha256: str
    input_bytes: int


def _sha256_and_size(path: Path, advance: Callable[[int], None]) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
            size += len(block)
            advance(len(block))
    return digest.hexdigest(), size


def read_log(path: Path, cfg: PrepareConfig, stages: StageProgress) -> RawLog:
    """Parse a Taobao-format log into typed columns by dare_common.taobao's rules (the quirks in the module
    docstring), applying the row filters of `cfg` (timestamp range, behaviour types)."""
    path = Path(path)
    sha, size = "", 0
    if path.is_file():  # else the reader names what is wrong
        with stages.stage("hash input (sha256)", total=path.stat().st_size) as advance:
            sha, size = _sha256_and_size(path, advance)
    log = taobao.read_log(path, cfg.behaviors, cfg.min_timestamp, cfg.max_timestamp, stages.stage)
    return RawLog(**vars(log), input_sha256=sha, input_bytes=size)


# --------------------------------------------------------------------------------------------------- build the data


@dataclass
class Events:
    """Kept events sorted by (user row, timestamp); the per-user sequences are contiguous slices."""

    user: np.ndarray  # int64 [E] user row 0..U-1
    item: np.ndarray  # int64 [E] item row >= 2
    cate: np.ndarray  # int64 [E] category row >= 2
    time: np.ndarray  # int64 [E] Unix timestamp
    start: np.ndarray  # int64 [U] index of each user's first event
    length: np.ndarray  # int64 [U] events per user
    item_raw: np.ndarray  # uint64 [I] sorted raw item ids ...
    item_index: np.ndarray  # int64 [I] ... and their rows
    cate_raw: np.ndarray
    cate_index: np.ndarray
    item_cate: np.ndarray  # int64 [item_rows] category row of each item row
    counts: dict[str, object] = field(default_factory=dict)


# A raw id -> row lookup is a dense table indexed by the raw id when the ids are non-negative and below this bound
# (times 4 bytes); otherwise a binary search over the sorted distinct ids.
DENSE_LOOKUP_MAX_ID = 1 << 28


def _first_appearance_rows(values: np.ndarray, first_row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows in order of first appearance: (row per element, sorted raw ids (the values' dtype: int64, or uint64 for
    items), their rows). Rows are int32 when they fit (half the memory of int64 at 100M events)."""
    uniques = pl.Series(values).unique(maintain_order=True).to_numpy()  # order of first appearance
    rows = np.arange(first_row, first_row + len(uniques), dtype=np.int64)
    order = np.argsort(uniques, kind="stable")
    raw, index = uniques[order], rows[order]
    dtype = np.int32 if first_row + len(uniques) <= np.iinfo(np.int32).max else np.int64
    if len(raw) and raw[0] >= 0 and raw[-1] < DENSE_LOOKUP_MAX_ID:
        table = np.zeros(int(raw[-1]) + 1, dtype=dtype)
        table[raw] = index
        mapped = table[values]
    else:
        mapped = index.astype(dtype)[np.searchsorted(raw, values)]
    return mapped, raw, index


def build_events(raw: RawLog, cfg: PrepareConfig, stages: StageProgress) -> Events:
    """Filter, resolve item categories, assign vocabulary rows and sort; every step vectorised."""
    counts: dict[str, object] = {"rows_read": raw.rows_read}
    dropped: dict[str, int] = {"truncated_last_line": raw.truncated_last_line, "blank_line": raw.blank_lines}
    with stages.stage("filter users"):
        # numpy views of the frame's columns; the frame itself is dropped so each column is freed once replaced.
        user_raw, item_raw_rows, cate_raw_rows, ts = (raw.frame[c].to_numpy() for c in ("user", "item", "cate", "ts"))
        raw.frame = pl.DataFrame()
        dropped["timestamp_out_of_range"] = raw.timestamp_out_of_range
        dropped["behavior_not_kept"] = raw.behavior_not_kept
        n = len(user_raw)
        user, _, _ = _first_appearance_rows(user_raw, 0)
        del user_raw
        keep_user = np.bincount(user) >= cfg.min_events  # (users before the filter,)
        if not keep_user.all():
            keep = keep_user[user]  # (n,) rows of users with enough events
            # Kept users keep their relative order of first appearance: renumber them 0..U-1.
            new_row = (np.cumsum(keep_user) - 1).astype(user.dtype)
            user = new_row[user[keep]]
            item_raw_rows, cate_raw_rows, ts = item_raw_rows[keep], cate_raw_rows[keep], ts[keep]
            del keep
        dropped["user_below_min_events"] = n - len(user)
        counts["dropped"] = dropped
        counts["rows_kept"] = len(user)
        if len(user) == 0:
            raise PrepareError(
                f"no rows left after filtering ({dropped}); check --behaviors, the timestamp range "
                f"[{cfg.min_timestamp}, {cfg.max_timestamp}) and --min-events {cfg.min_events}"
            )

    with stages.stage("vocabularies, item categories"):
        item, item_raw, item_index = _first_appearance_rows(item_raw_rows, FIRST_ID_ROW)
        # An item with several categories shows up as a row whose category differs from the item's last-written one.
        last_cate = np.zeros(FIRST_ID_ROW + len(item_raw), dtype=cate_raw_rows.dtype)
        last_cate[item] = cate_raw_rows
        multi_rows = np.flatnonzero(last_cate[item] != cate_raw_rows)
        del last_cate
        examples: list[dict[str, object]] = []
        rewritten = 0
        n_multi = 0
        if len(multi_rows):
            multi_items = np.unique(item[multi_rows])
            sel = np.flatnonzero(np.isin(item, multi_items))  # every row of those items
            pairs = (
                pl.DataFrame({"row": sel, "item": item_raw_rows[sel], "cate": cate_raw_rows[sel]})
                .group_by("item", "cate")
                .agg(n=pl.len(), first=pl.col("row").min())
                .sort(["item", "n", "first"], descending=[False, True, False])
            )
            chosen = pairs.group_by("item", maintain_order=True).first()  # sorted by item
            n_multi = chosen.height
            rewritten = int(pairs["n"].sum() - chosen["n"].sum())
            chosen_item, chosen_cate = chosen["item"].to_numpy(), chosen["cate"].to_numpy()
            cate_raw_rows = cate_raw_rows.copy()  # writable (a view of the frame's memory is read-only)
            cate_raw_rows[sel] = chosen_cate[np.searchsorted(chosen_item, item_raw_rows[sel])]
            for item_id, cats, ns, pick in (
                pairs.group_by("item", maintain_order=True)
                .agg(pl.col("cate"), pl.col("n"), pl.col("cate").first().alias("chosen"))
                .head(20)
                .iter_rows()
            ):
                examples.append({"item": item_id, "categories": cats, "rows": ns, "chosen": pick})
        counts["items_with_multiple_categories"] = n_multi
        counts["rows_category_rewritten"] = rewritten
        counts["multiple_category_examples"] = examples
        del item_raw_rows

        cate, cate_raw, cate_index = _first_appearance_rows(cate_raw_rows, FIRST_ID_ROW)
        del cate_raw_rows
        item_rows = FIRST_ID_ROW + len(item_raw)
        item_cate = np.empty(item_rows, dtype=np.int64)  # (item_rows,)
        item_cate[PAD_INDEX], item_cate[OOV_INDEX] = PAD_INDEX, OOV_INDEX
        item_cate[item] = cate  # each item now has exactly one category, so the scatter is unambiguous

    with stages.stage("sort by user, time"):
        # One stable int64 key when it fits (timsort is near-linear on the already-ordered real file).
        span = cfg.max_timestamp - cfg.min_timestamp
        if span < (1 << 32) and int(user.max()) < (1 << 30):
            key = user.astype(np.int64)  # (user << 32) | (ts - min_timestamp), built in place
            key <<= 32
            key += ts
            key -= cfg.min_timestamp
            order = None if bool(np.all(key[1:] >= key[:-1])) else np.argsort(key, kind="stable")
            del key
        else:
            order = np.lexsort((ts, user))  # lexsort is stable
        if order is not None:  # one array at a time, so at most one extra copy is alive
            user = user[order]
            item = item[order]
            cate = cate[order]
            ts = ts[order]
            del order
        length = np.bincount(user).astype(np.int64)  # (U,)
        start = np.cumsum(length) - length  # (U,)

    counts["users"] = int(len(length))
    counts["items"] = int(len(item_raw))
    counts["categories"] = int(len(cate_raw))
    counts["events_per_user"] = {
        "min": int(length.min()),
        "median": float(np.median(length)),
        "mean": round(float(length.mean()), 2),
        "max": int(length.max()),
    }
    # vocab.npz's raw ids: uint64 items, int64 categories, whatever width the rows were read in.
    item_raw, cate_raw = item_raw.astype(np.uint64), cate_raw.astype(np.int64)
    return Events(user, item, cate, ts, start, length, item_raw, item_index, cate_raw, cate_index, item_cate, counts)


def split_targets(ev: Events, cfg: PrepareConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(user row [S], global event index of the target [S]) for one split, user-major, chronological."""
    users = np.arange(len(ev.length), dtype=np.int64)
    if split == "test":
        return users, ev.start + ev.length - 1
    if split == "val":
        return users, ev.start + ev.length - 2
    # Training targets n-3, n-3-stride, ...; kept while the target has at least one earlier event.
    steps = np.arange(cfg.positives_per_user - 1, -1, -1, dtype=np.int64) * cfg.positive_stride  # (P,) oldest first
    local = ev.length[:, None] - 3 - steps[None, :]  # (U, P) index within the user's sequence
    valid = local >= 1
    rows = np.broadcast_to(users[:, None], local.shape)[valid]  # row-major: user-major, chronological
    return rows, (ev.start[:, None] + local)[valid]


class NegativeSampler:
    """Items drawn by frequency, redrawn while they occur anywhere in that user's kept sequence."""

    def __init__(self, ev: Events, seed: int) -> None:
        self.item_rows = len(ev.item_cate)
        freq = np.bincount(ev.item, minlength=self.item_rows)  # (item_rows,) rows 0, 1 never drawn
        self.cdf = np.cumsum(freq)
        seen = ev.user.astype(np.int64)  # sorted (user, item) keys user * item_rows + item, built in place
        seen *= self.item_rows
        seen += ev.item
        seen.sort()  # repeats harmless
        self.seen = seen
        self.rng = np.random.default_rng(seed)

    def _draw(self, n: int) -> np.ndarray:
        return np.searchsorted(self.cdf, self.rng.integers(0, self.cdf[-1], n), side="right")

    def sample(self, users: np.ndarray, m: int) -> np.ndarray:
        """int64 [S, m] negative item rows for the users of S samples."""
        owner = np.repeat(users, m)  # (S*m,)
        neg = self._draw(len(owner))
        pending = np.arange(len(owner))
        for _ in range(MAX_NEGATIVE_ROUNDS):
            keys = owner[pending] * self.item_rows + neg[pending]
            pos = np.minimum(np.searchsorted(self.seen, keys), len(self.seen) - 1)
            pending = pending[self.seen[pos] == keys]
            if len(pending) == 0:
                return neg.reshape(len(users), m)
            neg[pending] = self._draw(len(pending))
        raise PrepareError(
            f"could not draw negatives for {len(np.unique(owner[pending]))} user(s) in {MAX_NEGATIVE_ROUNDS} rounds: "
            "they have seen nearly every frequent item (too few distinct items in the log?)"
        )


def write_sequences(out: Path, ev: Events, cfg: PrepareConfig) -> None:
    """Every user's events once: flat item/category/time arrays and per-user offsets (training.layout)."""
    base = out / SEQUENCES_DIR
    write_array(base / "item.npy", ev.item, INDEX_DTYPE)
    write_array(base / "cate.npy", ev.cate, INDEX_DTYPE)
    write_array(base / "time.npy", ev.time, time_dtype(cfg.max_timestamp, cfg.min_timestamp))
    write_array(base / "offsets.npy", np.concatenate([ev.start, [len(ev.item)]]), np.int64)


def write_split(
    out: Path, split: str, ev: Events, cfg: PrepareConfig, sampler: NegativeSampler, stages: StageProgress
) -> int:
    """<split>/user, position, cand_item, cand_cate, label (training.layout): the samples point into the sequences."""
    users, target = split_targets(ev, cfg, split)
    m = cfg.negatives_per_positive
    with stages.stage(f"{split}: negatives"):
        neg = sampler.sample(users, m)  # (S, M)
    with stages.stage(f"{split}: write {split}/"):
        cand_item = np.empty((len(target), 1 + m), dtype=INDEX_DTYPE)  # (S, 1+M) column 0 the positive
        cand_item[:, 0] = ev.item[target]
        cand_item[:, 1:] = neg
        del neg
        # a negative's category is its item's category
        cand_cate = np.take(ev.item_cate.astype(INDEX_DTYPE), cand_item)  # (S, 1+M)
        label = np.zeros(cand_item.shape, dtype=np.uint8)  # (S, 1+M)
        label[:, 0] = 1
        folder = out / split
        write_array(folder / "user.npy", users, INDEX_DTYPE)
        write_array(folder / "position.npy", target - ev.start[users], INDEX_DTYPE)
        write_array(folder / "cand_item.npy", cand_item, INDEX_DTYPE)
        write_array(folder / "cand_cate.npy", cand_cate, INDEX_DTYPE)
        write_array(folder / "label.npy", label, np.uint8)
    return len(target)


def remap_truth(truth_file: Path, ev: Events) -> dict[str, np.ndarray]:
    """The synthetic truth with relation indices turned into category rows (rows 0/1 and unseen categories: 0)."""
    try:
        with np.load(truth_file, allow_pickle=False) as z:
            truth = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise PrepareError(f"{truth_file}: not a readable truth file ({exc})") from None
    missing = [k for k in ("cate_raw", "relation", "decay") if k not in truth]
    if missing:
        raise PrepareError(f"{truth_file}: missing arrays {missing} (was it written by `dare synth`?)")
    cate_raw, relation = truth["cate_raw"].astype(np.int64), truth["relation"]
    if relation.shape != (len(cate_raw), len(cate_raw)):
        raise PrepareError(f"{truth_file}: relation has shape {relation.shape}, expected {(len(cate_raw),) * 2}")
    pos = np.minimum(np.searchsorted(ev.cate_raw, cate_raw), len(ev.cate_raw) - 1)
    present = ev.cate_raw[pos] == cate_raw  # (C,) truth categories that made it into the vocabulary
    if present.sum() != len(ev.cate_raw):
        raise PrepareError(
            f"{truth_file}: names {present.sum()} of the log's {len(ev.cate_raw)} categories; "
            "it belongs to another log (remove it, or regenerate both with `dare synth`)"
        )
    rows = ev.cate_index[pos[present]]  # (C',) their category rows
    cate_rows = FIRST_ID_ROW + len(ev.cate_raw)
    remapped = np.zeros((cate_rows, cate_rows), dtype=np.float64)  # [target cate row, history cate row]
    remapped[np.ix_(rows, rows)] = relation[np.ix_(present, present)]
    return {
        "synthetic": np.array("SYNTHETIC ground truth from `dare synth`, remapped to category rows by `dare prepare`"),
        "relation": remapped,
        "decay": truth["decay"].astype(np.float64),
    }


# ------------------------------------------------------------------------------------------------------------ driver


@dataclass
class PrepareResult:
    out: Path
    meta: dict[str, object]

    @property
    def synthetic(self) -> bool:
        return bool(self.meta["synthetic"])


def _fingerprint(input_sha256: str, cfg: PrepareConfig) -> str:
    payload = orjson.dumps({"input_sha256": input_sha256, "config": cfg.to_dict()}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(payload).hexdigest()


def prepare(cfg: PrepareConfig, input_path: Path | None, out: Path, *, progress: bool = True) -> PrepareResult:
    """Run every stage and write the prepared-data folder `out`; returns its meta.json content."""
    check_config(cfg)
    if input_path is None:
        input_path = default_sample_path()
        if not input_path.is_file():
            raise PrepareError(f"{input_path}: the bundled sample is missing from this install; pass --input FILE")
    input_path = Path(input_path)
    truth_file = truth_path_for(input_path)
    synthetic = truth_file.is_file()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # meta.json last: its presence marks a complete folder
    for split in SPLITS:  # the previous layout's files, so a re-prepared folder holds one layout only
        (out / f"{split}.npz").unlink(missing_ok=True)

    started = time.perf_counter()
    with StageProgress(progress) as stages:
        raw = read_log(input_path, cfg, stages)
        ev = build_events(raw, cfg, stages)
        input_sha256, input_bytes = raw.input_sha256, raw.input_bytes
        del raw  # the parsed frame is no longer needed; free it before the sample arrays
        with stages.stage("vocab.npz, item_cate.npy"):
            np.savez(
                out / VOCAB_FILE,
                **dict(zip(VOCAB_ARRAYS, (ev.item_raw, ev.item_index, ev.cate_raw, ev.cate_index), strict=True)),
            )
            np.save(out / ITEM_CATE_FILE, ev.item_cate)
        with stages.stage("sequences/"):
            write_sequences(out, ev, cfg)
        with stages.stage("index (user, item) pairs"):
            sampler = NegativeSampler(ev, cfg.seed)
        # The samples need only the item rows and the offsets from here on; free the rest.
        ev.user = ev.cate = ev.time = np.zeros(0, dtype=np.int64)
        samples = {split: write_split(out, split, ev, cfg, sampler, stages) for split in SPLITS}
        if synthetic:
            with stages.stage("truth.npz"):
                np.savez(out / TRUTH_FILE, **remap_truth(truth_file, ev))
        else:
            (out / TRUTH_FILE).unlink(missing_ok=True)
    seconds = time.perf_counter() - started

    counts = dict(ev.counts)
    counts["samples"] = samples
    meta: dict[str, object] = {
        "format_version": FORMAT_VERSION,
        "synthetic": synthetic,
        "note": (
            "SYNTHETIC data written by `dare synth`: planted structure, not real user behaviour"
            if synthetic
            else "real behaviour log"
        ),
        "input": {"path": str(input_path.resolve()), "bytes": input_bytes, "sha256": input_sha256},
        "data_fingerprint": _fingerprint(input_sha256, cfg),
        "config": cfg.to_dict(),
        "item_rows": FIRST_ID_ROW + len(ev.item_raw),
        "cate_rows": FIRST_ID_ROW + len(ev.cate_raw),
        "users": len(ev.length),
        "history_len": cfg.history_len,
        "counts": counts,
        "multi_category_rule": "an item seen with several categories keeps its most frequent one (ties: first seen)",
        "truth": TRUTH_FILE if synthetic else None,
        "seconds": {**{k: round(v, 3) for k, v in stages.seconds.items()}, "total": round(seconds, 3)},
        "rows_per_second": round(counts["rows_read"] / seconds, 1) if seconds > 0 else None,  # type: ignore[operator]
    }
    (out / META_FILE).write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    return PrepareResult(out, meta)


# --------------------------------------------------------------------------------------------------------- benchmark


def benchmark(
    rows: int, events_per_user: int, out: Path, *, work_dir: Path | None = None, progress: bool = True
) -> dict[str, object]:
    """Time `prepare` on a generated SYNTHETIC log of `rows` rows; write the figures to `out` (JSON) and a PNG."""
    import os
    import platform
    import shutil
    import tempfile

    from training.synth import SynthConfig, write_log

    if rows < 1000 or events_per_user < 10:
        raise PrepareError(f"--rows must be >= 1000 and --events-per-user >= 10, got {rows} and {events_per_user}")
    users = max(1, rows // events_per_user)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    own_dir = work_dir is None
    base = Path(tempfile.mkdtemp(prefix="dare-bench-prepare-")) if own_dir else Path(work_dir)  # type: ignore[arg-type]
    base.mkdir(parents=True, exist_ok=True)
    try:
        # Plain CSV, like the real 3.5 GB file, so the figure includes parsing but not gzip.
        log = write_log(SynthConfig(users=users, events_per_user=events_per_user), base / "bench.csv", progress=progress)
        cfg = PrepareConfig()
        # The machine is shared: CPU seconds (all threads) and the load average make wall-clock figures comparable.
        load_before, cpu_before = os.getloadavg()[0], time.process_time()
        result = prepare(cfg, log.log, base / "prepared", progress=progress)
        cpu_seconds, load_after = time.process_time() - cpu_before, os.getloadavg()[0]
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)
    meta = result.meta
    stage_seconds: dict[str, float] = dict(meta["seconds"])  # type: ignore[arg-type]
    total = stage_seconds.pop("total")
    report: dict[str, object] = {
        "what": "dare prepare throughput on a SYNTHETIC log (dare synth), default PrepareConfig",
        "rows": log.rows,
        "users": users,
        "events_per_user": events_per_user,
        "input_bytes": meta["input"]["bytes"],  # type: ignore[index]
        "synth_seconds": round(log.seconds, 3),
        "prepare_seconds": total,
        "rows_per_second": round(log.rows / total, 1),
        "prepare_cpu_seconds": round(cpu_seconds, 3),
        "rows_per_cpu_second": round(log.rows / cpu_seconds, 1),
        "load_average_1min": {"before": round(load_before, 2), "after": round(load_after, 2)},
        "stage_seconds": stage_seconds,
        "samples": meta["counts"]["samples"],  # type: ignore[index]
        "config": cfg.to_dict(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "polars": pl.__version__,
        },
        "command": f"dare bench-prepare --rows {rows} --events-per-user {events_per_user} --out {out}",
    }
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    _plot_stages(stage_seconds, report, out.with_suffix(".png"))
    return report


def _plot_stages(stage_seconds: dict[str, float], report: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stage_seconds)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    ax.barh(names, [stage_seconds[n] for n in names], color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(
        f"dare prepare, {report['rows']:,} synthetic rows: {report['prepare_seconds']:.1f} s, "
        f"{report['rows_per_second']:,.0f} rows/s (load {report['load_average_1min']['before']})",  # type: ignore[index]
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

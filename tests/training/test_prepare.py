"""`dare prepare` on the real bundled sample, checked against an independent pure-Python reference, plus bad input."""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest

from dare_common import DareError
from service.contract import VOCAB_ARRAYS
from training.config import PrepareConfig
from training.prepare import SPLITS, default_sample_path, prepare
from training.train import load_prepared

CFG = PrepareConfig()
# What each split's samples look like to the trainer (histories sliced from sequences/ by the loader).
SPLIT_ARRAYS = ("user", "hist_item", "hist_cate", "cand_item", "cand_cate", "label")
# The files on disk (training/layout.py): dtype and number of dimensions.
SPLIT_FILES = {"user": (np.int32, 1), "position": (np.int32, 1), "cand_item": (np.int32, 2), "cand_cate": (np.int32, 2),
               "label": (np.uint8, 2)}  # fmt: skip
SEQUENCE_FILES = {"item": np.int32, "cate": np.int32, "time": np.uint32, "offsets": np.int64}
GOOD = "1,10,100,pv,1511544070\n"


def _load(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every sample as the trainer sees it (history sliced from the stored sequences), and the vocabulary."""
    data = load_prepared(folder)
    out = {}
    for name in SPLITS:
        split = getattr(data, name)
        hist_item, hist_cate = split.histories(np.arange(split.rows))
        out[name] = {"user": np.asarray(split.user, np.int64), "hist_item": hist_item, "hist_cate": hist_cate,
                     "cand_item": np.asarray(split.cand_item, np.int64), "cand_cate": np.asarray(split.cand_cate, np.int64),
                     "label": split.labels()}  # fmt: skip
    with np.load(folder / "vocab.npz", allow_pickle=False) as z:
        out["vocab"] = {k: z[k] for k in z.files}
    return out


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(CFG, None, out, progress=False)
    return out


@pytest.fixture(scope="module")
def data(sample_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    return _load(sample_dir)


@pytest.fixture(scope="module")
def meta(sample_dir: Path) -> dict:
    return orjson.loads((sample_dir / "meta.json").read_bytes())


@pytest.fixture(scope="module")
def reference() -> dict:
    """The recipe re-implemented the slow, obvious way (loops over rows and users) on the raw sample."""
    with gzip.open(default_sample_path(), "rt", newline="") as fh:
        lines = list(csv.reader(fh))
    assert len(lines[-1]) == 4, "the bundled sample should end in its truncated line"
    rows = [(int(u), int(i), int(c), b, int(t)) for u, i, c, b, t in lines[:-1]]
    in_range = [r for r in rows if CFG.min_timestamp <= r[4] < CFG.max_timestamp]
    pv = [r for r in in_range if r[3] in CFG.behaviors]
    per_user = Counter(r[0] for r in pv)
    kept = [r for r in pv if per_user[r[0]] >= CFG.min_events]
    # The one item with two categories keeps its most frequent one.
    pair_count = Counter((r[1], r[2]) for r in kept)
    best: dict[int, tuple[int, int]] = {}
    for (item, cate), n in pair_count.items():
        if item not in best or n > best[item][1]:
            best[item] = (cate, n)
    kept = [(u, i, best[i][0], b, t) for u, i, c, b, t in kept]
    user_row: dict[int, int] = {}
    item_row: dict[int, int] = {}
    cate_row: dict[int, int] = {}
    for u, i, c, _, _ in kept:
        user_row.setdefault(u, len(user_row))
        item_row.setdefault(i, len(item_row) + 2)
        cate_row.setdefault(c, len(cate_row) + 2)
    seqs: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for u, i, c, _, t in kept:
        seqs[u].append((t, item_row[i], cate_row[c]))
    for u in seqs:
        seqs[u].sort(key=lambda e: e[0])  # stable
    return {
        "rows": rows, "in_range": in_range, "pv": pv, "kept": kept,
        "user_row": user_row, "item_row": item_row, "cate_row": cate_row, "seqs": seqs,
    }  # fmt: skip


def _reference_split(ref: dict, split: str, cfg: PrepareConfig = CFG) -> tuple[list, list, list]:
    users, hists, targets = [], [], []
    for raw, row in sorted(ref["user_row"].items(), key=lambda kv: kv[1]):
        seq = ref["seqs"][raw]
        n = len(seq)
        if split == "test":
            positions = [n - 1]
        elif split == "val":
            positions = [n - 2]
        else:
            positions = [n - 3 - cfg.positive_stride * k for k in range(cfg.positives_per_user)]
            positions = sorted(p for p in positions if p >= 1)
        for t in positions:
            before = seq[max(0, t - cfg.history_len) : t]
            pad = [0] * (cfg.history_len - len(before))
            users.append(row)
            hists.append((pad + [e[1] for e in before], pad + [e[2] for e in before]))
            targets.append((seq[t][1], seq[t][2]))
    return users, hists, targets


def test_counts_on_the_real_sample(meta: dict, reference: dict) -> None:
    counts = meta["counts"]
    assert counts["rows_read"] == 84475 == len(reference["rows"])  # SOURCE.md: 84,475 complete rows
    assert counts["dropped"]["truncated_last_line"] == 1
    assert counts["dropped"]["timestamp_out_of_range"] == 35  # SOURCE.md: 35 rows outside the window
    assert counts["dropped"]["behavior_not_kept"] == len(reference["in_range"]) - len(reference["pv"])
    assert counts["dropped"]["user_below_min_events"] == len(reference["pv"]) - len(reference["kept"])
    assert counts["rows_kept"] == len(reference["kept"])
    assert counts["users"] == meta["users"] == len(reference["user_row"])
    assert counts["items"] == len(reference["item_row"]) and meta["item_rows"] == counts["items"] + 2
    assert counts["categories"] == len(reference["cate_row"]) and meta["cate_rows"] == counts["categories"] + 2
    assert counts["items_with_multiple_categories"] == 1
    assert meta["synthetic"] is False and meta["truth"] is None
    assert meta["config"] == orjson.loads(orjson.dumps(CFG.to_dict()))
    assert len(meta["data_fingerprint"]) == 64 and len(meta["input"]["sha256"]) == 64


def test_every_array_has_the_documented_shape_and_dtype(data: dict, meta: dict, sample_dir: Path, reference: dict) -> None:
    sequences = {name: np.load(sample_dir / "sequences" / f"{name}.npy") for name in SEQUENCE_FILES}
    for name, dtype in SEQUENCE_FILES.items():
        assert sequences[name].dtype == dtype and sequences[name].ndim == 1, name
    # Each user's events once, oldest first: item, category and timestamp of the reference sequences.
    seqs = [reference["seqs"][raw] for raw, _ in sorted(reference["user_row"].items(), key=lambda kv: kv[1])]
    assert sequences["offsets"].tolist() == np.cumsum([0] + [len(q) for q in seqs]).tolist()
    assert sequences["time"].tolist() == [e[0] for q in seqs for e in q]
    assert sequences["item"].tolist() == [e[1] for q in seqs for e in q]
    assert sequences["cate"].tolist() == [e[2] for q in seqs for e in q]
    assert not list(sample_dir.glob("*.npz*")) or {p.name for p in sample_dir.glob("*.npz")} <= {"vocab.npz", "truth.npz"}
    for split in SPLITS:
        files = {name: np.load(sample_dir / split / f"{name}.npy") for name in SPLIT_FILES}
        for name, (dtype, ndim) in SPLIT_FILES.items():
            assert files[name].dtype == dtype and files[name].ndim == ndim, (split, name)
        arrays = data[split]
        assert set(arrays) == set(SPLIT_ARRAYS)
        s = len(arrays["user"])
        assert s == meta["counts"]["samples"][split] > 0
        assert arrays["hist_item"].shape == arrays["hist_cate"].shape == (s, CFG.history_len)
        m = 1 + CFG.negatives_per_positive
        assert arrays["cand_item"].shape == arrays["cand_cate"].shape == arrays["label"].shape == (s, m)
        assert (arrays["label"][:, 0] == 1).all() and (arrays["label"][:, 1:] == 0).all()
        assert arrays["user"].min() >= 0 and arrays["user"].max() < meta["users"]
        assert arrays["cand_item"].min() >= 2 and arrays["cand_item"].max() < meta["item_rows"]
    assert data["val"]["user"].tolist() == data["test"]["user"].tolist() == list(range(meta["users"]))


def test_samples_match_the_reference_recipe(data: dict, reference: dict) -> None:
    """Exact equality with the loop implementation: targets, left padding, chronological order, no leak."""
    for split in SPLITS:
        users, hists, targets = _reference_split(reference, split)
        arrays = data[split]
        assert arrays["user"].tolist() == users
        np.testing.assert_array_equal(arrays["hist_item"], np.array([h[0] for h in hists]))
        np.testing.assert_array_equal(arrays["hist_cate"], np.array([h[1] for h in hists]))
        np.testing.assert_array_equal(arrays["cand_item"][:, 0], [t[0] for t in targets])
        np.testing.assert_array_equal(arrays["cand_cate"][:, 0], [t[1] for t in targets])


def test_history_is_left_padded_and_strictly_before_the_target(data: dict, reference: dict) -> None:
    hist = data["train"]["hist_item"]
    real = hist != 0
    # Once a row has a real behaviour, every later column does too (padding only on the left).
    assert (np.diff(real.astype(np.int8), axis=1) >= 0).all()
    # The most recent history slot is the event just before the target, never the target event itself.
    seqs = reference["seqs"]
    row_to_raw = {row: raw for raw, row in reference["user_row"].items()}
    for i in range(len(data["test"]["user"])):
        seq = seqs[row_to_raw[int(data["test"]["user"][i])]]
        assert data["test"]["hist_item"][i, -1] == seq[-2][1]
        assert data["test"]["cand_item"][i, 0] == seq[-1][1]
        assert (data["test"]["hist_item"][i] != 0).sum() == min(CFG.history_len, len(seq) - 1)


def test_negatives_are_frequency_drawn_and_never_in_the_users_history(data: dict, reference: dict, sample_dir: Path) -> None:
    item_cate = np.load(sample_dir / "item_cate.npy", allow_pickle=False)
    row_to_raw = {row: raw for raw, row in reference["user_row"].items()}
    seen = {raw: {e[1] for e in seq} for raw, seq in reference["seqs"].items()}
    negatives = []
    for split in SPLITS:
        arrays = data[split]
        neg = arrays["cand_item"][:, 1:]
        np.testing.assert_array_equal(arrays["cand_cate"][:, 1:], item_cate[neg])  # a negative's own category
        for u, row in zip(arrays["user"], neg, strict=True):
            assert not seen[row_to_raw[int(u)]].intersection(row.tolist())
        negatives.append(neg.reshape(-1))
    drawn = np.bincount(np.concatenate(negatives), minlength=len(item_cate))
    freq = np.bincount([e[1] for seq in reference["seqs"].values() for e in seq], minlength=len(item_cate))
    # Drawn in proportion to frequency: the 1% most frequent items get about their share of the rows (~7% here),
    # far above the 1% a uniform draw would give them (rejection of seen items lowers it a little).
    top = np.argsort(-freq)[: len(freq) // 100]
    freq_share, drawn_share = freq[top].sum() / freq.sum(), drawn[top].sum() / drawn.sum()
    assert 0.5 * freq_share < drawn_share < 1.5 * freq_share and drawn_share > 0.03


def test_vocab_round_trip_and_first_appearance_order(data: dict, reference: dict, sample_dir: Path) -> None:
    vocab = data["vocab"]
    assert set(vocab) == set(VOCAB_ARRAYS)
    for field, ref in (("item", reference["item_row"]), ("cate", reference["cate_row"])):
        raw, index = vocab[f"{field}_raw"], vocab[f"{field}_index"]
        assert raw.dtype == (np.uint64 if field == "item" else np.int64) and index.dtype == np.int64  # items: 64-bit hashes
        assert (np.diff(raw) > 0).all(), "raw ids must be sorted and unique"
        assert sorted(index.tolist()) == list(range(2, 2 + len(raw)))  # rows 0, 1 reserved
        mapped = index[np.searchsorted(raw, np.array(list(ref)))]  # raw -> row through the arrays
        assert mapped.tolist() == list(ref.values())
    item_cate = np.load(sample_dir / "item_cate.npy", allow_pickle=False)
    assert item_cate.dtype == np.int64 and item_cate.shape == (2 + len(vocab["item_raw"]),)
    assert item_cate[0] == 0 and item_cate[1] == 1
    # The item with two categories (SOURCE.md) keeps its most frequent: 3 rows of 2344159 vs 1 of 3002561.
    item = vocab["item_index"][np.searchsorted(vocab["item_raw"], 2633450)]
    cate = vocab["cate_index"][np.searchsorted(vocab["cate_raw"], 2344159)]
    assert item_cate[item] == cate
    for split in SPLITS:
        a = data[split]
        np.testing.assert_array_equal(item_cate[a["hist_item"]][a["hist_item"] != 0], a["hist_cate"][a["hist_item"] != 0])


def test_same_seed_same_data_other_seed_other_negatives(tmp_path: Path, data: dict, meta: dict) -> None:
    again = prepare(CFG, None, tmp_path / "again", progress=False)
    other = prepare(replace(CFG, seed=1), None, tmp_path / "other", progress=False)
    second, third = _load(tmp_path / "again"), _load(tmp_path / "other")
    for split in SPLITS:
        for name in SPLIT_ARRAYS:
            np.testing.assert_array_equal(second[split][name], data[split][name])
        np.testing.assert_array_equal(third[split]["hist_item"], data[split]["hist_item"])
    assert not np.array_equal(third["train"]["cand_item"], data["train"]["cand_item"])
    assert again.meta["data_fingerprint"] == meta["data_fingerprint"] != other.meta["data_fingerprint"]


# ------------------------------------------------------------------------------------------------------ quirks, errors


def _run(tmp_path: Path, text: str, name: str = "log.csv", **overrides: object) -> dict:
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    cfg = replace(PrepareConfig(min_events=4, history_len=3), **overrides)
    return prepare(cfg, path, tmp_path / "out", progress=False).meta


def _user_log(n: int = 6, user: int = 1) -> str:
    """n events of one user; each user views its own items, so the other users' items serve as negatives."""
    return "".join(f"{user},{1000 * user + 10 + i},{100 + i % 2},pv,{1511544070 + i}\n" for i in range(n))


def test_truncated_last_line_and_blank_lines_are_dropped_and_counted(tmp_path: Path) -> None:
    text = _user_log() + "\n" + _user_log(user=2) + "3,55,66,p"
    for name in ("log.csv", "log.csv.gz"):
        counts = _run(tmp_path, text, name)["counts"]
        assert counts["dropped"]["truncated_last_line"] == 1
        assert counts["dropped"]["blank_line"] == 1
        assert counts["rows_read"] == counts["rows_kept"] == 12


def test_a_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    counts = _run(tmp_path, (_user_log() + _user_log(user=2)).rstrip("\n"))["counts"]
    assert counts["dropped"]["truncated_last_line"] == 0 and counts["rows_kept"] == 12


def test_negatives_impossible_when_a_user_has_seen_every_item(tmp_path: Path) -> None:
    with pytest.raises(DareError, match="could not draw negatives for 1 user"):
        _run(tmp_path, _user_log())


def test_out_of_order_events_are_sorted_by_time_stably(tmp_path: Path) -> None:
    lines = [f"1,{10 + i},100,pv,{1511544070 + i}" for i in range(6)]
    tied = "1,99,101,pv,1511544072"  # same time as item 12, later in the file: must stay after it
    text = "\n".join([lines[5], lines[0], lines[2], tied, lines[1], lines[3], lines[4]]) + "\n" + _user_log(user=2)
    _run(tmp_path, text)
    test = _load(tmp_path / "out")["test"]
    vocab = np.load(tmp_path / "out" / "vocab.npz")
    raw = dict(zip(vocab["item_index"].tolist(), vocab["item_raw"].tolist(), strict=True))
    # Time order: 10, 11, 12, 99 (tied with 12, later in the file), 13, 14, 15; test target 15, last 3 before it.
    assert [raw[r] for r in test["hist_item"][0].tolist()] == [99, 13, 14]
    assert raw[int(test["cand_item"][0, 0])] == 15


def test_item_ids_use_the_whole_unsigned_64_bit_range(tmp_path: Path) -> None:
    """64-bit hashed item ids: read exactly (never through int64 or a float), kept as uint64 in vocab.npz."""
    big = [2**64 - 1, 2**63, 2**63 + 1, 7]
    lines = [f"1,{big[i % 4]},100,pv,{1511544070 + i}" for i in range(6)]
    _run(tmp_path, "\n".join(lines) + "\n" + _user_log(user=2))
    vocab = np.load(tmp_path / "out" / "vocab.npz")
    assert vocab["item_raw"].dtype == np.uint64 and set(big) <= set(vocab["item_raw"].tolist())
    raw = dict(zip(vocab["item_index"].tolist(), vocab["item_raw"].tolist(), strict=True))
    test = _load(tmp_path / "out")["test"]
    assert raw[int(test["cand_item"][0, 0])] == big[5 % 4]  # user 1's last event: 2**63 + 1
    assert [raw[r] for r in test["hist_item"][0].tolist()] == [big[2], big[3], big[0]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_user_log(2) + "1,-3,100,pv,1511544070\n" + GOOD, r"log\.csv:3: item_id '-3' is not an integer from 0 to 2\*\*64-1"),
        (_user_log(2) + "1,10,100,pv,1511544070,7\n" + GOOD, r"log\.csv:3: expected 5 comma-separated fields .* found 6"),
        (_user_log(2) + "1,10,100,pv\n" + GOOD, r"log\.csv:3: fewer than 5 fields or an empty field"),
        (_user_log(2) + "1,,100,pv,1511544070\n" + GOOD, r"log\.csv:3: fewer than 5 fields or an empty field"),
        (_user_log(2) + "1,abc,100,pv,1511544070\n" + GOOD, r"log\.csv:3: item_id 'abc' is not an integer"),
        (_user_log(2) + "1,10,100,click,1511544070\n" + GOOD, r"log\.csv:3: behavior_type 'click' is not one of pv"),
        ("user_id,item_id,category_id,behavior_type,timestamp\n" + GOOD, r"log\.csv:1: user_id 'user_id' .* no header"),
        (_user_log(5, user=1) + _user_log(3, user=2), r"no rows left after filtering"),
        ("1,10,100,pv\n" + GOOD, r"log\.csv:1: expected 5 comma-separated fields .* found 4"),
        ("\x00\x01abc,\x02\n", r"log\.csv:1: expected 5 comma-separated fields .* found 2"),
        ("1,10,10", r"log\.csv: no complete rows"),
        # Only a last line cut mid-line (no newline after it) is forgiven; a short line ending in a newline is not.
        (_user_log(2) + "\n" + "1,10\n", r"log\.csv:4: fewer than 5 fields"),
    ],
)
def test_malformed_input_is_a_dare_error_naming_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DareError, match=message):
        _run(tmp_path, text, min_events=6)


def test_missing_empty_and_corrupt_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DareError, match="no such file"):
        prepare(CFG, tmp_path / "nope.csv", tmp_path / "out", progress=False)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DareError, match="empty.csv: the file is empty"):
        prepare(CFG, tmp_path / "empty.csv", tmp_path / "out", progress=False)
    (tmp_path / "empty.csv.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(DareError, match="empty"):
        prepare(CFG, tmp_path / "empty.csv.gz", tmp_path / "out", progress=False)
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81,\x80\n")
    with pytest.raises(DareError, match="binary.csv: cannot parse as user_id,item_id"):
        prepare(CFG, tmp_path / "binary.csv", tmp_path / "out", progress=False)
    (tmp_path / "cut.csv.gz").write_bytes(gzip.compress(_user_log().encode())[:-12])
    with pytest.raises(DareError, match="not a readable gzip file"):
        prepare(CFG, tmp_path / "cut.csv.gz", tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"behaviors": ("pv", "click")}, "unknown behaviour"),
        ({"behaviors": ()}, "at least one"),
        ({"min_events": 3}, "--min-events must be >= 4"),
        ({"history_len": 0}, "--history-len must be >= 1"),
        ({"negatives_per_positive": 0}, "--negatives must be >= 1"),
        ({"min_timestamp": 5, "max_timestamp": 5}, "--min-timestamp"),
    ],
)
def test_bad_options_are_named(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(DareError, match=message):
        prepare(replace(CFG, **overrides), None, tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------------------------------------------- CLI


def _dare(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dare.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_prepares_the_bundled_sample_from_any_directory(tmp_path: Path, meta: dict) -> None:
    done = _dare("prepare", "--out", "prepared", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "truncated_last_line 1" in done.stdout and "timestamp_out_of_range 35" in done.stdout
    written = orjson.loads((tmp_path / "prepared" / "meta.json").read_bytes())
    assert written["data_fingerprint"] == meta["data_fingerprint"]


def test_cli_bad_input_exits_2_with_one_clean_line(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text(_user_log(3) + "1,x,100,pv,1511544070\n")
    done = _dare("prepare", "--input", "bad.csv", "--out", "o", "--no-progress", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["error: bad.csv:4: item_id 'x' is not an integer from 0 to 2**64-1"]

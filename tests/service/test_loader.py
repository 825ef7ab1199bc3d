"""`dare load`: the bundled real sample and hand-made logs with every quirk, into a real Redis."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dare_common import DareError
from service.loader import LoadConfig, load
from service.store import SequenceStore

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "taobao-sample" / "UserBehavior.csv.gz"


@pytest.fixture
def store(redis_url: str) -> SequenceStore:
    s = SequenceStore.from_url(redis_url, lifelong_max_events=100_000)
    yield s
    s.close()


def write(path: Path, text: str) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def test_bundled_sample_loads_every_pv_sequence(store: SequenceStore) -> None:
    report = load(LoadConfig(input=SAMPLE, progress=False), store)
    # SOURCE.md: 84,475 complete rows, 75,872 pv; the cut last line is dropped and counted
    assert report.rows_read == 84_475 and report.truncated_last_line == 1
    assert report.events == 75_872 and report.dropped["behavior_not_kept"] == 84_475 - 75_872
    assert report.users == 813  # users with at least one pv
    assert report.users_per_s > 0 and report.events_per_s > 0
    # user 1 (the file's first line is `1,2268318,2520377,pv,1511544070`): in time order, pv only
    with gzip.open(SAMPLE, "rt") as fh:
        rows = [line.strip().split(",") for line in fh if line.startswith("1,")]
    want = sorted(((int(r[4]), int(r[1]), int(r[2])) for r in rows if len(r) == 5 and r[3] == "pv"), key=lambda t: t[0])
    hist = store.read("1", 10_000)
    got = list(zip(hist.events["timestamp"].tolist(), hist.events["item_id"].tolist(), hist.events["category_id"].tolist()))
    assert got == want


def test_quirks_sorting_filters_and_trim(tmp_path: Path, store: SequenceStore) -> None:
    log = write(
        tmp_path / "log.csv.gz",
        "7,100,10,pv,1511600030\n"
        "7,101,11,pv,1511600010\n"  # earlier: sorted before the first row
        "\n"  # blank line: skipped
        "7,102,12,buy,1511600020\n"  # not kept by default
        "8,200,20,pv,1511600000\n"
        "8,201,21,pv,-5\n"  # negative timestamp: cannot be stored, dropped and counted
        "8,202,4294967296,pv,1511600001\n"  # category beyond uint32: dropped and counted
        "7,103,13,pv,1511600010\n"  # same timestamp as 101: keeps file order after it
        "9,300,3",  # cut mid-row, no newline: the truncated last line
    )
    report = load(LoadConfig(input=log, progress=False), store)
    assert report.truncated_last_line == 1 and report.users == 2 and report.events == 4
    assert report.dropped == {"behavior_not_kept": 1, "id_out_of_range": 1, "timestamp_out_of_range": 1}
    assert store.read("7", 10).events["item_id"].tolist() == [101, 103, 100]
    assert store.read("8", 10).events["item_id"].tolist() == [200]
    assert not store.read("9", 10).exists
    # more behaviours and a time window
    report = load(LoadConfig(input=log, behaviors=("pv", "buy"), min_timestamp=1511600010, progress=False), store)
    assert store.read("7", 10).events["item_id"].tolist() == [101, 103, 102, 100]
    assert not store.read("8", 10).events.size or report.users == 1
    # the lifelong maximum keeps the most recent events
    small = SequenceStore(store.client, lifelong_max_events=2)
    report = load(LoadConfig(input=log, progress=False), small)
    assert small.read("7", 10).events["item_id"].tolist() == [103, 100] and report.events_trimmed == 1


def test_replace_is_idempotent_and_append_adds(tmp_path: Path, store: SequenceStore) -> None:
    log = write(tmp_path / "log.csv", "1,10,1,pv,100\n1,11,1,pv,101\n2,20,2,pv,100\n")
    for _ in range(2):
        load(LoadConfig(input=log, progress=False), store)
    assert store.read("1", 10).stored_length == 2
    load(LoadConfig(input=log, append=True, progress=False), store)
    assert store.read("1", 10).events["item_id"].tolist() == [10, 11, 10, 11]
    assert store.read("2", 10).stored_length == 2


def test_batches_smaller_than_the_user_count(tmp_path: Path, store: SequenceStore) -> None:
    rows = "".join(f"{u},{1000 + k},{k % 5},pv,{1511600000 + k}\n" for u in range(23) for k in range(u + 1))
    report = load(LoadConfig(input=write(tmp_path / "log.csv", rows), batch_users=4, progress=False), store)
    assert report.users == 23 and report.events == sum(range(1, 24))
    for u in (0, 11, 22):
        assert store.read(str(u), 100).events["item_id"].tolist() == [1000 + k for k in range(u + 1)]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1,10,1,pv,100\n1,11,1,pv\n1,12,1,pv,102\n", "malformed line '1,11,1,pv' \\(4 fields"),
        ("1,10,1,pv,100\n1,11,1,pv\n", "malformed line '1,11,1,pv'"),  # cut, but it ends in a newline
        ("1,10,1,pv,100\n1,abc,1,pv,101\n", "not a Taobao-format CSV"),
        ("1,10,1,pv,100\n1,11,1,click,101\n", "unknown behaviour type 'click'"),
        ("1,10,1,pv,100,extra\n", "malformed"),
    ],
)
def test_malformed_files_are_clear_errors(tmp_path: Path, store: SequenceStore, text: str, problem: str) -> None:
    with pytest.raises(DareError, match=problem):
        load(LoadConfig(input=write(tmp_path / "bad.csv", text), progress=False), store)


def test_bad_options_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DareError, match="--behaviors"):
        LoadConfig(input=tmp_path / "x.csv", behaviors=("click",))
    with pytest.raises(DareError, match="--batch"):
        LoadConfig(input=tmp_path / "x.csv", batch_users=0)


def test_dare_load_command(tmp_path: Path, redis_url: str) -> None:
    dare = [sys.executable, "-c", "from dare.cli import main; main()"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DARE_")}
    log = write(tmp_path / "log.csv", "5,10,1,pv,100\n5,11,1,pv,101\n6,20,2,cart,100\n")
    out = subprocess.run(
        [*dare, "load", "--input", str(log), "--redis", redis_url, "--report", str(tmp_path / "r.json"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "users/s" in out.stderr and "events/s" in out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["users"] == 1 and report["events"] == 2
    missing = subprocess.run([*dare, "load", "--input", str(tmp_path / "nope.csv"), "--redis", redis_url],
                             capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "nope.csv: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_embedded_store_when_no_url(tmp_path: Path) -> None:
    log = write(tmp_path / "log.csv", "5,10,1,pv,100\n")
    store = SequenceStore.from_url(None, data_dir=tmp_path / "var")
    try:
        assert load(LoadConfig(input=log, progress=False), store).users == 1
        assert np.array_equal(store.read("5", 10).events["item_id"], [10])
    finally:
        store.close()


def test_interleaved_users_are_grouped(tmp_path: Path, store: SequenceStore) -> None:
    # every row is in time order, but users alternate: the grouping must still collect each user's rows
    log = write(tmp_path / "log.csv", "1,10,1,pv,100\n2,20,2,pv,101\n1,11,1,pv,102\n2,21,2,pv,103\n1,12,1,pv,104\n")
    assert load(LoadConfig(input=log, progress=False), store).users == 2
    assert store.read("1", 10).events["item_id"].tolist() == [10, 11, 12]
    assert store.read("2", 10).events["item_id"].tolist() == [20, 21]


@pytest.mark.parametrize("append", [False, True])
def test_item_ids_use_the_whole_unsigned_64_bit_range(tmp_path: Path, store: SequenceStore, append: bool) -> None:
    log = write(tmp_path / "big.csv", f"5,{2**64 - 1},3,pv,1511600000\n5,7,3,pv,1511600001\n6,{2**63},4,pv,1511600002\n")
    report = load(LoadConfig(input=log, append=append, progress=False), store)
    assert report.events == 3 and report.dropped["id_out_of_range"] == 0
    assert store.read("5", 10).events["item_id"].tolist() == [2**64 - 1, 7]
    assert store.read("6", 10).events["item_id"].tolist() == [2**63]
    assert store.client.get(store.key("5"))[:5] == b"DSEQ\x02"  # the format version that holds them


def test_a_negative_or_too_large_item_id_is_an_error_naming_it(tmp_path: Path, store: SequenceStore) -> None:
    for bad in ("-5", str(2**64)):
        log = write(tmp_path / "bad.csv", f"5,1,3,pv,1511600000\n5,{bad},3,pv,1511600001\n")
        with pytest.raises(DareError, match=bad):
            load(LoadConfig(input=log, progress=False), store)

"""dare_common.taobao: the two readers of the Taobao log apply the same rules."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from dare_common import DareError
from dare_common.taobao import SAMPLE, MalformedLog, iter_rows, read_log

QUIRKY = "1,10,100,pv,1511544070\n\n2,20,200,buy,1511544071\n1,11,101,cart,1511544072\n3,30,3"  # blank line, cut end


@pytest.mark.parametrize("name", ["log.csv", "log.csv.gz"])
def test_both_readers_keep_the_same_rows(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(gzip.compress(QUIRKY.encode()) if name.endswith(".gz") else QUIRKY.encode())
    log = read_log(path)
    assert (log.rows_read, log.blank_lines, log.truncated_last_line) == (3, 1, 1)
    assert log.frame.rows() == [(u, i, c, t) for u, i, c, _b, t in iter_rows(path)]
    assert read_log(path, behaviors=("pv", "cart")).behavior_not_kept == 1


def test_the_bundled_sample_by_both_readers() -> None:
    rows = list(iter_rows(SAMPLE))
    assert len(rows) == read_log(SAMPLE).rows_read == 84_475  # SOURCE.md: the cut last line dropped


def test_a_malformed_line_is_named_by_both_readers(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("1,10,100,pv,1511544070\n1,10,100,click,1511544071\n")
    with pytest.raises(MalformedLog, match=r"bad\.csv:2: behavior_type 'click'"):
        read_log(path)
    with pytest.raises(MalformedLog, match=r"bad\.csv:2: not a row of user_id,item_id"):
        list(iter_rows(path))
    with pytest.raises(DareError, match="nope.csv: no such file"):
        list(iter_rows(tmp_path / "nope.csv"))

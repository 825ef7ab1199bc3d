"""loadtest/http_ab.py: a smoke run with two servers of this checkout (one with an environment variable), the floor
and the in-process engine (real redis-server, real `dare serve`), and its one-line errors. No assertion on speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.shipping.conftest import ROOT

TOOL = [sys.executable, str(ROOT / "loadtest" / "http_ab.py")]


def test_two_servers_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    run = subprocess.run([*TOOL, "--tree", "a=.", "--tree", "b=.@MALLOC_ARENA_MAX=2", "--quick", "--rounds", "6",
                          "--warmup", "1", "--workload", "W2", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["workload"] == "W2" and report["rounds"] == 6
    assert report["trees"] == {"a": str(ROOT), "b": f"{ROOT}@MALLOC_ARENA_MAX=2"}
    rows = report["results"]
    assert list(rows) == ["a", "b", "floor", "in_process"]
    for name in ("a", "b"):
        row = rows[name]
        # CPU is read in clock ticks (10 ms): a few quick rounds may add up to none of them
        assert row["p50_ms"] > 0 and row["p90_ms"] >= row["p50_ms"] and row["cpu_ms_per_call"] >= 0
        assert set(row["stage_p50_ms"]) >= {"store_fetch", "id_mapping", "search", "scoring"}
        assert row["thread_cpu_ms_per_call"]["loop"] > 0  # the event loop is the server's main thread
        base, floor = rows["in_process"]["p50_ms"], rows["floor"]["p50_ms"]
        assert row["vs_in_process"] == round(row["p50_ms"] / base, 3)
        assert row["overhead_over_floor"] == round((row["p50_ms"] - base) / floor, 3)
        assert row["outside_search_ms"] == round(row["p50_ms"] - row["stage_p50_ms"]["search"], 3)
    assert rows["floor"]["stage_p50_ms"] == {} and rows["floor"]["thread_cpu_ms_per_call"] is None
    assert rows["in_process"]["cpu_ms_per_call"] is None and "search" in rows["in_process"]["stage_p50_ms"]
    assert "vs_in_process" not in rows["floor"] and "vs_in_process" not in rows["in_process"]
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ") == 5 and "| floor |" in table  # header + 4 rows


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    for args, message in [
        (["--tree", "nopath"], "expected NAME=PATH"),
        (["--tree", f"x={tmp_path}"], "is not a checkout of this project"),
        (["--tree", "x=.", "--tree", "x=."], "must be distinct"),
        (["--tree", "floor=."], "must be distinct and not 'floor'"),
        (["--tree", "x=.", "--workload", "W9"], "--workload must be one of"),
        (["--tree", "x=.", "--rounds", "1"], "--rounds must be >= 2"),
    ]:
        run = subprocess.run([*TOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        assert message in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)

"""`dare bench` smoke run (--quick, real redis-server and `dare serve` started by the bench itself): the records'
schema, the files written, the ratios computed from the records. No assertion on how fast anything is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dare.bench import (BACKENDS, HTTP_STAGE, OUTSIDE_STAGE, PEERS, QUICK_WORKLOADS, STAGES, VARIANTS, BenchConfig, quick_config, run,
                        target_ratios)  # fmt: skip
from service.registry import IdMap
from service.search import kernel_available, kernel_bf16

RECORD_KEYS = {"att_dim": int, "workload": str, "backend": str, "stage": str, "p50_ms": float, "p99_ms": float}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[BenchConfig, list[dict], list[Path]]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cfg = BenchConfig(out=out, quick=True, repeats=2, http=True, progress=False)
    records, files = run(cfg, command="dare bench --quick (test)")
    return quick_config(cfg), records, files


def test_records_schema_and_coverage(quick_run: tuple[BenchConfig, list[dict], list[Path]]) -> None:
    cfg, records, files = quick_run
    on_disk = json.loads(files[0].read_text())
    assert on_disk == records
    for record in on_disk:
        assert set(record) == set(RECORD_KEYS)
        for key, kind in RECORD_KEYS.items():
            assert isinstance(record[key], kind), (key, record)
        assert record["workload"] in ("W1", "W2", "W3", "W4")
        assert record["backend"] in BACKENDS
        assert 0 < record["p50_ms"] <= record["p99_ms"]
    cells = {(r["workload"], r["att_dim"], r["backend"], r["stage"]) for r in on_disk}
    expected = {(w.name, d, b, s) for w in QUICK_WORKLOADS for d in cfg.att_dims for b in BACKENDS for s in STAGES}
    expected |= {(w.name, d, "onnxruntime", s) for w in QUICK_WORKLOADS for d in cfg.att_dims for s in (HTTP_STAGE, OUTSIDE_STAGE)}
    assert cells == expected
    assert len(on_disk) == len(cells)  # one record per cell


def test_files_written(quick_run: tuple[BenchConfig, list[dict], list[Path]]) -> None:
    cfg, records, files = quick_run
    names = {f.name for f in files}
    assert names == {"bench.json", "bench.meta.json", "bench.md", "bench.png"}
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)
    png = cfg.out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    md = cfg.out.with_suffix(".md").read_text()
    assert "QUICK mode" in md and "RANDOMLY INITIALISED" in md and "SYNTHETIC" in md
    for d in cfg.att_dims:
        assert f"att {d}" in md
    # Every record's p50 appears in the table.
    for r in records:
        assert f"{r['p50_ms']:.3f} ({r['p99_ms']:.3f})" in md
    meta = json.loads(cfg.out.with_suffix(".meta.json").read_text())
    assert meta["random_init"] and meta["synthetic_data"] and meta["command"] == "dare bench --quick (test)"
    # The three backends answered the same requests with the same model.
    assert set(meta["max_prob_diff"]) == {"torch", "http"}
    assert max(meta["max_prob_diff"].values()) < 1e-3
    names = [r["name"] for r in meta["ratios"]]
    long = [w for w in QUICK_WORKLOADS if w.name != "W1"]
    assert names.count("HTTP / in-process") == len(long) * len(cfg.att_dims)
    assert names.count("HTTP / in-process (back to back)") == len(long) * len(cfg.att_dims)
    assert names.count("service overhead / framework floor") == len(cfg.att_dims)
    # CPU-time rows where the cell's CPU time is above zero (servers count theirs in 10 ms clock ticks)
    assert 0 < names.count("service overhead / framework floor (CPU time)") <= len(cfg.att_dims)
    assert 0 < names.count("HTTP / in-process (CPU time)") <= len(long) * len(cfg.att_dims)
    assert names.count("torch eager / onnxruntime (CPU time)") == len(cfg.att_dims)
    # In-process, POST /score and the framework floor, back to back, for every workload and dim.
    paired = meta["http_paired"]
    assert {(p["workload"], p["att_dim"]) for p in paired} == {(w.name, d) for w in QUICK_WORKLOADS for d in cfg.att_dims}
    assert all(p["in_process_p50_ms"] > 0 and p["http_p50_ms"] > 0 and p["floor_p50_ms"] > 0 for p in paired)
    assert all(p["in_process_cpu_ms"] > 0 and p["http_server_cpu_ms"] >= 0 and p["floor_server_cpu_ms"] >= 0 for p in paired)
    assert all(0 < p["http_outside_search_p50_ms"] < p["http_p50_ms"] for p in paired)
    assert "## POST /score, in-process and the framework floor, back to back (p50 ms)" in md
    # The fixed-rate rows: every long workload at the smallest dim, each request answered, stages from the answers.
    fixed = meta["fixed_rate"]
    assert [(f["workload"], f["att_dim"]) for f in fixed] == [(w.name, min(cfg.att_dims)) for w in long]
    assert all(f["requests"] == 10 and 0 < f["p50_ms"] <= f["p95_ms"] <= f["p99_ms"] <= f["max_ms"] for f in fixed)
    assert all(set(f["stages_p50_ms"]) == {"store_fetch", "id_mapping", "search", "scoring"} for f in fixed)
    assert all(0 < f["outside_search_p50_ms"] < f["p99_ms"] for f in fixed)
    # Every POST /score in the main table also gives its time outside its own search, which is shorter.
    http = {(r["workload"], r["att_dim"]): r["p50_ms"] for r in records if r["stage"] == HTTP_STAGE}
    outside = {(r["workload"], r["att_dim"]): r["p50_ms"] for r in records if r["stage"] == OUTSIDE_STAGE}
    assert set(outside) == set(http) and all(0 < outside[k] < http[k] for k in http)
    assert "## POST /score at a fixed rate (10 requests/s, open loop)" in md
    assert (meta["fused_search"] is True) == kernel_available()[0]
    if not kernel_available()[0]:
        assert meta["search_peers"] == []
        return
    # The kernel and its peers on the same inputs, W2 to W4, every dim; the peers find the kernel's events.
    peers = meta["search_peers"]
    timed = [p for p in PEERS if kernel_bf16() or p not in VARIANTS]  # both pass-1 variants where the CPU runs both
    assert {(p["workload"], p["att_dim"], p["peer"]) for p in peers} == {(w.name, d, p) for w in long for d in cfg.att_dims for p in timed}
    assert set(meta["pass1_served"].values()) <= {"float32", "bfloat16"}
    assert all(p["p50_ms"] > 0 and p["same_events"] >= 0.9 for p in peers)
    # Arithmetic rate: 4 C N d flops over the p50, against the measured single-thread GEMM peak.
    w_of = {w.name: w for w in long}
    for p in peers:
        w = w_of[p["workload"]]
        assert abs(p["gflops"] - 4 * w.candidates * w.history * p["att_dim"] / (p["p50_ms"] / 1000) / 1e9) <= 0.01 + 0.01 * p["gflops"]
    assert meta["peak_gflops"] > 1 and "share of peak" in md
    assert names.count("search att_dim scaling (CPU time)") == 1
    assert names.count("fused kernel vs best peer") == len(long)
    assert "## The search and its peers" in md


def test_ratios_follow_the_records(tmp_path: Path) -> None:
    cfg = BenchConfig(out=tmp_path / "b.json", att_dims=(16, 128))

    def rec(w: str, d: int, b: str, s: str, p50: float) -> dict:
        return {"att_dim": d, "workload": w, "backend": b, "stage": s, "p50_ms": p50, "p99_ms": p50 * 2}

    records = [
        rec("W2", 16, "onnxruntime", "search", 2.0), rec("W2", 128, "onnxruntime", "search", 7.0),
        rec("W2", 16, "onnxruntime", "total", 4.0), rec("W2", 16, "torch", "total", 10.0),
        rec("W2", 128, "onnxruntime", "total", 9.0), rec("W2", 128, "torch", "total", 12.0),
        rec("W2", 16, "onnxruntime", HTTP_STAGE, 4.8), rec("W2", 128, "onnxruntime", HTTP_STAGE, 12.0),
        rec("W1", 16, "onnxruntime", HTTP_STAGE, 9.0), rec("W1", 16, "onnxruntime", "total", 1.0),
    ]  # fmt: skip
    by_detail = {(r.name, r.detail): r for r in target_ratios(records, cfg)}
    search = by_detail[("search att_dim scaling", "search p50 att128 / att16")]
    assert search.value == pytest.approx(3.5) and not search.met
    assert by_detail[("torch eager / onnxruntime", "total p50, att16")].met  # 2.5x
    assert not by_detail[("torch eager / onnxruntime", "total p50, att128")].met  # 1.33x
    assert by_detail[("HTTP / in-process", "POST /score p50 / in-process total p50, att16")].met  # 1.2x
    assert not by_detail[("HTTP / in-process", "POST /score p50 / in-process total p50, att128")].met  # 1.33x
    assert all(r.workload != "W1" for r in by_detail.values())  # W1 is judged against the framework floor
    meta = {
        "http_paired": [{"workload": "W1", "att_dim": 16, "in_process_p50_ms": 1.0, "http_p50_ms": 2.2, "floor_p50_ms": 1.0,
                         "in_process_cpu_ms": 1.0, "http_server_cpu_ms": 1.6, "floor_server_cpu_ms": 0.5}],
        "search_peers": [
            {"workload": "W2", "att_dim": d, "peer": p, "p50_ms": ms, "cpu_p50_ms": ms, "same_events": 1.0}
            for d, p, ms in ((16, "fused kernel", 1.0), (16, "faiss", 2.0), (16, "numpy", 1.4), (128, "fused kernel", 5.0))
        ],
    }
    by_name = {r.name: r for r in target_ratios(records, cfg, meta)}
    assert by_name["service overhead / framework floor"].value == pytest.approx(1.2) and by_name["service overhead / framework floor"].met
    assert by_name["service overhead / framework floor (CPU time)"].value == pytest.approx(1.2)
    assert by_name["fused kernel vs best peer"].value == pytest.approx(1.4) and not by_name["fused kernel vs best peer"].met
    assert by_name["search att_dim scaling (CPU time)"].value == pytest.approx(5.0)
    meta["http_paired"].append({"workload": "W3", "att_dim": 16, "in_process_p50_ms": 6.0, "http_p50_ms": 7.0, "floor_p50_ms": 0.5,
                                "in_process_cpu_ms": 6.0, "http_server_cpu_ms": 7.0, "floor_server_cpu_ms": 0.5,
                                "http_outside_search_p50_ms": 2.5})  # fmt: skip
    meta["fixed_rate"] = [{"workload": "W3", "att_dim": 16, "rate": 10.0, "requests": 300, "p50_ms": 9.0, "p95_ms": 12.0,
                           "p99_ms": 16.0, "max_ms": 20.0, "stages_p50_ms": {"search": 6.0}, "outside_search_p50_ms": 3.5}]  # fmt: skip
    records.append(rec("W3", 16, "onnxruntime", OUTSIDE_STAGE, 4.5))
    by_name = {r.name: r for r in target_ratios(records, cfg, meta)}
    assert by_name["POST /score p99 ms at 10 requests/s"].value == 16.0 and not by_name["POST /score p99 ms at 10 requests/s"].met
    # Each answer's time outside its own search, not the difference of two p50s
    assert by_name["ms outside the search at 10 requests/s"].value == pytest.approx(3.5)
    assert by_name["ms outside the search at 10 requests/s"].met
    assert by_name["ms outside the search"].value == pytest.approx(4.5) and not by_name["ms outside the search"].met
    assert by_name["ms outside the search (back to back)"].value == pytest.approx(2.5) and by_name["ms outside the search (back to back)"].met


def test_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    for args, needle in (
        (["--out", str(tmp_path / "bench.txt")], "must name a .json file"),
        (["--out", str(tmp_path / "b.json"), "--att-dims", "16,x"], "--att-dims must be comma-separated integers"),
        (["--out", str(tmp_path / "b.json"), "--repeats", "0"], "--repeats must be >= 1"),
    ):
        done = subprocess.run([sys.executable, "-m", "dare.cli", "bench", *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert needle in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())


def test_dense_id_lookup_matches_binary_search() -> None:
    rng = np.random.default_rng(0)
    raw = np.sort(rng.choice(200_000, 5_000, replace=False)).astype(np.int64)
    index = rng.permutation(np.arange(2, 2 + len(raw))).astype(np.int64)
    dense = IdMap.build(raw, index)
    assert dense.dense is not None
    search = IdMap(raw, index)  # no table: the binary search
    ids = np.concatenate([rng.choice(raw, 3_000), rng.integers(-5, 250_000, 3_000), [0, raw[-1], raw[-1] + 1, 2**62]])
    got = dense(ids)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, search(ids))
    assert (got[:3_000] >= 2).all() and got[-1] == 1 and got[-2] == 1
    # Raw ids too large for a table of DENSE_LOOKUP_MAX_BYTES keep the binary search.
    huge = IdMap.build(np.array([5, 2**40], dtype=np.int64), np.array([2, 3], dtype=np.int64))
    assert huge.dense is None
    np.testing.assert_array_equal(huge(np.array([5, 2**40, 7])), [2, 3, 1])

"""`dare bench` smoke run (--quick, real redis-server and `dare serve` started by the bench itself): the records'
schema, the files written, the ratios computed from the records. No assertion on how fast anything is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dare.bench import BACKENDS, HTTP_STAGE, QUICK_WORKLOADS, STAGES, BenchConfig, quick_config, run, target_ratios
from service.registry import IdMap
from service.search import kernel_available, kernel_isa

RECORD_KEYS = {"att_dim": int, "workload": str, "backend": str, "stage": str, "p50_ms": float, "p99_ms": float}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[BenchConfig, list[dict], list[Path]]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cfg = BenchConfig(out=out, quick=True, repeats=2, http=True, profile=True, progress=False)
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
        assert record["workload"] in ("W1", "W2", "W3")
        assert record["backend"] in BACKENDS
        assert 0 < record["p50_ms"] <= record["p99_ms"]
    cells = {(r["workload"], r["att_dim"], r["backend"], r["stage"]) for r in on_disk}
    expected = {(w.name, d, b, s) for w in QUICK_WORKLOADS for d in cfg.att_dims for b in BACKENDS for s in STAGES}
    expected |= {(w.name, d, "onnxruntime", HTTP_STAGE) for w in QUICK_WORKLOADS for d in cfg.att_dims}
    assert cells == expected
    assert len(on_disk) == len(cells)  # one record per cell


def test_files_written(quick_run: tuple[BenchConfig, list[dict], list[Path]]) -> None:
    cfg, records, files = quick_run
    names = {f.name for f in files}
    assert names == {"bench.json", "bench.meta.json", "bench.md", "bench.png", "bench.profile.json", "bench.profile.md"}
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
    assert names.count("HTTP / in-process") == len(QUICK_WORKLOADS) * len(cfg.att_dims)
    assert names.count("torch eager / onnxruntime (CPU time)") == len(cfg.att_dims)
    assert names.count("search att_dim scaling (CPU time)") == 1
    # Before/after of each change, measured in the same run, for every workload (the ASGI one: W1 and W2).
    changes = meta["changes"]
    assert {(c["stage"], c["workload"]) for c in changes} == {
        (s, w.name) for s in ("id_mapping", "store_fetch") for w in QUICK_WORKLOADS
    } | {("POST /score (ASGI, no socket)", w.name) for w in QUICK_WORKLOADS[:2]} | {
        (f"search.onnx, att {d}", w.name) for d in cfg.att_dims for w in QUICK_WORKLOADS
    } | {(f"candidate validation, C={w.candidates} (CPU)", w.name) for w in QUICK_WORKLOADS} | (
        {(f"search, att {d}", w.name) for d in cfg.att_dims for w in QUICK_WORKLOADS} if kernel_available()[0] else set()
    )
    # The kernel against search.onnx, and (on an AVX-512 CPU) its AVX2 code too.
    fused_rows = {c["after"] for c in changes if c["before"] == "search.onnx"}
    expected_rows = {512: {"fused kernel", "fused kernel, AVX2 code"}, 256: {"fused kernel"}}.get(kernel_isa(), set())
    assert fused_rows == (expected_rows if kernel_available()[0] else set())
    # The CPU-time search scaling is that of the search the service runs at W2: the fused kernel where it is usable.
    scaling = next(r for r in meta["ratios"] if r["name"] == "search att_dim scaling (CPU time)")
    # The service runs the kernel by default wherever it runs: AVX-512F or AVX2 + FMA (service/search.py).
    assert scaling["detail"].startswith("fused search" if kernel_available()[0] else "search.onnx")
    assert (meta["fused_search"] is True) == kernel_available()[0]
    paired = meta["http_paired"]
    assert {(p["workload"], p["att_dim"]) for p in paired} == {(w.name, d) for w in QUICK_WORKLOADS for d in cfg.att_dims}
    assert all(p["in_process_p50_ms"] > 0 and p["http_p50_ms"] > 0 and p["http_stdlib_p50_ms"] > 0 for p in paired)
    # The service's own timings, read off its /metrics: its engine stages run inside its request timing.
    assert all(p["server_request_mean_ms"] > p["server_stages_mean_ms"] > 0 for p in paired)
    assert "| workload | att dim | in-process | POST /score | in the service | of which engine stages |" in md
    # The HTTP floor servers (dare.http_floor) answered, in a rotation of their own: a bare uvicorn app, a raw protocol.
    assert all(p["floor_uvicorn_p50_ms"] > 0 and p["floor_raw_p50_ms"] > 0 and p["floor_in_process_p50_ms"] > 0 for p in paired)
    assert "## The HTTP floor (p50 ms)" in md
    assert names.count("HTTP / in-process (back to back)") == len(QUICK_WORKLOADS) * len(cfg.att_dims)
    assert all(c["before_p50_ms"] > 0 and c["after_p50_ms"] > 0 for c in changes)
    assert "## Changes, before / after in this run" in md
    options = {(o["att_dim"], o["optimization"], o["threads"]) for o in meta["ort_options"]}
    assert options == {(d, level, t) for d in cfg.att_dims for level in ("basic", "extended", "all") for t in (1, 2)}
    profile = json.loads(cfg.out.with_suffix(".profile.json").read_text())
    assert {(p["workload"], p["att_dim"], p["graph"]) for p in profile} == {
        (w.name, d, g) for w in QUICK_WORKLOADS for d in cfg.att_dims for g in ("search", "score")
    }
    assert any(p["op_type"] == "TopK" and p["graph"] == "search" for p in profile)


def test_ratios_follow_the_records(tmp_path: Path) -> None:
    cfg = BenchConfig(out=tmp_path / "b.json", att_dims=(16, 128))

    def rec(w: str, d: int, b: str, s: str, p50: float) -> dict:
        return {"att_dim": d, "workload": w, "backend": b, "stage": s, "p50_ms": p50, "p99_ms": p50 * 2}

    records = [
        rec("W2", 16, "onnxruntime", "search", 2.0), rec("W2", 128, "onnxruntime", "search", 7.0),
        rec("W2", 16, "onnxruntime", "total", 4.0), rec("W2", 16, "torch", "total", 10.0),
        rec("W2", 128, "onnxruntime", "total", 9.0), rec("W2", 128, "torch", "total", 12.0),
        rec("W2", 16, "onnxruntime", HTTP_STAGE, 4.8), rec("W2", 128, "onnxruntime", HTTP_STAGE, 12.0),
    ]  # fmt: skip
    by_detail = {(r.name, r.detail): r for r in target_ratios(records, cfg)}
    search = by_detail[("search att_dim scaling", "search p50 att128 / att16")]
    assert search.value == pytest.approx(3.5) and not search.met
    assert by_detail[("torch eager / onnxruntime", "total p50, att16")].met  # 2.5x
    assert not by_detail[("torch eager / onnxruntime", "total p50, att128")].met  # 1.33x
    assert by_detail[("HTTP / in-process", "POST /score p50 / in-process total p50, att16")].met  # 1.2x
    assert not by_detail[("HTTP / in-process", "POST /score p50 / in-process total p50, att128")].met  # 1.33x


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

"""The fused search kernel (service/_search.c via service/search.py) against search.onnx, and how model folders
opt in or out of it. The HTTP contract test (test_scoring.py, N = 3,000) checks it against PyTorch end to end."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.contract import SEARCH_OUTPUTS, ModelFolderError, load_manifest, sha256_file
from service.registry import InferenceOptions, load_model
from service.search import FUSED_MIN_HISTORY_PER_K, FusedSearch, kernel_available, kernel_bf16, kernel_isa, to_bf16_pairs

needs_kernel = pytest.mark.skipif(not kernel_available()[0], reason=f"fused search unavailable: {kernel_available()[1]}")
# The kernel is compiled for AVX-512F and for AVX2 + FMA; a CPU with AVX-512F runs both, so both are checked there.
ISAS = [isa for isa in (512, 256) if isa <= kernel_isa()] or [0]


def retrieved_keys(index: np.ndarray, hist_item: np.ndarray, hist_cate: np.ndarray, max_position: int) -> np.ndarray:
    """Per candidate, the sorted (item row, category row, clipped position) of the retrieved events: what the score
    graph reads. Events equal in all three score equally and either may be retrieved."""
    if len(hist_item) == 0:
        return np.full_like(index, -1)
    safe = np.maximum(index, 0)
    position = np.minimum(len(hist_item) - safe, max_position)
    key = (hist_item[safe] * 1_000_003 + hist_cate[safe]) * (max_position + 1) + position
    return np.sort(np.where(index >= 0, key, -1), axis=1)


@pytest.fixture(scope="module", params=[16, 12])
def big_vocab_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random DARE model with a vocabulary large enough for few exact ties (top-20), exported; att 16, and att 12
    (not a multiple of the kernel's 16-float vectors)."""
    import torch

    from training.config import ModelConfig
    from training.export import export_graph, graph_module, write_attention_tables
    from training.model import build_model

    torch.manual_seed(3)
    model = build_model(
        ModelConfig(kind="dare", item_rows=5_002, cate_rows=102, att_dim=request.param, repr_dim=8, top_k=20, max_position=200)
    )
    folder = tmp_path_factory.mktemp("fused")
    export_graph(graph_module(model, "search"), "search", folder / "search.onnx", model, 17)
    spec = write_attention_tables(model, folder / "attention.npz")
    assert spec is not None
    (folder / "scale.json").write_text(json.dumps({"scale": spec.scale}))
    return folder


def fused_of(folder: Path, top_k: int = 20, max_position: int = 200, isa: int = 0) -> FusedSearch:
    with np.load(folder / "attention.npz") as npz:
        return FusedSearch(
            item=npz["item"], cate=npz["cate"], position_column=npz["position_column"],
            scale=json.loads((folder / "scale.json").read_text())["scale"], max_position=max_position, top_k=top_k,
            isa=isa,
        )  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("n", "c"), [(0, 3), (1, 1), (7, 5), (19, 2), (20, 4), (21, 33), (200, 100), (1_000, 1), (10_000, 200), (50_000, 31)])
def test_fused_search_equals_search_onnx(big_vocab_model: Path, n: int, c: int, isa: int) -> None:
    fused = fused_of(big_vocab_model, isa=isa)
    session = ort.InferenceSession(str(big_vocab_model / "search.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(n * 31 + c)
    feeds = {
        "hist_item": rng.integers(1, 5_002, n), "hist_cate": rng.integers(1, 102, n),
        "cand_item": rng.integers(1, 5_002, c), "cand_cate": rng.integers(1, 102, c),
    }  # fmt: skip
    want_index, want_weight = session.run(list(SEARCH_OUTPUTS), feeds)
    index, weight = fused.run(feeds["hist_item"], feeds["hist_cate"], feeds["cand_item"], feeds["cand_cate"])
    assert index.shape == weight.shape == (c, 20) and index.dtype == np.int64 and weight.dtype == np.float32
    keys = retrieved_keys(index, feeds["hist_item"], feeds["hist_cate"], 200)
    want_keys = retrieved_keys(want_index, feeds["hist_item"], feeds["hist_cate"], 200)
    # Two events whose scores differ in the last float32 bits may trade the K-th place (summation order differs):
    # rare, and then the weights still agree (next line).
    assert (keys == want_keys).all(axis=1).mean() >= (0.9 if n >= 1_000 else 1.0)
    assert np.abs(np.sort(weight, 1) - np.sort(want_weight, 1)).max() <= 1e-6
    real = index >= 0
    assert (real.sum(1) == min(n, 20)).all() and (weight[~real] == 0).all()
    assert (np.diff(weight, axis=1) <= 1e-7).all()  # best first, as search.onnx


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_fused_search_with_many_equal_scores(big_vocab_model: Path, isa: int) -> None:
    """5 distinct (item, category) pairs over 5,000 events: most events tie with many others (same rows, positions
    past max_position). Either copy of a tied event may be retrieved; what the score graph reads must not differ."""
    fused = fused_of(big_vocab_model, isa=isa)
    session = ort.InferenceSession(str(big_vocab_model / "search.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    pick = rng.integers(0, 5, 5_000)
    feeds = {"hist_item": (np.arange(5) * 7 + 2)[pick], "hist_cate": (np.arange(5) + 2)[pick],
             "cand_item": rng.integers(1, 5_002, 50), "cand_cate": rng.integers(1, 102, 50)}  # fmt: skip
    want_index, want_weight = session.run(list(SEARCH_OUTPUTS), feeds)
    index, weight = fused.run(feeds["hist_item"], feeds["hist_cate"], feeds["cand_item"], feeds["cand_cate"])
    keys = retrieved_keys(index, feeds["hist_item"], feeds["hist_cate"], 200)
    assert (keys == retrieved_keys(want_index, feeds["hist_item"], feeds["hist_cate"], 200)).all()
    assert np.abs(np.sort(weight, 1) - np.sort(want_weight, 1)).max() <= 1e-6
    assert ((index >= 0).sum(1) == 20).all() and len({tuple(r) for r in np.sort(index, 1)}) >= 1


@needs_kernel
def test_fused_search_from_many_threads_at_once(big_vocab_model: Path) -> None:
    """The kernel releases the GIL and keeps its scratch memory per thread: concurrent calls (short-lived threads,
    as anyio's idle workers are retired) give the answers of sequential ones."""
    from concurrent.futures import ThreadPoolExecutor

    fused = fused_of(big_vocab_model)
    rng = np.random.default_rng(9)
    users = [(rng.integers(1, 5_002, n), rng.integers(1, 102, n), rng.integers(1, 5_002, 64), rng.integers(1, 102, 64))
             for n in (300, 5_000, 20_000, 1_000) * 4]  # fmt: skip
    want = [fused.run(*u) for u in users]
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:  # new threads each round
            got = list(pool.map(lambda u: fused.run(*u), users))
        for (gi, gw), (wi, ww) in zip(got, want):
            assert np.array_equal(gi, wi) and np.array_equal(gw, ww)


@pytest.mark.skipif(kernel_isa() < 512, reason="needs a CPU with AVX-512F to run both instruction sets")
def test_both_instruction_sets_retrieve_the_same_events(big_vocab_model: Path) -> None:
    """Pass 1 sums each lane's products in the same order on both, so the retrieved events are identical; pass 2's
    rescoring may round differently (weights within 1e-6)."""
    rng = np.random.default_rng(11)
    for n, c in ((5_000, 200), (777, 33), (20_000, 64)):
        feeds = (rng.integers(1, 5_002, n), rng.integers(1, 102, n), rng.integers(1, 5_002, c), rng.integers(1, 102, c))
        (i5, w5), (i2, w2) = fused_of(big_vocab_model, isa=512).run(*feeds), fused_of(big_vocab_model, isa=256).run(*feeds)
        assert np.array_equal(i5, i2) and np.abs(w5 - w2).max() <= 1e-6


@needs_kernel
def test_fused_search_asked_for_an_instruction_set_this_cpu_lacks(big_vocab_model: Path) -> None:
    fused = fused_of(big_vocab_model, isa=1024)
    ok = np.arange(30, dtype=np.int64)
    with pytest.raises(RuntimeError, match="AVX2 \\+ FMA or AVX-512F"):
        fused.run(ok, ok, ok[:3], ok[:3])


@needs_kernel
def test_fused_search_rejects_out_of_range_rows(big_vocab_model: Path) -> None:
    fused = fused_of(big_vocab_model)
    ok = np.arange(30, dtype=np.int64)
    with pytest.raises(ValueError, match="hist_item"):
        fused.run(np.full(30, 5_002), ok, ok[:3], ok[:3])
    with pytest.raises(ValueError, match="cand_cate"):
        fused.run(ok, ok, ok[:3], np.array([0, -1, 2]))


def test_folder_loads_with_the_fused_search_or_without_it(tmp_path: Path, exported_model_dir: Path) -> None:
    folder = tmp_path / "dare-a"
    shutil.copytree(exported_model_dir, folder)
    assert load_manifest(folder).attention is not None  # dare export writes attention.npz for DARE
    model = load_model(folder, InferenceOptions())
    assert (model.fused is not None) == kernel_available()[0]  # auto: the kernel wherever it runs (AVX-512F or AVX2)
    assert load_model(folder, InferenceOptions(search_kernel="onnx")).fused is None
    assert (load_model(folder, InferenceOptions(search_kernel="fused")).fused is not None) == kernel_available()[0]
    assert "search" in model.info(default=True)
    # A folder exported before attention.npz existed (no `attention` in its manifest) is searched with search.onnx.
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["attention"]
    (folder / "attention.npz").unlink()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert load_model(folder, InferenceOptions()).fused is None


def test_kernel_unavailable_falls_back_to_search_onnx_and_fused_warns(
    tmp_path: Path, exported_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the kernel cannot run (no build, or a CPU with neither instruction set), every setting serves the folder
    with search.onnx; under `auto` that is expected (INFO), asked for by name (`fused`) it is a WARNING."""
    import service.search

    folder = tmp_path / "dare-a"
    shutil.copytree(exported_model_dir, folder)
    monkeypatch.setattr(service.search, "kernel_available", lambda: (False, "this CPU has neither AVX-512F nor AVX2 + FMA"))
    for setting, level in (("auto", logging.INFO), ("fused", logging.WARNING)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dare.service"):
            assert load_model(folder, InferenceOptions(search_kernel=setting)).fused is None
        said = [r for r in caplog.records if "fused search unavailable" in r.getMessage()]
        assert [r.levelno for r in said] == [level], setting
        assert "neither AVX-512F nor AVX2 + FMA" in said[0].getMessage()


@needs_kernel
def test_small_vocabulary_with_many_ties_passes_the_load_check(tmp_path: Path, make_exported_model) -> None:
    """60 item and 12 category rows, top-20 of 3,000 events: most retrieved events tie with others. The load-time
    comparison with search.onnx must accept either copy of a tied event (it once rejected such a folder)."""
    folder = make_exported_model(tmp_path, att_dim=16, repr_dim=8, top_k=20)
    assert load_model(folder, InferenceOptions()).fused is not None


def rewrite_attention(folder: Path, **arrays: np.ndarray) -> None:
    """Replace arrays of attention.npz and re-pin its sha256, so only the content check can catch it."""
    with np.load(folder / "attention.npz") as npz:
        data = {name: npz[name] for name in npz.files}
    data.update(arrays)
    with (folder / "attention.npz").open("wb") as fh:
        np.savez(fh, **data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["attention"]["sha256"] = sha256_file(folder / "attention.npz")
    (folder / "manifest.json").write_text(json.dumps(manifest))


@needs_kernel
def test_folder_whose_attention_tables_disagree_with_search_onnx_is_rejected(tmp_path: Path, exported_model_dir: Path) -> None:
    folder = tmp_path / "dare-a"
    shutil.copytree(exported_model_dir, folder)
    with np.load(folder / "attention.npz") as npz:
        item = npz["item"][::-1].copy()  # the right shape, the wrong rows
    rewrite_attention(folder, item=item)
    with pytest.raises(ModelFolderError, match="disagree with search.onnx"):
        load_model(folder, InferenceOptions())
    rewrite_attention(folder, item=item[:, :3].copy())
    with pytest.raises(ModelFolderError, match=r"item must be float32 \[60, 8\]"):
        load_model(folder, InferenceOptions())
    assert load_model(folder, InferenceOptions(search_kernel="onnx")).fused is None  # the setting skips the file


def test_threshold_is_documented_in_the_settings() -> None:
    from service.core.config import Settings

    description = Settings.model_fields["search_kernel"].description or ""
    assert f"at least {FUSED_MIN_HISTORY_PER_K} x top-K events" in description


@needs_kernel
def test_a_split_search_gives_exactly_the_single_thread_answer(big_vocab_model: Path) -> None:
    """The candidates cut into slices of whole tiles, searched in other threads: bit for bit the one-thread answer, on
    many random users, with histories shorter than one block, heavy ties (a tiny vocabulary) and odd candidate
    counts."""
    from concurrent.futures import ThreadPoolExecutor

    fused = fused_of(big_vocab_model)
    variants = [fused, fused.with_bf16()] if kernel_bf16() else [fused]  # pass 1 in float32, and in bfloat16
    rng = np.random.default_rng(11)
    with ThreadPoolExecutor(3) as pool:
        for trial in range(60):
            fused = variants[trial % len(variants)]
            n = int(rng.choice([0, 3, 7, 150, 2_000, 20_000]))
            c = int(rng.integers(1, 230))
            vocab = 5_002 if trial % 2 else 4  # 4 item rows x 3 categories: nearly every score ties
            args = (rng.integers(1, vocab, n), rng.integers(1, min(vocab, 102), n),
                    rng.integers(1, vocab, c), rng.integers(1, min(vocab, 102), c))  # fmt: skip
            want_index, want_weight = fused.run(*args)
            for parts in (2, 3):
                index, weight = fused.run_split(*args, pool=pool, parts=parts)
                assert np.array_equal(index, want_index) and np.array_equal(weight, want_weight), (n, c, parts)


@needs_kernel
def test_the_splitter_splits_only_a_lone_long_search(big_vocab_model: Path) -> None:
    """A long search splits while its call is the only one in flight; while another call runs (any stage), it runs in
    its own thread only; a short one never splits."""
    import threading

    from service.search import SearchSplitter

    calls: list[int] = []
    in_caller: list[int] = []  # the candidates searched in the thread that called the splitter

    class Recording(FusedSearch):
        def run(self, hist_item, hist_cate, cand_item, cand_cate):  # type: ignore[no-untyped-def]
            calls.append(len(cand_item))
            if threading.current_thread() is threading.main_thread():
                in_caller.append(len(cand_item))
            return super().run(hist_item, hist_cate, cand_item, cand_cate)

    base = fused_of(big_vocab_model)
    fused = Recording(base.item, base.cate, base.position_column, base.scale, base.max_position, base.top_k)
    splitter = SearchSplitter(2)
    rng = np.random.default_rng(5)
    long_args = (rng.integers(1, 5_002, 20_000), rng.integers(1, 102, 20_000), rng.integers(1, 5_002, 200), rng.integers(1, 102, 200))
    try:
        with splitter.call():
            splitter.run(fused, *long_args)
        assert sorted(calls) == [72, 128] and in_caller == [128]  # alone: whole 32-candidate tiles, 4 in the caller's thread
        calls.clear()
        with splitter.call(), splitter.call():  # another call is in flight (reading its history, scoring, ...)
            splitter.run(fused, *long_args)
        assert calls == [200]
        calls.clear()
        with splitter.call():
            splitter.run(fused, long_args[0][:500], long_args[1][:500], long_args[2], long_args[3])
        assert calls == [200]  # 500 x 200 is below SPLIT_MIN_WORK
    finally:
        splitter.shutdown()


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to pin to")
def test_a_split_search_runs_its_threads_on_different_cpus(big_vocab_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While it splits, the calling thread keeps off the pool thread's CPU (one CPU, pinned), and gets its own CPUs
    back afterwards; a process on one CPU does not split; where the system refuses the pinning, the split runs
    unpinned."""
    import threading

    from service.search import SearchSplitter

    seen: dict[str, set[int]] = {}

    class Recording(FusedSearch):
        def run(self, hist_item, hist_cate, cand_item, cand_cate):  # type: ignore[no-untyped-def]
            seen["caller" if threading.current_thread() is threading.main_thread() else "pool"] = os.sched_getaffinity(0)
            return super().run(hist_item, hist_cate, cand_item, cand_cate)

    base = fused_of(big_vocab_model)
    fused = Recording(base.item, base.cate, base.position_column, base.scale, base.max_position, base.top_k)
    rng = np.random.default_rng(6)
    long_args = (rng.integers(1, 5_002, 20_000), rng.integers(1, 102, 20_000), rng.integers(1, 5_002, 200), rng.integers(1, 102, 200))
    want = fused.run(*long_args)
    mine = os.sched_getaffinity(0)
    splitter = SearchSplitter(2)
    try:
        with splitter.call():
            got = splitter.run(fused, *long_args)
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
        assert seen["pool"] == {max(mine)} and seen["caller"] == mine - {max(mine)}
        assert os.sched_getaffinity(0) == mine  # given back
    finally:
        splitter.shutdown()
    seen.clear()
    os.sched_setaffinity(0, {min(mine)})  # a process on one CPU: no split (its threads would take turns)
    try:
        splitter = SearchSplitter(2)
        with splitter.call():
            got = splitter.run(fused, *long_args)
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
        assert "pool" not in seen and seen["caller"] == {min(mine)} and os.sched_getaffinity(0) == {min(mine)}
    finally:
        os.sched_setaffinity(0, mine)
        splitter.shutdown()
    splitter = SearchSplitter(2)
    try:
        with splitter.call():
            splitter.run(fused, *long_args)  # the pool thread is pinned; now the system refuses any change

        def refuse(pid: int, cpus: object) -> None:
            raise OSError(22, "Invalid argument")

        monkeypatch.setattr(os, "sched_setaffinity", refuse)
        with splitter.call():
            got = splitter.run(fused, *long_args)
        assert all(np.array_equal(a, b) for a, b in zip(got, want)) and os.sched_getaffinity(0) == mine
    finally:
        monkeypatch.undo()
        splitter.shutdown()


needs_bf16 = pytest.mark.skipif(not kernel_bf16(), reason="the bfloat16 pass 1 needs a CPU with AVX-512 BF16")


@needs_bf16
def test_auto_precision_serves_bfloat16_only_where_it_measures_faster(
    tmp_path: Path, exported_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """DARE_SEARCH_PRECISION=auto times both pass-1 variants when the model loads and serves bfloat16 only from
    BF16_MIN_GAIN on (the gain is logged); `bfloat16` serves it whatever it measures, `float32` never times it."""
    import service.search

    folder = tmp_path / "dare-a"
    shutil.copytree(exported_model_dir, folder)
    timed: list[float] = []
    real_gain = FusedSearch.bf16_gain

    def gain(self: FusedSearch, bf16: FusedSearch) -> float:
        timed.append(real_gain(self, bf16))
        return timed[-1]

    monkeypatch.setattr(FusedSearch, "bf16_gain", gain)
    for min_gain, precision, served in ((0.0, "auto", True), (1e9, "auto", False), (1e9, "bfloat16", True), (0.0, "float32", False)):
        monkeypatch.setattr(service.search, "BF16_MIN_GAIN", min_gain)
        timed.clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dare.service"):
            fused = load_model(folder, InferenceOptions(search_kernel="fused", search_precision=precision)).fused
        assert fused is not None and (fused.bf16 is not None) == served, (min_gain, precision)
        assert len(timed) == (precision != "float32") and all(g > 0 for g in timed)
        said = [r.getMessage() for r in caplog.records if "fused search" in r.getMessage()]
        assert said and (f"bfloat16 measured {timed[0]:.2f}x as fast" in said[-1] if timed else "DARE_SEARCH_PRECISION=float32" in said[-1])


@needs_bf16
def test_the_bfloat16_pass_gives_the_float32_answer_on_many_users(big_vocab_model: Path) -> None:
    """Pass 1 in bfloat16 only narrows down which blocks pass 2 rescores in float32: on 300 random users (histories
    shorter than one block, a few blocks, thousands of events; heavy ties from a tiny vocabulary; 1 to 230 candidates)
    it retrieves what the float32 kernel retrieves, with the same weights up to float32 rounding."""
    fp32 = fused_of(big_vocab_model)
    bf16 = fp32.with_bf16()
    rng = np.random.default_rng(21)
    agree: list[float] = []
    for trial in range(300):
        n = int(rng.choice([0, 1, 5, 7, 8, 9, 40, 199, 200, 201, 3_000, 20_000]))
        c = int(rng.integers(1, 230))
        vocab = 5_002 if trial % 3 else 4  # 4 item rows x 3 categories: nearly every score ties
        args = (rng.integers(1, vocab, n), rng.integers(1, min(vocab, 102), n),
                rng.integers(1, vocab, c), rng.integers(1, min(vocab, 102), c))  # fmt: skip
        (want_index, want_weight), (index, weight) = fp32.run(*args), bf16.run(*args)
        keys, want_keys = retrieved_keys(index, args[0], args[1], 200), retrieved_keys(want_index, args[0], args[1], 200)
        agree.append(float((keys == want_keys).all(axis=1).mean()))
        assert np.abs(np.sort(weight, 1) - np.sort(want_weight, 1)).max() <= 1e-6, (n, c)
        assert ((index >= 0).sum(1) == min(n, 20)).all() and (np.diff(weight, axis=1) <= 1e-7).all()
    # Pass 2 sums a block's scores in another order than float32 pass 1 does for a block it does not rescore: two
    # events a float32 rounding apart may trade the K-th place, as between the two instruction sets' pass 2.
    assert np.mean(agree) >= 0.999 and min(agree) >= 0.9


@needs_bf16
def test_the_bfloat16_pass_is_exact_where_bfloat16_rounding_reorders_the_events() -> None:
    """Every history row is one base row plus a perturbation far below bfloat16's resolution (8 bits): in bfloat16
    many events score the same, in float32 they do not. The retrieved events are still the exact top-K (float64
    reference), event for event, and so are the weights."""
    rng = np.random.default_rng(4)
    d, rows, n, c, k = 16, 3_000, 4_000, 40, 20
    base = rng.standard_normal(d).astype(np.float32)
    item = (base + 1e-4 * rng.standard_normal((rows, d))).astype(np.float32)
    cate = rng.standard_normal((10, d)).astype(np.float32) * 0.1
    item[0] = cate[0] = 0.0
    position_column = np.zeros(201, dtype=np.float32)  # no position term: only the perturbations tell events apart
    fused = FusedSearch(item, cate, position_column, scale=0.25, max_position=200, top_k=k).with_bf16()
    hist_item = np.resize(rng.permutation(np.arange(1, rows)), n)  # every row at most twice: few exact ties
    hist_cate = np.full(n, 3)
    cand_item, cand_cate = rng.integers(1, rows, c), np.full(c, 3)
    index, weight = fused.run(hist_item, hist_cate, cand_item, cand_cate)
    h = np.concatenate([item[hist_item], cate[hist_cate]], axis=1).astype(np.float64)  # [N, 2d]
    q = 0.25 * np.concatenate([item[cand_item], cate[cand_cate]], axis=1).astype(np.float64)  # [C, 2d]
    scores = q @ h.T  # [C, N]
    exact = np.sort(scores, axis=1)[:, ::-1][:, :k]
    got = np.take_along_axis(scores, index, axis=1)
    # The retrieved events' exact scores are the K best (ties within float32 rounding may trade places).
    assert np.abs(got - exact).max() <= 1e-6 * np.abs(exact).max()
    coarse = to_bf16_pairs(item).view(np.uint16)[:, :d].astype(np.uint32) << 16
    assert len(np.unique(coarse[hist_item].view(np.float32), axis=0)) < n / 2  # bfloat16 merges most rows

"""POST /score with real exported models (randomly initialised, see tests/conftest.py) and a real Redis:
the contract (service == PyTorch to 1e-5), cold start, explain, model choice, reload, degraded mode, metrics."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from service.schemas import ModelsResponse, ReloadResponse, ScoreResponse
from service.search import kernel_isa
from service.store import SequenceStore, make_events
from tests.conftest import TEST_CATE_RAW_IDS, TEST_ITEM_RAW_IDS, export_random_model
from tests.service.conftest import encode_v1

UNKNOWN_ITEM, UNKNOWN_CATE = 999_999, 77  # not in the test vocabulary: out-of-vocabulary row


@pytest.fixture(scope="session")
def twin_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_random_model(tmp_path_factory.mktemp("random-twin"), kind="twin", att_dim=8, repr_dim=8, seed=1)


@pytest.fixture(scope="session")
def other_dare_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another DARE model (different weights, same architecture): a 'new version' for reload tests."""
    return export_random_model(tmp_path_factory.mktemp("random-dare-v2"), kind="dare", att_dim=8, repr_dim=16, seed=7)


def random_history(rng: np.random.Generator, n: int) -> np.ndarray:
    items = rng.choice(np.array(TEST_ITEM_RAW_IDS + (UNKNOWN_ITEM,)), size=n)
    cates = rng.choice(np.array(TEST_CATE_RAW_IDS + (UNKNOWN_CATE,)), size=n)
    stamps = 1_511_600_000 + np.arange(n) * 7
    return make_events(items, cates, stamps)


def random_candidates(rng: np.random.Generator, c: int) -> list[dict[str, int]]:
    items = rng.choice(np.array(TEST_ITEM_RAW_IDS + (UNKNOWN_ITEM,)), size=c)
    cates = rng.choice(np.array(TEST_CATE_RAW_IDS + (UNKNOWN_CATE,)), size=c)
    return [{"item_id": int(i), "category_id": int(k)} for i, k in zip(items, cates)]


def torch_reference(run_dir: Path, model_dir: Path, history: np.ndarray, candidates: list[dict[str, int]]):
    """The PyTorch model's probabilities and search output, with ids mapped by a plain dict (independently of the
    service's vectorised mapping)."""
    import torch

    from training.run import load_run

    model = load_run(run_dir).model.eval()
    with np.load(model_dir / "vocab.npz") as vocab:
        item_row = dict(zip(vocab["item_raw"].tolist(), vocab["item_index"].tolist()))
        cate_row = dict(zip(vocab["cate_raw"].tolist(), vocab["cate_index"].tolist()))

    def rows(ids, table) -> torch.Tensor:
        return torch.tensor([[table.get(int(i), 1) for i in ids]], dtype=torch.long)

    hist_item, hist_cate = rows(history["item_id"], item_row), rows(history["category_id"], cate_row)  # [1, N]
    cand_item = rows([c["item_id"] for c in candidates], item_row)  # [1, C]
    cand_cate = rows([c["category_id"] for c in candidates], cate_row)
    with torch.no_grad():
        prob = torch.sigmoid(model(hist_item, hist_cate, cand_item, cand_cate))[0].numpy()  # [C]
        index, weight = model.search(hist_item, hist_cate, cand_item, cand_cate)  # [1, C, K]
    return prob, index[0].numpy(), weight[0].numpy()


# 300 and 3,000 events: the fused search kernel (service/search.py: from 10 x top-K events), where the CPU has AVX-512.
@pytest.mark.parametrize(
    ("n", "max_history"), [(0, 100_000), (3, 100_000), (37, 100_000), (300, 100_000), (300, 120), (3_000, 100_000), (3_000, 1_500)]
)
def test_service_scores_equal_pytorch_to_1e5(
    make_client, redis_url: str, models_dir: Path, exported_model_dir: Path, n: int, max_history: int
) -> None:
    """The contract test: for the same history and candidates, HTTP /score == the PyTorch model, max |diff| <= 1e-5."""
    rng = np.random.default_rng(n)
    history = random_history(rng, n)
    candidates = random_candidates(rng, 40)
    store = SequenceStore.from_url(redis_url)
    if n:
        store.replace("user", history)
    store.close()
    with make_client(models_dir=models_dir, max_history=max_history) as client:
        r = client.post("/score", json={"user_id": "user", "candidates": candidates, "explain": True})
    assert r.status_code == 200, r.text
    body = ScoreResponse.model_validate(r.json())
    used = history[-max_history:] if n else history
    assert body.history_length == len(used) and body.stored_length == n and body.cold_start == (n == 0)
    prob, index, weight = torch_reference(exported_model_dir.parent / "run", exported_model_dir, used, candidates)
    got = np.array(body.scores)
    assert got.shape == prob.shape
    assert np.abs(got - prob).max() <= 1e-5, np.abs(got - prob).max()
    assert ((got > 0) & (got < 1)).all()
    # explain: the same retrieved behaviours and weights as the PyTorch search. Behaviours with equal item, category
    # and clipped position score equally, and either copy may be retrieved: compare them by those keys.
    max_position = 50
    assert body.explain is not None and len(body.explain) == len(candidates)
    for c, retrieved in enumerate(body.explain):
        want = sorted(
            (int(used[i]["item_id"]), int(used[i]["category_id"]), min(len(used) - int(i), max_position), float(w))
            for i, w in zip(index[c], weight[c])
            if i >= 0
        )
        got_c = sorted((b.item_id, b.category_id, min(b.position, max_position), b.weight) for b in retrieved)
        assert len(got_c) == len(want) == min(len(used), 5)
        for g, w in zip(got_c, want):
            assert g[:3] == w[:3] and abs(g[3] - w[3]) <= 1e-5
        for b in retrieved:  # raw ids and timestamps are those of the behaviour at that position
            event = used[len(used) - b.position]
            assert (b.item_id, b.category_id, b.timestamp) == tuple(int(x) for x in event)


def test_cold_start_and_explain_shapes(make_client, models_dir: Path) -> None:
    with make_client(models_dir=models_dir) as client:
        cands = [{"item_id": TEST_ITEM_RAW_IDS[0], "category_id": TEST_CATE_RAW_IDS[0]}] * 3  # duplicates are fine
        r = client.post("/score", json={"user_id": "new-user", "candidates": cands, "explain": True})
        assert r.status_code == 200
        body = r.json()
        assert body["cold_start"] is True and body["degraded"] is False and body["history_length"] == 0
        assert body["model"] == "dare-a" and len(body["scores"]) == 3 and len(set(body["scores"])) == 1
        assert body["explain"] == [[], [], []]
        assert set(body["timings_ms"]) == {"store_fetch", "id_mapping", "search", "scoring"}
        events = [{"item_id": TEST_ITEM_RAW_IDS[k], "category_id": TEST_CATE_RAW_IDS[k % 10], "timestamp": 100 + k}
                  for k in range(2)]  # fmt: skip
        client.post("/events", json={"user_id": "new-user", "events": events})
        body = client.post("/score", json={"user_id": "new-user", "candidates": cands, "explain": True}).json()
        assert body["cold_start"] is False and body["history_length"] == 2
        for retrieved in body["explain"]:  # K = 5 > N = 2: padding left out, weights sum to 1
            assert len(retrieved) == 2 and abs(sum(b["weight"] for b in retrieved) - 1) < 1e-5
            assert {b["timestamp"] for b in retrieved} == {100, 101}
        no_explain = client.post("/score", json={"user_id": "new-user", "candidates": cands}).json()
        assert no_explain["explain"] is None and no_explain["scores"] == body["scores"]


def test_model_listing_default_and_choice(make_client, models_dir: Path, twin_model_dir: Path) -> None:
    shutil.copytree(twin_model_dir, models_dir / "twin-b")
    cands = [{"item_id": TEST_ITEM_RAW_IDS[3], "category_id": TEST_CATE_RAW_IDS[3]}]
    with make_client(models_dir=models_dir) as client:
        listing = ModelsResponse.model_validate(client.get("/models").json())
        assert listing.default == "dare-a"  # first by name
        facts = {m.name: m for m in listing.models}
        assert facts["dare-a"].kind == "dare" and facts["dare-a"].att_dim == 8 and facts["dare-a"].repr_dim == 16
        assert facts["twin-b"].kind == "twin" and facts["twin-b"].top_k == 5 and facts["dare-a"].default
        a = client.post("/score", json={"user_id": "u", "candidates": cands}).json()
        b = client.post("/score", json={"user_id": "u", "candidates": cands, "model": "twin-b"}).json()
        assert a["model"] == "dare-a" and b["model"] == "twin-b" and a["scores"] != b["scores"]
        assert client.post("/score", json={"user_id": "u", "candidates": cands, "model": "twin"}).status_code == 404
        assert client.get("/readyz").json() == {"ready": True, "store": "ok", "models": 2}
    with make_client(models_dir=models_dir, default_model="twin-b") as client:
        assert client.post("/score", json={"user_id": "u", "candidates": cands}).json()["model"] == "twin-b"


def test_reload_swaps_new_versions_and_rejects_broken_folders(
    make_client, models_dir: Path, other_dare_dir: Path, twin_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cands = [{"item_id": TEST_ITEM_RAW_IDS[5], "category_id": TEST_CATE_RAW_IDS[5]}]
    with make_client(models_dir=models_dir) as client:
        v1 = client.post("/score", json={"user_id": "u", "candidates": cands}).json()
        # 1. a new folder appears; nothing changed elsewhere
        shutil.copytree(twin_model_dir, models_dir / "twin-b")
        report = ReloadResponse.model_validate(client.post("/admin/reload").json())
        assert report.loaded == ["twin-b"] and report.unchanged == ["dare-a"] and not report.rejected
        # 2. dare-a is replaced by a broken copy of a new version: rejected, v1 keeps serving
        broken = models_dir.parent / "broken"
        shutil.copytree(other_dare_dir, broken)
        (broken / "score.onnx").write_bytes(b"not an onnx graph")
        shutil.rmtree(models_dir / "dare-a")
        broken.rename(models_dir / "dare-a")
        caplog.clear()
        report = ReloadResponse.model_validate(client.post("/admin/reload").json())
        assert list(report.rejected) == ["dare-a"] and "score.onnx" in report.rejected["dare-a"]
        assert "dare-a" in caplog.text and "keeps serving" in caplog.text
        still = client.post("/score", json={"user_id": "u", "candidates": cands}).json()
        assert still["version"] == v1["version"] and still["scores"] == v1["scores"]
        # 3. the good new version: swapped in
        shutil.rmtree(models_dir / "dare-a")
        shutil.copytree(other_dare_dir, models_dir / "dare-a")
        report = ReloadResponse.model_validate(client.post("/admin/reload").json())
        assert report.loaded == ["dare-a"] and report.unchanged == ["twin-b"]
        v2 = client.post("/score", json={"user_id": "u", "candidates": cands}).json()
        assert v2["version"] != v1["version"] and v2["scores"] != v1["scores"]
        # 4. a folder without a manifest is rejected, a removed folder is unloaded
        (models_dir / "junk").mkdir()
        shutil.rmtree(models_dir / "twin-b")
        report = ReloadResponse.model_validate(client.post("/admin/reload").json())
        assert "no manifest.json" in report.rejected["junk"] and report.removed == ["twin-b"]
        assert [m["name"] for m in client.get("/models").json()["models"]] == ["dare-a"]
        info = [line for line in client.get("/metrics").text.splitlines() if line.startswith("dare_model_info{")]
        assert len(info) == 1 and 'model="dare-a"' in info[0] and v2["version"] in info[0]
        # which code searches its long histories: the fused kernel (its AVX-512 or AVX2 code) or search.onnx
        code = {512: "avx512", 256: "avx2"}.get(kernel_isa(), "onnx")
        assert f'search="{code}"' in info[0]


def test_requests_in_flight_during_reloads_all_succeed(
    make_client, models_dir: Path, exported_model_dir: Path, other_dare_dir: Path
) -> None:
    """Reloads that swap versions back and forth (and meet broken folders) while requests run: zero failures."""
    cands = [{"item_id": TEST_ITEM_RAW_IDS[k], "category_id": TEST_CATE_RAW_IDS[k % 10]} for k in range(50)]
    with make_client(models_dir=models_dir) as client:
        client.post("/events", json={"user_id": "u", "events": [{**c, "timestamp": 1} for c in cands]})
        statuses: list[int] = []
        served: set[str] = set()
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                r = client.post("/score", json={"user_id": "u", "candidates": cands})
                statuses.append(r.status_code)
                served.add(r.json().get("version", "?"))

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        for round_ in range(6):
            staging = models_dir.parent / f"stage-{round_}"
            shutil.copytree(other_dare_dir if round_ % 2 == 0 else exported_model_dir, staging)
            if round_ % 3 == 2:
                (staging / "search.onnx").write_bytes(b"broken")
            old = models_dir.parent / f"old-{round_}"
            (models_dir / "dare-a").rename(old)
            staging.rename(models_dir / "dare-a")
            report = client.post("/admin/reload").json()
            assert (list(report["rejected"]) == ["dare-a"]) == (round_ % 3 == 2)
            shutil.rmtree(old)
        stop.set()
        for t in threads:
            t.join()
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert len(served) == 2  # both versions answered at some point


def test_degraded_mode_and_503_when_the_store_is_down(make_client, make_redis_server, models_dir: Path) -> None:
    server = make_redis_server()
    cands = [{"item_id": TEST_ITEM_RAW_IDS[1], "category_id": TEST_CATE_RAW_IDS[1]}]
    fast = {"redis_connect_timeout_s": 0.2, "redis_socket_timeout_s": 0.2, "models_dir": models_dir}
    with make_client(redis_url=server.url, **fast) as strict, \
         make_client(redis_url=server.url, degraded_on_store_error=True, **fast) as lenient:  # fmt: skip
        strict.post("/events", json={"user_id": "u", "events": [{**cands[0], "timestamp": 5}]})
        assert strict.post("/score", json={"user_id": "u", "candidates": cands}).json()["history_length"] == 1
        server.stop()
        r = strict.post("/score", json={"user_id": "u", "candidates": cands})
        assert r.status_code == 503 and r.json()["error"] == "store_unavailable"
        r = lenient.post("/score", json={"user_id": "u", "candidates": cands})
        assert r.status_code == 200
        body = r.json()
        assert body["degraded"] is True and body["history_length"] == 0 and body["cold_start"] is False
        assert "dare_degraded_responses_total 1.0" in lenient.get("/metrics").text
        server.start()  # empty again: the service recovers by itself
        body = strict.post("/score", json={"user_id": "u", "candidates": cands}).json()
        assert body["degraded"] is False and body["cold_start"] is True


def test_corrupt_user_gets_an_error_others_are_scored(make_client, redis_server, models_dir: Path) -> None:
    cands = [{"item_id": TEST_ITEM_RAW_IDS[1], "category_id": TEST_CATE_RAW_IDS[1]}]
    with make_client(models_dir=models_dir) as client:
        redis_server.client().set("dare:{mangled}:seq", b"DSEQ\x01\x10\x00\x00abc")
        r = client.post("/score", json={"user_id": "mangled", "candidates": cands})
        assert r.status_code == 500 and r.json()["error"] == "corrupt_sequence" and "mangled" in r.json()["detail"]
        assert client.post("/score", json={"user_id": "fine", "candidates": cands}).status_code == 200


def test_stage_metrics_by_model(make_client, models_dir: Path) -> None:
    cands = [{"item_id": TEST_ITEM_RAW_IDS[k], "category_id": TEST_CATE_RAW_IDS[0]} for k in range(7)]
    with make_client(models_dir=models_dir) as client:
        client.post("/events", json={"user_id": "u", "events": [{**c, "timestamp": 9} for c in cands]})
        client.post("/score", json={"user_id": "u", "candidates": cands})
        text = client.get("/metrics").text
    for stage in ("store_fetch", "id_mapping", "search", "scoring"):
        assert f'dare_stage_duration_seconds_count{{model="dare-a",stage="{stage}"}} 1.0' in text
    assert 'dare_history_length_bucket{le="10.0",model="dare-a"} 1.0' in text
    assert 'dare_history_length_bucket{le="1.0",model="dare-a"} 0.0' in text
    assert 'dare_candidates_per_request_bucket{le="5.0",model="dare-a"} 0.0' in text
    assert 'dare_candidates_per_request_bucket{le="10.0",model="dare-a"} 1.0' in text
    assert 'endpoint="/score",method="POST",model="dare-a",status="200"' in text


def test_polling_watcher_loads_new_folders(make_client, models_dir: Path, twin_model_dir: Path) -> None:
    import time

    with make_client(models_dir=models_dir, reload_interval_s=0.1) as client:
        assert [m["name"] for m in client.get("/models").json()["models"]] == ["dare-a"]
        shutil.copytree(twin_model_dir, models_dir / "twin-b")
        deadline = time.monotonic() + 20
        while len(client.get("/models").json()["models"]) < 2:
            assert time.monotonic() < deadline, "the watcher did not pick up the new folder"
            time.sleep(0.1)
        cands = [{"item_id": TEST_ITEM_RAW_IDS[0], "category_id": TEST_CATE_RAW_IDS[0]}]
        assert client.post("/score", json={"user_id": "u", "candidates": cands, "model": "twin-b"}).status_code == 200


def test_watcher_does_not_retry_an_unchanged_broken_folder(models_dir: Path, exported_model_dir: Path) -> None:
    from service.registry import InferenceOptions, ModelRegistry

    registry = ModelRegistry(models_dir, InferenceOptions())
    registry.reload()
    assert not registry.changed()
    broken = models_dir / "broken"
    shutil.copytree(exported_model_dir, broken)
    (broken / "score.onnx").write_bytes(b"half-copied")
    assert registry.changed()
    assert list(registry.reload().rejected) == ["broken"]
    assert not registry.changed()  # the same broken state is not retried on every poll
    shutil.copyfile(exported_model_dir / "score.onnx", broken / "score.onnx")  # the copy completes
    assert registry.changed()
    assert registry.reload().loaded == ["broken"]
    assert not registry.changed()


# 64-bit hashed item ids: the top of the vocabulary at and above 2**63 (uint64 item_raw, as `dare prepare` writes it).
BIG_ITEMS = (2**63, 2**63 + 5, 2**64 - 1)
U64_ITEM_RAW_IDS = TEST_ITEM_RAW_IDS[: -len(BIG_ITEMS)] + BIG_ITEMS


@pytest.fixture(scope="session")
def u64_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RANDOMLY INITIALISED DARE model whose item vocabulary ends in ids >= 2**63."""
    return export_random_model(tmp_path_factory.mktemp("random-dare-u64"), kind="dare", att_dim=8, repr_dim=16,
                               seed=3, item_raw_ids=U64_ITEM_RAW_IDS)  # fmt: skip


def test_ids_above_2_63_end_to_end(make_client, redis_url: str, tmp_path: Path, u64_model_dir: Path) -> None:
    """Events with ids >= 2**63 (JSON integers and decimal strings) are stored exactly, read back exactly, mapped to
    their own embedding rows (the scores equal PyTorch's), and returned exactly by history and explain."""
    models = tmp_path / "models"
    shutil.copytree(u64_model_dir, models / "u64")
    unknown_big = 2**63 + 7  # not in the vocabulary: the out-of-vocabulary row
    # An old value (format version 1, small ids) that the big ids are appended to: upgraded in place to version 2.
    redis_client = SequenceStore.from_url(redis_url)
    redis_client.client.set("dare:{hashed}:seq", encode_v1([1000, 1001], [10, 11], [1_511_600_000, 1_511_600_001]))
    events = [
        {"item_id": 2**64 - 1, "category_id": 12, "timestamp": 1_511_600_002},
        {"item_id": str(2**63 + 5), "category_id": "13", "timestamp": 1_511_600_003},
        {"item_id": 2**63, "category_id": 14, "timestamp": 1_511_600_004},
        {"item_id": str(unknown_big), "category_id": 15, "timestamp": 1_511_600_005},
    ]
    stored = [1000, 1001, 2**64 - 1, 2**63 + 5, 2**63, unknown_big]
    candidates = [{"item_id": i, "category_id": c} for i, c in ((2**64 - 1, 12), (2**63 + 5, 13), (1000, 10), (unknown_big, 15))]
    with make_client(models_dir=models) as client:
        r = client.post("/events", json={"user_id": "hashed", "events": events})
        assert r.status_code == 200 and r.json()["length"] == 6, r.text
        assert redis_client.client.get("dare:{hashed}:seq")[:5] == b"DSEQ\x02"
        h = client.get("/users/hashed/history")
        assert [e["item_id"] for e in h.json()["events"]] == stored
        assert '"item_id":18446744073709551615' in h.text  # digits, exact (not 1.8446744073709552e19)
        # as integers and as strings: the same answer
        r = client.post("/score", json={"user_id": "hashed", "candidates": candidates, "explain": True})
        as_strings = [{"item_id": str(c["item_id"]), "category_id": str(c["category_id"])} for c in candidates]
        r2 = client.post("/score", json={"user_id": "hashed", "candidates": as_strings, "explain": True})
    assert r.status_code == 200 and r2.status_code == 200, (r.text, r2.text)
    assert r.json()["scores"] == r2.json()["scores"] and r.json()["explain"] == r2.json()["explain"]
    history = make_events(stored, [10, 11, 12, 13, 14, 15], list(range(1_511_600_000, 1_511_600_006)))
    prob, _, _ = torch_reference(u64_model_dir.parent / "run", u64_model_dir, history, candidates)
    assert np.abs(np.array(r.json()["scores"]) - prob).max() <= 1e-5
    # the big ids map to their own rows: each scores unlike the out-of-vocabulary id in the same category context
    assert len(set(r.json()["scores"])) == 4
    retrieved = {b["item_id"] for behaviours in r.json()["explain"] for b in behaviours}
    assert retrieved <= set(stored) and 2**64 - 1 in retrieved
    redis_client.close()


def test_a_version_1_value_is_scored(make_client, redis_url: str, models_dir: Path, exported_model_dir: Path) -> None:
    """A value written by the previous release's encoder (format version 1) scores as the same events do."""
    rng = np.random.default_rng(5)
    history = random_history(rng, 300)
    candidates = random_candidates(rng, 20)
    store = SequenceStore.from_url(redis_url)
    store.client.set("dare:{veteran}:seq", encode_v1(*(history[f].tolist() for f in ("item_id", "category_id", "timestamp"))))
    store.close()
    with make_client(models_dir=models_dir) as client:
        r = client.post("/score", json={"user_id": "veteran", "candidates": candidates})
    assert r.status_code == 200, r.text
    assert r.json()["history_length"] == 300 and not r.json()["cold_start"]
    prob, _, _ = torch_reference(exported_model_dir.parent / "run", exported_model_dir, history, candidates)
    assert np.abs(np.array(r.json()["scores"]) - prob).max() <= 1e-5


def test_id_map_covers_the_whole_uint64_range() -> None:
    """Both lookups (the dense table for small ids, the binary search otherwise) on uint64 and int64 ids; negative
    raw ids of an int64 vocabulary are left out (no request can hold one)."""
    from service.registry import IdMap

    ids = np.array([0, 3, 10, 11, 2**63, 2**64 - 1], dtype=np.uint64)
    small = IdMap.build(np.array([-4, 3, 10], dtype=np.int64), np.array([2, 3, 4]))
    assert small.dense is not None and small.raw.tolist() == [3, 10] and small.raw.dtype == np.uint64
    assert small(ids).tolist() == [1, 3, 4, 1, 1, 1]
    assert small(np.array([3, 10, 0], dtype=np.int64)).tolist() == small(np.array([3, 10, 0], dtype=np.uint32)).tolist() == [3, 4, 1]
    big = IdMap.build(np.array([3, 2**63, 2**64 - 1], dtype=np.uint64), np.array([2, 3, 4]))
    assert big.dense is None
    assert big(ids).tolist() == [1, 2, 1, 1, 3, 4]
    assert big(np.array([3, 4], dtype=np.int64)).tolist() == [2, 1]

"""The traffic split between models (DARE_TRAFFIC_SPLIT, traffic.json) and shadow scoring (DARE_SHADOW_MODEL),
against the real app on a real Redis: proportions within a binomial tolerance, each user's arm stable across
requests and reloads, bad splits rejected with the previous one serving, shadow scores metered and never returned."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dare_common import DareError
from service.api.concurrency import BlockingPool
from service.core.config import load_settings
from service.metrics import ServiceMetrics
from service.traffic import (
    SPLIT_BUCKETS,
    TRAFFIC_FILE,
    ShadowScorer,
    TrafficConfigError,
    TrafficSplit,
    check_traffic,
    read_traffic_file,
    user_bucket,
)
from tests.conftest import TEST_CATE_RAW_IDS, TEST_ITEM_RAW_IDS

CANDS = [{"item_id": i, "category_id": TEST_CATE_RAW_IDS[i % 10]} for i in TEST_ITEM_RAW_IDS[:8]]


def within_binomial(count: int, n: int, p: float, z: float = 4.5) -> bool:
    """|count - n p| within z standard deviations of Binomial(n, p) (z = 4.5: a false alarm ~1 in 150,000)."""
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with other random weights than the session's (a shadow whose scores differ)."""
    from tests.conftest import export_random_model

    return export_random_model(tmp_path_factory.mktemp("random-dare-seed1"), att_dim=8, repr_dim=16, seed=1)


@pytest.fixture
def two_models(tmp_path: Path, exported_model_dir: Path, second_model: Path) -> Path:
    folder = tmp_path / "models"
    shutil.copytree(exported_model_dir, folder / "dare-a")
    shutil.copytree(second_model, folder / "dare-b")
    return folder


# --- the split itself ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["dare-att16=90,dare-att64=10", "a=50,b=30,c=20", "a=1,b=1", "a=2.5,b=0,c=7.5"])
def test_split_proportions_are_within_a_binomial_tolerance(text: str) -> None:
    split = TrafficSplit.parse(text)
    n = 40_000
    counts = Counter(split.choose(f"user-{i}") for i in range(n))
    total = sum(split.weights)
    for name, weight in zip(split.names, split.weights):
        p = weight / total
        if p == 0:
            assert counts[name] == 0, f"{name} has weight 0 but got {counts[name]} users"
        else:
            assert within_binomial(counts[name], n, p), f"{text}: {name} got {counts[name]} of {n}, expected ~{n * p:.0f}"


def test_a_users_arm_is_a_pure_function_of_its_id_and_moves_only_where_the_weights_move() -> None:
    a = TrafficSplit.parse("x=90,y=10")
    users = [f"u{i}" for i in range(5_000)] + ["", "ü-ñ", "\ud800", "a" * 128]
    assert [a.choose(u) for u in users] == [TrafficSplit.parse("x=9,y=1").choose(u) for u in users]  # relative weights
    assert all(0 <= user_bucket(u) < SPLIT_BUCKETS for u in users)
    # 90/10 -> 80/20: only users of x move (to y), about 10% of all, and nobody moves from y to x
    b = TrafficSplit.parse("x=80,y=20")
    moved = [u for u in users if a.choose(u) != b.choose(u)]
    assert all(a.choose(u) == "x" and b.choose(u) == "y" for u in moved)
    assert within_binomial(len(moved), len(users), 0.10)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a", "'a' is not model=weight"),
        ("a=ten", "the weight of 'a' is not a number"),
        ("a=1,a=2", "model 'a' is named twice"),
        ("a=0,b=0", "the weights must sum to more than 0"),
        ("a=-1,b=2", "the weight of 'a' must be a finite number >= 0"),
        ("a=nan", "the weight of 'a' must be a finite number >= 0"),
    ],
)
def test_a_malformed_split_is_a_one_line_settings_error(text: str, message: str) -> None:
    with pytest.raises(DareError) as err:
        load_settings(traffic_split=text)
    assert "DARE_TRAFFIC_SPLIT" in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_traffic_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / TRAFFIC_FILE
    path.write_text('{"split": {"a": 3, "b": 1}, "shadow": "b"}')
    routing = read_traffic_file(path)
    assert routing.split is not None and routing.split.as_dict() == {"a": 3.0, "b": 1.0} and routing.shadow == "b"
    for bad, message in (("{", "not a readable JSON file"), ('{"splt": {}}', 'the keys "split" and/or "shadow"'),
                         ('{"split": "a=1"}', '"split" must be an object'), ('{"split": {"a": true}}', "finite number"),
                         ('{"shadow": 3}', '"shadow" must be a model name')):  # fmt: skip
        path.write_text(bad)
        with pytest.raises(TrafficConfigError, match=message):
            read_traffic_file(path)


def test_serve_preflight_names_a_split_model_without_a_folder(models_dir: Path) -> None:
    assert check_traffic(models_dir, "dare-a=100", None).split is not None
    with pytest.raises(TrafficConfigError, match=r"DARE_TRAFFIC_SPLIT.*no model folder 'dare-att64'.*has: dare-a"):
        check_traffic(models_dir, "dare-a=90,dare-att64=10", None)
    with pytest.raises(TrafficConfigError, match="no model folder 'ghost'"):
        check_traffic(models_dir, None, "ghost")


# --- through the service ------------------------------------------------------------------------------------------


def test_split_routes_requests_naming_no_model_stably_across_requests_and_reloads(make_client, two_models: Path) -> None:
    split = TrafficSplit.parse("dare-a=70,dare-b=30")
    users = [f"user-{i}" for i in range(240)]
    with make_client(models_dir=two_models, traffic_split=str(split)) as client:
        assert client.get("/models").json()["traffic_split"] == {"dare-a": 70.0, "dare-b": 30.0}
        first = {}
        for user in users:
            answer = client.post("/score", json={"user_id": user, "candidates": CANDS})
            assert answer.status_code == 200, answer.text
            first[user] = answer.json()["model"]
        assert first == {u: split.choose(u) for u in users}
        assert within_binomial(sum(m == "dare-a" for m in first.values()), len(users), 0.7)
        # a request naming a model is not routed
        assert client.post("/score", json={"user_id": users[0], "candidates": CANDS, "model": "dare-b"}).json()["model"] == "dare-b"
        # the same users again, and after a reload that keeps the split: the same arm each
        assert client.post("/admin/reload").json()["traffic_split"] == {"dare-a": 70.0, "dare-b": 30.0}
        for user in users[:60]:
            assert client.post("/score", json={"user_id": user, "candidates": CANDS}).json()["model"] == first[user]
        text = client.get("/metrics").text
        by_split = {dict(k)["model"]: v for k, v in samples(text, "dare_traffic_split_requests_total").items()}
        want = Counter(first.values()) + Counter(first[u] for u in users[:60])
        assert by_split == {m: float(c) for m, c in want.items()}  # the named request is not a split's
        per_model = samples(text, "dare_http_request_duration_seconds_count")
        assert per_model[(("endpoint", "/score"), ("method", "POST"), ("model", "dare-b"), ("status", "200"))] == want["dare-b"] + 1


def test_traffic_file_changes_the_split_on_reload_and_a_bad_one_keeps_the_old(make_client, two_models: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    users = [f"u{i}" for i in range(40)]
    with make_client(models_dir=two_models, traffic_split="dare-a=100") as client:
        assert {client.post("/score", json={"user_id": u, "candidates": CANDS}).json()["model"] for u in users} == {"dare-a"}
        (two_models / TRAFFIC_FILE).write_text(json.dumps({"split": {"dare-a": 0, "dare-b": 1}}))
        report = client.post("/admin/reload").json()
        assert report["traffic_split"] == {"dare-a": 0.0, "dare-b": 1.0} and report["traffic_error"] is None
        assert {client.post("/score", json={"user_id": u, "candidates": CANDS}).json()["model"] for u in users} == {"dare-b"}
        # a file naming a model that is not loaded: rejected, logged, the previous split keeps serving
        (two_models / TRAFFIC_FILE).write_text(json.dumps({"split": {"dare-a": 1, "dare-c": 1}}))
        with caplog.at_level(logging.ERROR, logger="service.registry"):
            report = client.post("/admin/reload").json()
        assert "'dare-c' not loaded" in report["traffic_error"] and report["traffic_split"] == {"dare-a": 0.0, "dare-b": 1.0}
        assert any("traffic split rejected" in r.getMessage() and "dare-c" in r.getMessage() for r in caplog.records)
        assert {client.post("/score", json={"user_id": u, "candidates": CANDS}).json()["model"] for u in users} == {"dare-b"}
        # removing a split's model drops the split (the default model answers) and says so
        (two_models / TRAFFIC_FILE).unlink()  # back to DARE_TRAFFIC_SPLIT=dare-a=100
        shutil.rmtree(two_models / "dare-a")
        report = client.post("/admin/reload").json()
        assert report["removed"] == ["dare-a"] and "'dare-a' not loaded" in report["traffic_error"]
        assert report["traffic_split"] is None
        assert client.post("/score", json={"user_id": users[0], "candidates": CANDS}).json()["model"] == "dare-b"


def test_an_unknown_split_model_at_startup_is_logged_and_the_default_serves(make_client, two_models: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="service.registry"):
        with make_client(models_dir=two_models, traffic_split="dare-a=50,nope=50") as client:
            assert client.get("/models").json()["traffic_split"] is None
            assert client.post("/score", json={"user_id": "u", "candidates": CANDS}).json()["model"] == "dare-a"
    assert any("'nope' not loaded" in r.getMessage() for r in caplog.records)


def test_shadow_scores_are_metered_after_the_answer_and_never_returned(make_client, two_models: Path) -> None:
    body = {"user_id": "u-shadow", "candidates": CANDS, "model": "dare-a"}
    with make_client(models_dir=two_models) as client:
        client.post("/events", json={"user_id": "u-shadow", "events": CANDS[::-1] * 3})
        plain = client.post("/score", json=body).json()
        b_scores = client.post("/score", json={**body, "model": "dare-b"}).json()["scores"]
    with make_client(models_dir=two_models, shadow_model="dare-b") as client:
        assert client.get("/models").json()["shadow_model"] == "dare-b"
        shadowed = client.post("/score", json=body).json()
        assert shadowed["model"] == "dare-a" and shadowed["scores"] == plain["scores"] and set(shadowed) == set(plain)
        deadline = time.monotonic() + 10
        while not samples(text := client.get("/metrics").text, "dare_shadow_score_diff_count") and time.monotonic() < deadline:
            time.sleep(0.02)
        diff_sum = samples(text, "dare_shadow_score_diff_sum")[(("model", "dare-a"), ("shadow", "dare-b"))]
        expected = float(np.abs(np.array(plain["scores"], np.float64) - np.array(b_scores, np.float64)).mean())
        assert expected > 0 and diff_sum == pytest.approx(expected, rel=1e-5)
        assert samples(text, "dare_shadow_requests_total")[(("outcome", "scored"), ("shadow", "dare-b"))] == 1.0
        # the shadow model itself is not shadowed
        client.post("/score", json={**body, "model": "dare-b"})
        time.sleep(0.2)
        assert samples(client.get("/metrics").text, "dare_shadow_requests_total")[(("outcome", "scored"), ("shadow", "dare-b"))] == 1.0


def test_shadow_waits_for_an_idle_worker(make_client, two_models: Path) -> None:
    """With half of the workers busy the shadow call is skipped (and counted), so real requests keep the workers."""
    with make_client(models_dir=two_models) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        items = np.array([c["item_id"] for c in CANDS], np.int64)
        cates = np.array([c["category_id"] for c in CANDS], np.int64)
        result = services.engine.score("u", items, cates, model=services.registry.current.get("dare-a"))
        shadow = services.registry.current.get("dare-b")
    metrics = ServiceMetrics()
    pool = BlockingPool(2, 5.0)
    scorer = ShadowScorer(pool, metrics)

    def outcomes() -> dict[str, float]:
        found = samples(metrics.exposition().decode(), "dare_shadow_requests_total")
        return {dict(k)["outcome"]: v for k, v in found.items()}

    async def scenario() -> None:  # offer() runs on the event loop, after the primary's answer
        release = threading.Event()
        try:
            held = pool.submit(release.wait)  # one of the two workers busy: none of the idle half is left
            assert not scorer.offer(shadow, result, items, cates)
            assert pool.busy == 1  # nothing was submitted
            release.set()
            await held
            assert scorer.offer(shadow, result, items, cates)
            deadline = time.monotonic() + 5
            while outcomes().get("scored", 0) < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            release.set()
            pool.shutdown()

    asyncio.run(scenario())
    assert outcomes() == {"skipped": 1.0, "scored": 1.0}


def test_the_polling_watcher_reloads_when_traffic_json_changes(make_client, two_models: Path) -> None:
    with make_client(models_dir=two_models, traffic_split="dare-a=1", reload_interval_s=0.1) as client:
        assert client.get("/models").json()["traffic_split"] == {"dare-a": 1.0}
        (two_models / TRAFFIC_FILE).write_text(json.dumps({"split": {"dare-b": 1}, "shadow": "dare-a"}))
        deadline = time.monotonic() + 10
        while client.get("/models").json()["traffic_split"] != {"dare-b": 1.0} and time.monotonic() < deadline:
            time.sleep(0.05)
        models = client.get("/models").json()
        assert models["traffic_split"] == {"dare-b": 1.0} and models["shadow_model"] == "dare-a"
        assert client.post("/score", json={"user_id": "anyone", "candidates": CANDS}).json()["model"] == "dare-b"

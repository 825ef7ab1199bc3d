"""The Grafana dashboard parses, uses the provisioned datasource, and queries only metrics (and labels) that the
service really exports: compared against a live /metrics scraped after real traffic (scores through a traffic split
with a shadow model, events, a store outage, a corrupt sequence) on a real Redis."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.core.config import Settings
from service.main import create_app
from tests.conftest import TEST_CATE_RAW_IDS, TEST_ITEM_RAW_IDS
from tests.shipping.conftest import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "dare.json"
PROMQL_WORDS = {
    "sum", "by", "rate", "histogram_quantile", "clamp_min", "le", "without", "avg", "max", "min", "count",
    "irate", "increase", "on", "ignoring", "group_left", "group_right",
}  # fmt: skip


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def expressions() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def test_dashboard_parses_and_uses_the_provisioned_datasource() -> None:
    board = dashboard()
    provisioned = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    assert board["uid"] and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels():
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    refs = {v["name"] for v in board["templating"]["list"]}
    for expr in expressions():
        for used in re.findall(r"\$([a-z_]+)", expr):
            assert used in refs or used.startswith("__"), f"{expr} uses ${used}, which is not a dashboard variable"


def test_dashboard_covers_what_the_issue_asks_for() -> None:
    text = " ".join(p["title"].lower() for p in panels())
    exprs = " ".join(expressions())
    assert "request rate" in text
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, model)" in exprs
        assert f"histogram_quantile({quantile}, sum by (le, stage)" in exprs
    assert "error" in text and 'status=~"5..' in exprs
    assert "dare_history_length_bucket" in exprs
    # issue 17: in-flight requests, the queue wait, process CPU / memory / GC, the per-model traffic split, shadows
    assert "dare_http_requests_in_flight" in exprs
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, operation) (rate(dare_queue_wait_seconds_bucket" in exprs
    assert "rate(process_cpu_seconds_total" in exprs and "process_resident_memory_bytes" in exprs
    assert "python_gc_collections_total" in exprs
    assert "sum by (model) (rate(dare_traffic_split_requests_total" in exprs and "dare_shadow_score_diff_bucket" in exprs


def metric_references(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names the query needs on it) for every metric in a PromQL expression."""
    found = []
    for match in re.finditer(r"\b((?:dare|process|python_gc)_[a-z0-9_]+)\s*(\{[^}]*\})?", expr):
        labels = set(re.findall(r"([a-z_]+)\s*=~?", match.group(2) or ""))
        found.append((match.group(1), labels))
    grouping = set()
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        grouping |= {g.strip() for g in group.split(",") if g.strip()}
    return [(name, labels | grouping) for name, labels in found]


@pytest.fixture
def live_metrics(exported_model_dir: Path, make_redis_server, tmp_path: Path) -> dict[str, set[str]]:
    """Sample name -> label names, from GET /metrics of a real app after scores, events, an outage, a corrupt user."""
    models = tmp_path / "models"
    shutil.copytree(exported_model_dir, models / "arm-a")
    shutil.copytree(exported_model_dir, models / "arm-b")
    server = make_redis_server()
    settings = Settings(models_dir=models, redis_url=server.url, redis_socket_timeout_s=0.3, redis_connect_timeout_s=0.3,
                        traffic_split="arm-a=50,arm-b=50", shadow_model="arm-b")  # fmt: skip
    candidates = [{"item_id": i, "category_id": TEST_CATE_RAW_IDS[i % 10]} for i in TEST_ITEM_RAW_IDS[:20]]
    with TestClient(create_app(settings)) as client:
        events = [{"item_id": i, "category_id": TEST_CATE_RAW_IDS[i % 10]} for i in TEST_ITEM_RAW_IDS[20:50]]
        assert client.post("/events", json={"user_id": "u1", "events": events}).status_code == 200
        answer = client.post("/score", json={"user_id": "u1", "candidates": candidates})
        assert answer.status_code == 200 and len(answer.json()["scores"]) == 20
        named = client.post("/score", json={"user_id": "u1", "candidates": candidates, "model": "arm-a"})
        assert named.status_code == 200  # arm-a answers; arm-b shadows it after the answer
        deadline = time.monotonic() + 10
        while "dare_shadow_score_diff_bucket" not in client.get("/metrics").text and time.monotonic() < deadline:
            time.sleep(0.05)
        server.client().set("dare:{broken}:seq", b"not a sequence")
        assert client.post("/score", json={"user_id": "broken", "candidates": candidates}).status_code >= 400
        server.stop()
        assert client.post("/score", json={"user_id": "u1", "candidates": candidates}).status_code == 503
        text = client.get("/metrics").text
    samples: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name] |= set(sample.labels)
    return samples


def test_every_dashboard_query_uses_exported_metrics_and_labels(live_metrics: dict[str, set[str]]) -> None:
    checked = 0
    for expr in expressions():
        for name, labels in metric_references(expr):
            assert name in live_metrics, f"dashboard queries {name}, which /metrics does not export: {expr}"
            missing = labels - live_metrics[name] - {"le"} if not name.endswith("_bucket") else labels - live_metrics[name]
            assert not missing, f"{name} has no label {sorted(missing)} in /metrics (it has {sorted(live_metrics[name])})"
            checked += 1
    assert checked >= 30
    # and the other way round: each family the service exports is on the dashboard somewhere
    exported = {re.sub(r"_(bucket|count|sum|total|created)$", "", n) for n in live_metrics if n.startswith("dare_")}
    queried = " ".join(expressions())
    assert not [f for f in exported if f not in queried], f"exported but not on the dashboard: {sorted(exported)}"


def test_metric_reference_parser() -> None:
    refs = metric_references('sum by (le, model) (rate(dare_x_bucket{endpoint="/score", model=~"$model"}[1m]))')
    assert refs == [("dare_x_bucket", {"endpoint", "model", "le"})]

"""POST /score's fast path (`ScoreFastPath`, pure ASGI) answers exactly as the FastAPI route does, handles the
well-formed requests itself and hands everything else to FastAPI; a real Redis and a real exported model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.middleware import Middleware

from service.core.config import Settings
from service.main import create_app
from service.store import SequenceStore, make_events
from tests.conftest import TEST_CATE_RAW_IDS, TEST_ITEM_RAW_IDS

ITEM, CATE = TEST_ITEM_RAW_IDS[0], TEST_CATE_RAW_IDS[0]
CANDIDATES = [{"item_id": i, "category_id": c} for i, c in zip(TEST_ITEM_RAW_IDS[:5], TEST_CATE_RAW_IDS[:5])]


class _Reached:
    """Innermost middleware: records the path of every request that gets past the fast path to FastAPI's routing."""

    def __init__(self, app: Any, reached: list[str]) -> None:
        self.app, self.reached = app, reached

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.reached.append(scope["path"])
        await self.app(scope, receive, send)


@contextmanager
def counting_app(settings: Settings) -> Iterator[tuple[TestClient, list[str]]]:
    """A client and the list of paths whose requests reached FastAPI's routing."""
    app = create_app(settings)
    reached: list[str] = []
    app.user_middleware.append(Middleware(_Reached, reached=reached))  # last in the list = innermost
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, reached


def _comparable(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: v for k, v in body.items() if k != "timings_ms"}
    return body


CASES: list[tuple[str, dict[str, Any]]] = [
    ("stored user", {"json": {"user_id": "alice", "candidates": CANDIDATES}}),
    ("explain", {"json": {"user_id": "alice", "candidates": CANDIDATES, "explain": True}}),
    ("cold start", {"json": {"user_id": "nobody", "candidates": CANDIDATES}}),
    ("unknown ids", {"json": {"user_id": "alice", "candidates": [{"item_id": 999_999, "category_id": 77}]}}),
    ("named model", {"json": {"user_id": "alice", "candidates": CANDIDATES, "model": "dare-a"}}),
    ("unknown model", {"json": {"user_id": "alice", "candidates": CANDIDATES, "model": "nope"}}),
    ("too many candidates", {"json": {"user_id": "alice", "candidates": CANDIDATES * 3}}),
    ("user id too long", {"json": {"user_id": "u" * 40, "candidates": CANDIDATES}}),
    ("whole floats", {"json": {"user_id": "alice", "candidates": [{"item_id": float(ITEM), "category_id": CATE}]}}),
    ("fraction", {"json": {"user_id": "alice", "candidates": [{"item_id": 1.5, "category_id": CATE}]}}),
    ("extra key", {"json": {"user_id": "alice", "candidates": [{"item_id": ITEM, "category_id": CATE, "x": 1}]}}),
    ("empty candidates", {"json": {"user_id": "alice", "candidates": []}}),
    ("missing user", {"json": {"candidates": CANDIDATES}}),
    ("not JSON", {"content": b"{nope", "headers": {"content-type": "application/json"}}),
    ("NaN literal", {"content": b'{"user_id": "a", "candidates": [{"item_id": NaN, "category_id": 1}]}',
                     "headers": {"content-type": "application/json"}}),  # fmt: skip
    ("text/plain", {"content": b'{"user_id": "alice", "candidates": []}', "headers": {"content-type": "text/plain"}}),
    ("no content type", {"content": b'{"user_id": "alice", "candidates": [{"item_id": 1, "category_id": 2}]}'}),
    ("JSON array", {"json": [1, 2, 3]}),
]


@pytest.mark.parametrize("name,request_kwargs", CASES, ids=[c[0] for c in CASES])
def test_fast_path_answers_as_fastapi_does(
    name: str, request_kwargs: dict[str, Any], models_dir: Path, redis_url: str, redis_server, tmp_path: Path
) -> None:
    SequenceStore.from_url(redis_url).replace(
        "alice", make_events([ITEM, 999_999, *TEST_ITEM_RAW_IDS[:3]], [CATE, 77, *TEST_CATE_RAW_IDS[:3]], np.arange(5) + 1_511_600_000)
    )
    answers = {}
    for fast in (True, False):
        settings = Settings(redis_url=redis_url, models_dir=models_dir, data_dir=tmp_path / "var", score_fast_path=fast,
                            max_candidates=10, max_user_id_length=32)  # fmt: skip
        with counting_app(settings) as (client, reached):
            r = client.post("/score", **request_kwargs)
            client.get("/healthz")  # not /score: never the fast path's
            answers[fast] = (r.status_code, _comparable(r.json()), r.headers["content-type"])
            if fast:
                # Well-formed JSON requests never reach FastAPI; the rest are FastAPI's to answer.
                well_formed = name not in {"fraction", "extra key", "empty candidates", "missing user",
                                           "not JSON", "NaN literal", "text/plain", "no content type", "JSON array"}  # fmt: skip
                assert reached == (["/healthz"] if well_formed else ["/score", "/healthz"])
    assert answers[True] == answers[False]
    assert answers[True][2] == "application/json"


def test_fast_path_checks_the_bearer_token(models_dir: Path, redis_url: str, tmp_path: Path) -> None:
    settings = Settings(redis_url=redis_url, models_dir=models_dir, data_dir=tmp_path / "var", api_token="s3cret")
    body = {"user_id": "alice", "candidates": CANDIDATES}
    with counting_app(settings) as (client, reached):
        assert client.post("/score", json=body).status_code == 401
        assert client.post("/score", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert reached == ["/score", "/score"]  # refused by FastAPI's dependency, with its WWW-Authenticate header
        ok = client.post("/score", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and len(ok.json()["scores"]) == len(CANDIDATES)
        assert reached == ["/score", "/score"]  # the good one was answered by the fast path


def test_fast_path_store_outage_is_503_and_counted(
    make_redis_server: Callable[..., Any], models_dir: Path, tmp_path: Path
) -> None:
    server = make_redis_server()
    settings = Settings(redis_url=server.url, models_dir=models_dir, data_dir=tmp_path / "var")
    with counting_app(settings) as (client, reached):
        assert client.post("/score", json={"user_id": "u", "candidates": CANDIDATES}).status_code == 200
        server.stop()
        down = client.post("/score", json={"user_id": "u", "candidates": CANDIDATES})
        assert down.status_code == 503 and down.json()["error"] == "store_unavailable"
        assert reached == []
        metrics = client.get("/metrics").text
        assert 'dare_http_request_duration_seconds_count{endpoint="/score",method="POST",model="dare-a",status="503"} 1.0' in metrics
        assert 'dare_http_request_duration_seconds_count{endpoint="/score",method="POST",model="dare-a",status="200"} 1.0' in metrics


def test_fast_path_body_limit_still_applies(models_dir: Path, redis_url: str, tmp_path: Path) -> None:
    settings = Settings(redis_url=redis_url, models_dir=models_dir, data_dir=tmp_path / "var", max_body_bytes=2048)
    with counting_app(settings) as (client, _):
        r = client.post("/score", json={"user_id": "u", "candidates": CANDIDATES * 40})
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"


def test_fast_path_unexpected_error_is_a_logged_json_500_and_counted(
    models_dir: Path, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from service.engine import ScoringEngine

    def broken(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    monkeypatch.setattr(ScoringEngine, "score", broken)
    settings = Settings(redis_url=redis_url, models_dir=models_dir, data_dir=tmp_path / "var")
    with counting_app(settings) as (client, reached):
        r = client.post("/score", json={"user_id": "u", "candidates": CANDIDATES})
        assert r.status_code == 500 and r.json() == {"error": "internal_error", "detail": "internal error (see the service log)"}
        assert reached == []  # answered by the fast path, not FastAPI's error handler
        assert "unhandled error on POST /score" in caplog.text and "boom" in caplog.text
        metrics = client.get("/metrics").text
        assert 'dare_http_request_duration_seconds_count{endpoint="/score",method="POST",model="dare-a",status="500"} 1.0' in metrics


def test_fast_path_takes_only_declared_lengths_within_the_limit(models_dir: Path, redis_url: str, tmp_path: Path) -> None:
    """A chunked upload (no Content-Length) is FastAPI's: its body limit counts the bytes as they arrive."""
    settings = Settings(redis_url=redis_url, models_dir=models_dir, data_dir=tmp_path / "var", max_body_bytes=2048)
    body = b'{"user_id": "u", "candidates": %s}' % str(CANDIDATES).replace("'", '"').encode()
    with counting_app(settings) as (client, reached):
        ok = client.post("/score", content=iter([body]), headers={"content-type": "application/json"})
        assert ok.status_code == 200 and reached == ["/score"]
        big = b'{"user_id": "u", "candidates": %s}' % str(CANDIDATES * 40).replace("'", '"').encode()
        r = client.post("/score", content=iter([big[:1000], big[1000:]]), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"

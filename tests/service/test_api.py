"""The HTTP API without models: events, history, health, limits, every 4xx, auth, store outages, metrics."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from service.schemas import ErrorBody, EventsResponse, HistoryResponse

GOOD_EVENT = {"item_id": 1, "category_id": 2, "timestamp": 1_511_600_000}
GOOD_SCORE = {"user_id": "u", "candidates": [{"item_id": 1, "category_id": 2}]}


def error_fields(response) -> list[str]:
    body = ErrorBody.model_validate(response.json())
    return [f.field for f in body.fields or []]


def test_events_then_history(make_client) -> None:
    with make_client() as client:
        events = [{"item_id": i, "category_id": i % 3, "timestamp": 1_511_600_000 + i} for i in range(5)]
        r = client.post("/events", json={"user_id": "alice", "events": events})
        assert r.status_code == 200
        rid = r.headers["X-Request-ID"]
        assert EventsResponse.model_validate(r.json()) == EventsResponse(request_id=rid, user_id="alice", appended=5, length=5)
        r = client.post("/events", json={"user_id": "alice", "events": [{"item_id": 99, "category_id": 9}]})
        assert r.json()["length"] == 6
        h = HistoryResponse.model_validate(client.get("/users/alice/history", params={"limit": 3}).json())
        assert h.exists and h.length == 6
        assert [e.item_id for e in h.events] == [3, 4, 99]
        assert h.events[-1].timestamp > 1_700_000_000  # defaulted to the time of receipt
        empty = client.get("/users/nobody/history", headers={"X-Request-ID": "h-1"}).json()
        assert empty == {"request_id": "h-1", "user_id": "nobody", "exists": False, "length": 0, "events": []}


def test_unicode_user_id_round_trips(make_client) -> None:
    from urllib.parse import quote

    with make_client() as client:
        user = "ユーザー 🚀 é"
        assert client.post("/events", json={"user_id": user, "events": [GOOD_EVENT]}).status_code == 200
        h = client.get(f"/users/{quote(user, safe='')}/history")
        assert h.status_code == 200 and h.json()["user_id"] == user and h.json()["length"] == 1
        assert not client.get("/users/ユーザー/history").json()["exists"]


def test_idempotency_key_makes_retries_safe(make_client) -> None:
    with make_client() as client:
        body = {"user_id": "retrier", "events": [GOOD_EVENT, GOOD_EVENT]}
        first = client.post("/events", json=body, headers={"Idempotency-Key": "7f3c-01", "X-Request-ID": "r1"})
        assert first.json() == {"request_id": "r1", "user_id": "retrier", "appended": 2, "length": 2, "replayed": False}
        again = client.post("/events", json=body, headers={"Idempotency-Key": "7f3c-01", "X-Request-ID": "r2"})
        assert again.status_code == 200
        assert again.json() == {"request_id": "r2", "user_id": "retrier", "appended": 0, "length": 2, "replayed": True}
        other = client.post("/events", json=body, headers={"Idempotency-Key": "7f3c-02"})
        assert other.json()["length"] == 4 and not other.json()["replayed"]
        assert client.post("/events", json=body).json()["length"] == 6  # no key: always appended
        assert client.get("/users/retrier/history").json()["length"] == 6
        assert "dare_events_replayed_total 1.0" in client.get("/metrics").text
        for bad in ("has space", "x" * 129, "ünï".encode()):  # bytes: httpx sends non-ASCII only as bytes
            r = client.post("/events", json=body, headers={"Idempotency-Key": bad})
            assert r.status_code == 422 and error_fields(r) == ["Idempotency-Key"], (bad, r.text)


def test_user_id_with_slashes_round_trips(make_client) -> None:
    from urllib.parse import quote

    with make_client() as client:
        for user in ("a/b", "/lead", "trail/", "x//y", "new\nline", "a/history"):
            assert client.post("/events", json={"user_id": user, "events": [GOOD_EVENT] * 2}).status_code == 200
            h = client.get(f"/users/{quote(user, safe='')}/history")
            assert h.status_code == 200 and h.json()["user_id"] == user and h.json()["length"] == 2, (user, h.text)
        assert client.get("/users/a/history").json()["exists"] is False  # "a", not a prefix of "a/b"
        assert client.get("/users/a/b/history").json()["user_id"] == "a/b"  # an unencoded slash reads the same key


def test_lifelong_trim_through_the_api(make_client) -> None:
    with make_client(lifelong_max_events=4) as client:
        for i in range(3):
            client.post("/events", json={"user_id": "u", "events": [{**GOOD_EVENT, "item_id": 10 * i + k} for k in range(3)]})
        h = client.get("/users/u/history", params={"limit": 100}).json()
        assert h["length"] == 4 and [e["item_id"] for e in h["events"]] == [12, 20, 21, 22]


def test_health_readiness_openapi(make_client) -> None:
    with make_client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"ready": False, "store": "ok", "models": 0}
        spec = client.get("/openapi.json").json()
        for path in ("/score", "/events", "/users/{user_id}/history", "/models", "/admin/reload", "/metrics",
                     "/healthz", "/readyz"):  # fmt: skip
            assert path in spec["paths"]
        assert "ErrorBody" in spec["components"]["schemas"]
        assert client.get("/docs").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/score", {"candidates": [{"item_id": 1, "category_id": 2}]}, "user_id"),
        ("/score", {"user_id": "u"}, "candidates"),
        ("/score", {"user_id": "u", "candidates": []}, "candidates"),
        ("/score", {"user_id": 7, "candidates": [{"item_id": 1, "category_id": 2}]}, "user_id"),
        ("/score", {"user_id": "", "candidates": [{"item_id": 1, "category_id": 2}]}, "user_id"),
        ("/score", {"user_id": "u", "candidates": [{"item_id": "1.0", "category_id": 2}]}, "candidates.0.item_id"),
        ("/score", {"user_id": "u", "candidates": [{"item_id": " 1", "category_id": 2}]}, "candidates.0.item_id"),
        ("/score", {"user_id": "u", "candidates": [{"item_id": "18446744073709551616", "category_id": 2}]},
         "candidates.0.item_id"),
        ("/score", {"user_id": "u", "candidates": [{"item_id": 1.5, "category_id": 2}]}, "candidates.0.item_id"),
        ("/score", {"user_id": "u", "candidates": [{"item_id": [1], "category_id": 2}]}, "candidates.0.item_id"),
        ("/score", {"user_id": "u", "candidates": [{"item_id": True, "category_id": 2}]}, "candidates.0.item_id"),
        ("/score", {"user_id": "u", "candidates": [{"item_id": -1, "category_id": 2}]}, "candidates.0.item_id"),
        ("/score", {"user_id": "u", "candidates": [{"item_id": 2**64, "category_id": 2}]}, "candidates.0.item_id"),
        ("/score", {"user_id": "u", "candidates": [{"item_id": 10**30, "category_id": 2}]}, "candidates.0.item_id"),
        ("/score", {"user_id": "u", "candidates": [{"item_id": 1, "category_id": 2**32}]}, "candidates.0.category_id"),
        ("/score", {"user_id": "u", "candidates": [{"item_id": 1}]}, "candidates.0.category_id"),
        ("/score", {"user_id": "u", "candidates": [{"item_id": 1, "category_id": 2, "x": 1}]}, "candidates.0.x"),
        ("/score", {**GOOD_SCORE, "explain": "yes"}, "explain"),
        ("/score", {**GOOD_SCORE, "model": 3}, "model"),
        ("/events", {"user_id": "u", "events": []}, "events"),
        ("/events", {"user_id": "u", "events": [{**GOOD_EVENT, "timestamp": -5}]}, "events.0.timestamp"),
        ("/events", {"user_id": "u", "events": [{**GOOD_EVENT, "timestamp": 2**32}]}, "events.0.timestamp"),
        ("/events", {"user_id": "u", "events": [{"item_id": None, "category_id": 1}]}, "events.0.item_id"),
    ],
)
def test_schema_errors_are_422_naming_the_field(make_client, path: str, body: dict, field: str) -> None:
    with make_client() as client:
        r = client.post(path, json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "invalid_request"
        assert field in error_fields(r), r.json()
        assert field in r.json()["detail"]


@pytest.mark.parametrize(
    ("raw", "content_type", "field"),
    [
        (b"", "application/json", "body"),
        (b'{"user_id": "u", "candidates": [{"item_id": NaN, "category_id": 1}]}', "application/json", "candidates.0.item_id"),
        (b'{"user_id": "u", "candidates": [{"item_id": Infinity, "category_id": 1}]}', "application/json", "candidates.0.item_id"),
        (b"[1, 2]", "application/json", "body"),
    ],
)
def test_malformed_bodies_are_422(make_client, raw: bytes, content_type: str, field: str) -> None:
    with make_client() as client:
        r = client.post("/score", content=raw, headers={"content-type": content_type})
        assert r.status_code == 422, r.text
        assert field in error_fields(r), r.json()


def test_configured_limits_are_422_naming_the_field(make_client) -> None:
    with make_client(max_candidates=3, max_events_per_request=2, max_history=10, max_user_id_length=5) as client:
        r = client.post("/score", json={"user_id": "u", "candidates": [{"item_id": 1, "category_id": 1}] * 4})
        assert r.status_code == 422 and error_fields(r) == ["candidates"] and "at most 3" in r.json()["detail"]
        r = client.post("/events", json={"user_id": "u", "events": [GOOD_EVENT] * 3})
        assert r.status_code == 422 and error_fields(r) == ["events"]
        r = client.get("/users/u/history", params={"limit": 11})
        assert r.status_code == 422 and error_fields(r) == ["limit"]
        r = client.get("/users/u/history", params={"limit": -1})
        assert r.status_code == 422 and error_fields(r) == ["limit"]
        r = client.post("/events", json={"user_id": "toolong", "events": [GOOD_EVENT]})
        assert r.status_code == 422 and error_fields(r) == ["user_id"]


def test_default_candidate_limit_is_1000(make_client) -> None:
    with make_client() as client:
        cands = [{"item_id": i, "category_id": 1} for i in range(1001)]
        r = client.post("/score", json={"user_id": "u", "candidates": cands})
        assert r.status_code == 422 and error_fields(r) == ["candidates"]


def test_oversized_bodies_are_413(make_client) -> None:
    with make_client(max_body_bytes=4096) as client:
        cands = [{"item_id": i, "category_id": 1} for i in range(500)]  # ~17 kB of JSON
        r = client.post("/score", json={"user_id": "u", "candidates": cands})
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"

        def chunks():  # no Content-Length: the limit counts the bytes received
            yield b'{"user_id": "u", "candidates": ['
            for i in range(500):
                yield b'{"item_id": %d, "category_id": 1},' % i
            yield b'{"item_id": 1, "category_id": 1}]}'

        r = client.post("/score", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert client.post("/events", json={"user_id": "u", "events": [GOOD_EVENT]}).status_code == 200


def test_default_body_limit_rejects_a_50mb_body(make_client) -> None:
    with make_client() as client:
        r = client.post("/score", content=b"x" * (50 << 20), headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_unknown_model_is_404_and_no_model_is_503(make_client) -> None:
    with make_client() as client:
        r = client.post("/score", json={**GOOD_SCORE, "model": "nope"})
        assert r.status_code == 404 and r.json()["error"] == "unknown_model"
        r = client.post("/score", json=GOOD_SCORE)
        assert r.status_code == 503 and r.json()["error"] == "no_model"


def test_bearer_token(make_client, caplog: pytest.LogCaptureFixture) -> None:
    token = "tok-3f9a-very-secret"
    caplog.set_level(logging.DEBUG)
    with make_client(api_token=token) as client:
        ok = {"Authorization": f"Bearer {token}"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
            r = client.post("/events", json={"user_id": "u", "events": [GOOD_EVENT]}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"] == "unauthorized"
            assert client.post("/score", json=GOOD_SCORE, headers=headers).status_code == 401
            assert client.post("/admin/reload", headers=headers).status_code == 401
            assert client.get("/users/u/history", headers=headers).status_code == 401
        assert client.post("/events", json={"user_id": "u", "events": [GOOD_EVENT]}, headers=ok).status_code == 200
        assert client.post("/score", json=GOOD_SCORE, headers=ok).status_code == 503  # past auth: no model
        assert client.post("/admin/reload", headers=ok).status_code == 200
        # health, readiness, models and metrics stay open for probes and scrapers
        for path in ("/healthz", "/models", "/metrics", "/openapi.json"):
            assert client.get(path).status_code == 200
    assert token not in caplog.text


def test_admin_token_is_separate_when_set(make_client) -> None:
    with make_client(admin_token="admin-only") as client:
        assert client.post("/events", json={"user_id": "u", "events": [GOOD_EVENT]}).status_code == 200  # open
        assert client.post("/admin/reload").status_code == 401
        assert client.post("/admin/reload", headers={"Authorization": "Bearer admin-only"}).status_code == 200


def test_store_down_is_503_then_recovers(make_redis_server, make_client) -> None:
    server = make_redis_server()
    with make_client(redis_url=server.url, redis_connect_timeout_s=0.2, redis_socket_timeout_s=0.2) as client:
        assert client.post("/events", json={"user_id": "u", "events": [GOOD_EVENT]}).status_code == 200
        server.stop()
        r = client.post("/events", json={"user_id": "u", "events": [GOOD_EVENT]})
        assert r.status_code == 503 and r.json()["error"] == "store_unavailable"
        r = client.get("/users/u/history")
        assert r.status_code == 503
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False and ready.json()["store"] != "ok"
        server.start()
        assert client.post("/events", json={"user_id": "u", "events": [GOOD_EVENT]}).status_code == 200
        assert client.get("/readyz").json()["store"] == "ok"
        metrics = client.get("/metrics").text
        assert 'dare_store_errors_total{kind="ConnectionError",operation="append"}' in metrics


def test_slow_store_answers_503_within_the_timeout(make_redis_server, make_client) -> None:
    import time

    server = make_redis_server("--enable-debug-command", "yes")
    with make_client(redis_url=server.url, redis_socket_timeout_s=0.3) as client:
        sleeper = server.stall(3)
        started = time.monotonic()
        r = client.get("/users/u/history")
        elapsed = time.monotonic() - started
        sleeper.join()
        assert r.status_code == 503 and r.json()["error"] == "store_timeout"
        assert elapsed < 1.4  # answered before Redis woke up
        assert client.get("/users/u/history").status_code == 200


def test_request_timeout_is_503(make_redis_server, make_client) -> None:
    server = make_redis_server("--enable-debug-command", "yes")
    # the store would wait 5 s; the request gives up after 0.3 s
    with make_client(redis_url=server.url, redis_socket_timeout_s=5, request_timeout_s=0.3) as client:
        sleeper = server.stall(3)
        r = client.post("/events", json={"user_id": "u", "events": [GOOD_EVENT]})
        sleeper.join()
        assert r.status_code == 503 and r.json()["error"] == "request_timeout"


def test_corrupt_sequence_is_that_users_error_only(make_client, redis_server) -> None:
    with make_client() as client:
        client.post("/events", json={"user_id": "good", "events": [GOOD_EVENT]})
        redis_server.client().set("dare:{bad}:seq", b"garbage!")
        for r in (client.get("/users/bad/history"),
                  client.post("/events", json={"user_id": "bad", "events": [GOOD_EVENT]})):  # fmt: skip
            assert r.status_code == 500 and r.json()["error"] == "corrupt_sequence"
            assert "bad" in r.json()["detail"]
        assert redis_server.client().get("dare:{bad}:seq") == b"garbage!"
        assert client.get("/users/good/history").json()["length"] == 1
        assert "dare_corrupt_sequences_total 2.0" in client.get("/metrics").text


def test_request_metrics_by_route_template(make_client) -> None:
    with make_client() as client:
        client.get("/users/someone/history")
        client.post("/score", json={"user_id": "u", "candidates": []})
        text = client.get("/metrics").text
        assert 'dare_http_request_duration_seconds_count{endpoint="/users/{user_id}/history",method="GET",model="",status="200"} 1.0' in text
        assert 'endpoint="/score",method="POST",model="",status="422"' in text
        for name in ("dare_stage_duration_seconds", "dare_history_length", "dare_candidates_per_request",
                     "dare_store_errors_total", "dare_corrupt_sequences_total", "dare_model_info"):  # fmt: skip
            assert f"# TYPE {name.removesuffix('_total')}" in text


def test_service_imports_neither_torch_nor_training() -> None:
    code = (
        "import sys, service.main, service.cli, service.loader, service.engine, service.registry\n"
        "app = service.main.create_app(service.core.config.Settings())\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'training')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"service imported {out.stdout.strip()}"


@pytest.mark.parametrize(
    ("timestamp", "message"),
    [(1_511_600_000_000, "at most 4294967295 (Unix seconds expected; this looks like milliseconds)"),
     (1_511_600_000_000_000, "at most 4294967295 (Unix seconds expected; this looks like microseconds)"),
     (2**32, "at most 4294967295 (Unix seconds)")],
)  # fmt: skip
def test_timestamps_in_milliseconds_are_refused_with_a_hint(make_client, timestamp: int, message: str) -> None:
    with make_client() as client:
        r = client.post("/events", json={"user_id": "ms", "events": [{**GOOD_EVENT, "timestamp": timestamp}]})
        assert r.status_code == 422 and r.json()["fields"] == [{"field": "events.0.timestamp", "message": message}], r.text
        assert client.get("/users/ms/history").json()["exists"] is False  # nothing stored

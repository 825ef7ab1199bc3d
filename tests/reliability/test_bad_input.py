"""Explicit bad input against a real `dare serve`: each case a clear 4xx naming what is wrong (or a documented 200
where the input is valid), the process unharmed, and the data in Redis exactly as before."""

from __future__ import annotations

import gzip
import socket
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import TEST_CATE_RAW_IDS, TEST_ITEM_RAW_IDS
from tests.reliability.conftest import redis_snapshot

GOOD_EVENT = {"item_id": TEST_ITEM_RAW_IDS[0], "category_id": TEST_CATE_RAW_IDS[0], "timestamp": 1_511_600_000}
GOOD_CAND = {"item_id": TEST_ITEM_RAW_IDS[1], "category_id": TEST_CATE_RAW_IDS[1]}
USER = "bad-input-victim"


@pytest.fixture(scope="module")
def http(module_service) -> httpx.Client:
    with module_service.client(timeout=60) as client:
        yield client


@pytest.fixture(scope="module", autouse=True)
def victim(http: httpx.Client, redis_server) -> None:
    """A user with a stored history, which no bad request may change."""
    events = [{**GOOD_EVENT, "item_id": TEST_ITEM_RAW_IDS[k], "timestamp": 1_511_600_000 + k} for k in range(30)]
    assert http.post("/events", json={"user_id": USER, "events": events}).status_code == 200


@pytest.fixture
def intact(redis_server):
    """Fails the test if any key in Redis changed while it ran."""
    client = redis_server.client()
    before = redis_snapshot(client)
    yield
    assert redis_snapshot(client) == before, "a rejected request changed the stored data"


def fields(r: httpx.Response) -> list[str]:
    return [f["field"] for f in r.json().get("fields") or []]


def cand(**kw: object) -> dict[str, object]:
    return {**GOOD_CAND, **kw}


def ev(**kw: object) -> dict[str, object]:
    return {**GOOD_EVENT, **kw}


SCORE_CASES: list[tuple[str, object, str]] = [
    # wrong types
    ("user_id-int", {"user_id": 7, "candidates": [GOOD_CAND]}, "user_id"),
    ("user_id-list", {"user_id": ["u"], "candidates": [GOOD_CAND]}, "user_id"),
    ("user_id-null", {"user_id": None, "candidates": [GOOD_CAND]}, "user_id"),
    ("candidates-object", {"user_id": USER, "candidates": GOOD_CAND}, "candidates"),
    ("candidates-string", {"user_id": USER, "candidates": "1,2"}, "candidates"),
    ("item-string-not-digits", {"user_id": USER, "candidates": [cand(item_id="1e3")]}, "candidates.0.item_id"),
    ("item-string-negative", {"user_id": USER, "candidates": [cand(item_id="-1")]}, "candidates.0.item_id"),
    ("item-fraction", {"user_id": USER, "candidates": [cand(item_id=1.5)]}, "candidates.0.item_id"),
    ("item-bool", {"user_id": USER, "candidates": [cand(item_id=True)]}, "candidates.0.item_id"),
    ("item-null", {"user_id": USER, "candidates": [cand(item_id=None)]}, "candidates.0.item_id"),
    ("item-object", {"user_id": USER, "candidates": [cand(item_id={"id": 1})]}, "candidates.0.item_id"),
    ("explain-string", {"user_id": USER, "candidates": [GOOD_CAND], "explain": "yes"}, "explain"),
    ("model-int", {"user_id": USER, "candidates": [GOOD_CAND], "model": 3}, "model"),
    # missing / extra fields
    ("no-user", {"candidates": [GOOD_CAND]}, "user_id"),
    ("no-candidates", {"user_id": USER}, "candidates"),
    ("empty-candidates", {"user_id": USER, "candidates": []}, "candidates"),
    ("no-category", {"user_id": USER, "candidates": [{"item_id": 1}]}, "candidates.0.category_id"),
    ("extra-field", {"user_id": USER, "candidates": [cand(price=3)]}, "candidates.0.price"),
    ("empty-user", {"user_id": "", "candidates": [GOOD_CAND]}, "user_id"),
    # negative and huge ids
    ("item-negative", {"user_id": USER, "candidates": [cand(item_id=-1)]}, "candidates.0.item_id"),
    ("category-negative", {"user_id": USER, "candidates": [cand(category_id=-5)]}, "candidates.0.category_id"),
    ("item-2^64", {"user_id": USER, "candidates": [cand(item_id=2**64)]}, "candidates.0.item_id"),
    ("item-string-2^64", {"user_id": USER, "candidates": [cand(item_id=str(2**64))]}, "candidates.0.item_id"),
    ("item-10^30", {"user_id": USER, "candidates": [cand(item_id=10**30)]}, "candidates.0.item_id"),
    ("category-2^32", {"user_id": USER, "candidates": [cand(category_id=2**32)]}, "candidates.0.category_id"),
    # limits
    ("1001-candidates", {"user_id": USER, "candidates": [GOOD_CAND] * 1001}, "candidates"),
    ("user_id-too-long", {"user_id": "u" * 2000, "candidates": [GOOD_CAND]}, "user_id"),
]

EVENTS_CASES: list[tuple[str, object, str]] = [
    ("events-missing", {"user_id": USER}, "events"),
    ("events-empty", {"user_id": USER, "events": []}, "events"),
    ("timestamp-negative", {"user_id": USER, "events": [ev(timestamp=-1)]}, "events.0.timestamp"),
    ("timestamp-2^32", {"user_id": USER, "events": [ev(timestamp=2**32)]}, "events.0.timestamp"),
    ("timestamp-milliseconds", {"user_id": USER, "events": [ev(timestamp=1_511_600_000_000)]}, "events.0.timestamp"),
    ("timestamp-string", {"user_id": USER, "events": [ev(timestamp="2017-11-25")]}, "events.0.timestamp"),
    ("item-negative", {"user_id": USER, "events": [ev(item_id=-1)]}, "events.0.item_id"),
    ("item-huge", {"user_id": USER, "events": [ev(item_id=10**30)]}, "events.0.item_id"),
    # one bad event in a batch: the whole batch is refused, not the good part stored
    ("one-bad-of-many", {"user_id": USER, "events": [GOOD_EVENT] * 5 + [ev(category_id=-1)]}, "events.5.category_id"),
    ("10001-events", {"user_id": USER, "events": [GOOD_EVENT] * 10_001}, "events"),
]


@pytest.mark.parametrize(("path", "case", "body", "field"),
                         [("/score", *c) for c in SCORE_CASES] + [("/events", *c) for c in EVENTS_CASES],
                         ids=[f"score-{c[0]}" for c in SCORE_CASES] + [f"events-{c[0]}" for c in EVENTS_CASES])  # fmt: skip
def test_invalid_json_bodies_are_422_naming_the_field(http, intact, path: str, case: str, body: object, field: str) -> None:
    r = http.post(path, json=body)
    assert r.status_code == 422, (case, r.status_code, r.text[:300])
    assert r.json()["error"] in ("invalid_request", "limit_exceeded")
    assert field in fields(r), (case, r.json())
    assert field in r.json()["detail"]


INVALID_JSON, SCHEMA, MEDIA_TYPE = (400, "invalid_json"), (422, "invalid_request"), (415, "unsupported_media_type")
RAW_CASES: list[tuple[str, bytes, str | None, tuple[int, str]]] = [
    ("nan", b'{"user_id": "x", "candidates": [{"item_id": NaN, "category_id": 1}]}', "application/json", SCHEMA),
    ("infinity", b'{"user_id": "x", "candidates": [{"item_id": Infinity, "category_id": 1}]}', "application/json", SCHEMA),
    ("-infinity", b'{"user_id": "x", "candidates": [{"item_id": -Infinity, "category_id": 1}]}', "application/json",
     SCHEMA),
    ("1e309-overflows", b'{"user_id": "x", "candidates": [{"item_id": 1e309, "category_id": 1}]}', "application/json",
     SCHEMA),
    ("empty-body", b"", "application/json", SCHEMA),
    ("whitespace-body", b"   \n", "application/json", INVALID_JSON),
    ("not-json", b"{not json", "application/json", INVALID_JSON),
    ("truncated-json", b'{"user_id": "x", "candidates": [{"item_id": 1', "application/json", INVALID_JSON),
    ("json-array", b"[1, 2]", "application/json", SCHEMA),
    ("json-string", b'"hello"', "application/json", SCHEMA),
    ("json-null", b"null", "application/json", SCHEMA),
    ("text/plain", b'{"user_id": "x", "candidates": [{"item_id": 1, "category_id": 2}]}', "text/plain", MEDIA_TYPE),
    ("form", b"user_id=x&candidates=1", "application/x-www-form-urlencoded", MEDIA_TYPE),
    ("no-content-type", b'{"user_id": "x", "candidates": [{"item_id": 1, "category_id": 2}]}', None, MEDIA_TYPE),
    ("latin-1-charset", b'{"user_id": "x", "candidates": [{"item_id": 1, "category_id": 2}]}',
     "application/json; charset=latin-1", MEDIA_TYPE),
    ("invalid-utf8", b'{"user_id": "\xff\xfe", "candidates": [{"item_id": 1, "category_id": 2}]}', "application/json",
     INVALID_JSON),
    ("utf-16", '{"user_id": "x", "candidates": [{"item_id": 1, "category_id": 2}]}'.encode("utf-16"), "application/json",
     INVALID_JSON),
    ("gzip-body", gzip.compress(b'{"user_id": "x", "candidates": [{"item_id": 1, "category_id": 2}]}'),
     "application/json", INVALID_JSON),
    ("lone-surrogate", b'{"user_id": "\\ud800", "candidates": [{"item_id": 1, "category_id": 2}]}', "application/json",
     SCHEMA),
    ("nested-50k-deep", b"[" * 50_000 + b"]" * 50_000, "application/json", INVALID_JSON),
    ("5000-digit-int", b'{"user_id": "x", "candidates": [{"item_id": 1' + b"0" * 5000 + b', "category_id": 1}]}',
     "application/json", INVALID_JSON),
]


@pytest.mark.parametrize(("case", "raw", "content_type", "want"), RAW_CASES, ids=[c[0] for c in RAW_CASES])
@pytest.mark.parametrize("path", ["/score", "/events"])
def test_malformed_bodies_are_4xx(http, intact, path: str, case: str, raw: bytes, content_type: str | None,
                                  want: tuple[int, str]) -> None:  # fmt: skip
    headers = {"content-type": content_type} if content_type else {}
    r = http.post(path, content=raw, headers=headers)
    body = r.json()
    assert (r.status_code, body["error"]) == want, (case, r.status_code, r.text[:300])
    assert body["detail"] and body["request_id"] == r.headers["X-Request-ID"], body
    assert "at character" not in body["detail"]  # a line and column, not a parser's offset


def test_a_million_candidates_and_a_50mb_body_are_413(http, module_service, intact) -> None:
    million = b'{"user_id": "x", "candidates": [' + b",".join([b'{"item_id": 1, "category_id": 2}'] * 10**6) + b"]}"
    r = http.post("/score", content=million, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    # Declared 50 MB: refused from the headers, before a byte of the body is read (raw socket: the client sends
    # only the headers and still gets its answer).
    with socket.create_connection(("127.0.0.1", module_service.port), timeout=30) as sock:
        sock.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 52428800\r\n\r\n")  # fmt: skip
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]

    # 50 MB streamed without a Content-Length (chunked): refused once the limit is crossed
    def chunks():
        yield b'{"user_id": "x", "events": ['
        for _ in range(50 * 16):
            yield b" " * 65536

    try:
        r = http.post("/events", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
    except httpx.TransportError:
        pass  # the server answered 413 and closed while the client was still sending: refused either way
    assert http.get("/healthz").status_code == 200


def test_unicode_user_ids_are_valid_and_exact(http, redis_server) -> None:
    """Any non-empty string is a user id, stored under exactly that string (no normalisation): documented 200s."""
    users = ["ユーザー", "🚀 rocket", "مستخدم", "a\u0000b", "e\u0301", "\u00e9", "{braces}", "sp ace", "tab\tid"]
    for k, user in enumerate(users):
        r = http.post("/events", json={"user_id": user, "events": [ev(item_id=TEST_ITEM_RAW_IDS[k])]})
        assert r.status_code == 200 and r.json()["user_id"] == user, (user, r.text)
        r = http.post("/score", json={"user_id": user, "candidates": [GOOD_CAND]})
        assert r.status_code == 200 and r.json()["history_length"] == 1, (user, r.text)
    for k, user in enumerate(users):
        r = http.get(f"/users/{quote(user, safe='')}/history")
        assert r.status_code == 200 and [e["item_id"] for e in r.json()["events"]] == [TEST_ITEM_RAW_IDS[k]], user
    # "é" composed and decomposed are two different users
    assert redis_server.client().exists("dare:{e\u0301}:seq", "dare:{\u00e9}:seq") == 2


def test_duplicate_candidates_are_scored_each(http, intact) -> None:
    """Duplicates are valid (documented): one score per entry, in request order, equal for equal candidates."""
    other = {"item_id": TEST_ITEM_RAW_IDS[7], "category_id": TEST_CATE_RAW_IDS[2]}
    r = http.post("/score", json={"user_id": USER, "candidates": [GOOD_CAND, other, GOOD_CAND, GOOD_CAND, other]})
    assert r.status_code == 200
    s = r.json()["scores"]
    assert len(s) == 5 and s[0] == s[2] == s[3] and s[1] == s[4] and s[0] != s[1]


def test_bad_query_and_path_values(http, intact) -> None:
    for limit in ("-1", "abc", "1.5", "99999999999999999999999", ""):
        r = http.get(f"/users/{USER}/history", params={"limit": limit})
        assert r.status_code == 422 and fields(r) == ["limit"], (limit, r.text)
    r = http.get("/users/" + "u" * 2000 + "/history")
    assert r.status_code == 422 and fields(r) == ["user_id"]
    assert http.get("/score").status_code == 405
    assert http.post("/nowhere", json={}).status_code == 404
    assert http.post("/score", json={"user_id": USER, "candidates": [GOOD_CAND], "model": "nope"}).status_code == 404


def test_victim_history_unchanged_and_service_alive(http, module_service) -> None:
    body = http.get(f"/users/{USER}/history", params={"limit": 1000}).json()
    assert body["length"] == 30 and [e["item_id"] for e in body["events"]] == list(TEST_ITEM_RAW_IDS[:30])
    assert module_service.alive()
    assert "Traceback" not in module_service.log_text()


def test_oversized_headers_and_slow_clients_are_cut_off(make_service, models_dir, redis_url) -> None:
    """A 64 MB header once raised the server's memory by 114 MB, and a half-sent request held its connection for
    ever. Now headers over DARE_MAX_HEADER_BYTES get 431 and a request not sent within DARE_CLIENT_TIMEOUT_S gets
    408, both with the connection closed, and the service goes on answering."""
    import time

    service = make_service(models_dir=models_dir, redis_url=redis_url, max_header_bytes=8192, client_timeout_s=1.0)

    def exchange(*parts: bytes, pause_s: float = 0.0) -> tuple[bytes, float]:
        with socket.create_connection(("127.0.0.1", service.port), timeout=15) as sock:
            started = time.monotonic()
            for part in parts:
                try:
                    sock.sendall(part)
                except OSError:
                    break  # closed by the server mid-send
                time.sleep(pause_s)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer, time.monotonic() - started

    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 65536 + b"\r\n\r\n"
    answer, _ = exchange(huge)
    assert answer.startswith(b"HTTP/1.1 431") and b"DARE_MAX_HEADER_BYTES" in answer, answer[:200]
    # Headers sent slowly, never finished: cut off after the timeout, not held open.
    answer, took = exchange(b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", pause_s=0.3)
    assert answer.startswith(b"HTTP/1.1 408") and took < 5, (answer[:200], took)
    # A body that stops half-way.
    answer, took = exchange(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100\r\n\r\n{\"user_id\"")  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 408") and took < 5, (answer[:200], took)
    # Within the limits, on a kept-alive connection: answered as always (two requests, each complete).
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", service.port), timeout=15) as sock:
        for _ in range(2):
            sock.sendall(request)
            answer = b""
            while not answer.endswith(b'{"status":"ok"}'):
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200")
            time.sleep(1.5)  # idle between requests is not a slow request
    with service.client() as client:
        assert client.get("/healthz").status_code == 200

"""One error contract: every error code of `service.errors.ERROR_CODES` (which README's errors table lists, row for
row) provoked end to end against a real `dare serve` and a real Redis, checking its status, its JSON body and its
code; plus HEAD on the probes, the 413 counted under its route, and the request id on answers and log lines."""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from service.errors import ERROR_CODES
from tests.reliability.conftest import CANDIDATES, ROOT, ServiceProcess

TOKEN = "contract-token-5e1f"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCORE = {"user_id": "walker", "candidates": CANDIDATES[:2]}


def raw_exchange(port: int, *parts: bytes, pause_s: float = 0.0) -> bytes:
    """Send the parts on one connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        for part in parts:
            try:
                sock.sendall(part)
            except OSError:
                break
            time.sleep(pause_s)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def readme_error_rows() -> set[tuple[int, str]]:
    """(status, code) of each row of README's errors table (`| 503 | `a` / `b` | ... |` gives two)."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("**Errors**") :].split("\n\n")[1]
    rows = set()
    for line in table.splitlines()[2:]:
        status, codes = line.split("|")[1:3]
        rows |= {(int(status), code) for code in re.findall(r"`(\w+)`", codes)}
    return rows


def test_the_readme_lists_exactly_the_error_codes() -> None:
    assert readme_error_rows() == {(status, code) for code, (status, _) in ERROR_CODES.items()}


@pytest.fixture
def services(make_redis_server, make_service, models_dir: Path) -> tuple[ServiceProcess, ServiceProcess, object]:
    """Two services on one private Redis: `strict` (token, small limits, short store timeout, the connection
    limits) and `patient` (a store timeout longer than its request timeout, no model)."""
    server = make_redis_server("--enable-debug-command", "yes")
    strict = make_service(models_dir=models_dir, redis_url=server.url, api_token=TOKEN, max_candidates=3,
                          max_body_bytes=4096, max_header_bytes=8192, client_timeout_s=1.0,
                          redis_socket_timeout_s=0.3, request_timeout_s=2.0)  # fmt: skip
    empty = models_dir.parent / "no-models"
    empty.mkdir()
    patient = make_service(models_dir=empty, redis_url=server.url, redis_socket_timeout_s=5.0, request_timeout_s=0.5,
                           need_model=False)  # fmt: skip
    return strict, patient, server


def test_every_documented_error_code_end_to_end(services, redis_url: str, models_dir: Path, tmp_path: Path) -> None:
    strict, patient, server = services
    seen: dict[str, tuple[int, dict]] = {}

    def check(code: str, r: httpx.Response) -> dict:
        body = r.json()
        assert (r.status_code, body.get("error")) == (ERROR_CODES[code][0], code), (code, r.status_code, r.text)
        assert r.headers["content-type"] == "application/json"
        assert set(body) <= {"error", "detail", "request_id", "fields"} and body["detail"], body
        assert body["request_id"] == r.headers["X-Request-ID"], body
        seen[code] = (r.status_code, body)
        return body

    def check_raw(code: str, answer: bytes) -> None:
        """An answer `dare serve` gives before the request reaches the app: JSON {error, detail}, connection closed."""
        status = int(answer.split(b" ", 2)[1])
        head, _, payload = answer.partition(b"\r\n\r\n")
        body = httpx.Response(status, content=payload).json()
        assert (status, body["error"]) == (ERROR_CODES[code][0], code), answer[:300]
        assert b"content-type: application/json" in head.lower() and body["detail"]
        seen[code] = (status, body)

    with strict.client() as http:
        r = http.post("/score", content=b'{"user_id": "walker", "candidates": [', headers={**AUTH, "content-type": "application/json"})
        assert "line 1, column" in check("invalid_json", r)["detail"]
        check_raw("bad_request", raw_exchange(strict.port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                                           b"Content-Length: 12abc\r\n\r\n{}"))  # fmt: skip
        r = http.post("/score", json=SCORE)
        check("unauthorized", r)
        assert r.headers["www-authenticate"] == "Bearer"
        check("not_found", http.get("/no/such/path"))
        check("unknown_model", http.post("/score", json={**SCORE, "model": "nope"}, headers=AUTH))
        r = http.get("/score", headers=AUTH)
        check("method_not_allowed", r)
        assert r.headers["allow"] == "POST"
        check_raw("client_timeout", raw_exchange(strict.port, b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"))
        r = http.post("/score", json={**SCORE, "user_id": "u" * 5000}, headers=AUTH)
        check("body_too_large", r)
        for headers in ({"content-type": "text/plain"}, {"content-type": "application/json", "content-encoding": "gzip"}):
            r = http.post("/events", content=b'{"user_id": "walker", "events": []}', headers={**AUTH, **headers})
            assert "Content-" in check("unsupported_media_type", r)["detail"]
        r = http.post("/score", json={**SCORE, "debug": True}, headers=AUTH)
        assert check("invalid_request", r)["fields"] == [
            {"field": "debug", "message": "unknown field (the schema at /openapi.json lists the accepted ones)"}
        ]
        r = http.post("/score", json={**SCORE, "candidates": CANDIDATES[:4]}, headers=AUTH)
        assert check("limit_exceeded", r)["fields"][0]["field"] == "candidates"
        check_raw("headers_too_large", raw_exchange(strict.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n"))
        server.client().set("dare:{broken}:seq", b"DSEQ\x07\x10\x00\x00")
        r = http.post("/score", json={**SCORE, "user_id": "broken"}, headers={**AUTH, "X-Request-ID": "walk-corrupt-1"})
        assert check("corrupt_sequence", r)["request_id"] == "walk-corrupt-1"
        sleeper = server.stall(1.5)
        check("store_timeout", http.post("/score", json=SCORE, headers=AUTH))
        sleeper.join()
        # the 413 above is counted under its route, not as "unmatched"
        metrics = http.get("/metrics").text
        assert re.search(r'dare_http_request_duration_seconds_count\{[^}]*endpoint="/score"[^}]*status="413"', metrics), metrics
        assert not re.search(r'endpoint="unmatched"[^}]*status="413"', metrics)

    events = {"user_id": "walker", "events": [{k: CANDIDATES[0][k] for k in ("item_id", "category_id")}]}
    with patient.client() as http:
        check("no_model", http.post("/score", json=SCORE))
        sleeper = server.stall(2.0)
        check("request_timeout", http.post("/events", json=events))
        sleeper.join()
        server.stop()
        check("store_unavailable", http.post("/events", json=events))
        assert head_probe(patient.port, "/readyz") == (503, b"")
        assert head_probe(patient.port, "/healthz") == (200, b"")

    # the corrupt value's log line carries the request's id; the access log line too
    strict.process.send_signal(signal.SIGTERM)
    strict.process.wait(timeout=30)
    log = strict.log_text()
    assert re.search(r"ERROR service\.store \[walk-corrupt-1\]: corrupt stored sequence", log), log[-3000:]
    assert re.search(r'"POST /score HTTP/1.1" 500 .*\[walk-corrupt-1\]', log), log[-3000:]

    seen["internal_error"] = seen_internal_error(redis_url, models_dir, tmp_path)
    assert set(seen) == set(ERROR_CODES), set(ERROR_CODES) - set(seen)


def head_probe(port: int, path: str) -> tuple[int, bytes]:
    """HEAD over a raw socket: the status and every byte after the headers (none, for HEAD)."""
    answer = raw_exchange(port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert b"x-request-id: " in head.lower()
    return int(head.split(b" ", 2)[1]), rest


def seen_internal_error(redis_url: str, models_dir: Path, tmp_path: Path) -> tuple[int, dict]:
    """internal_error is a bug by definition, so the one fault injected in this walk provokes it: a scoring engine
    whose call raises, in the real app (in process, on a real Redis, a real model) behind all its middleware."""
    from fastapi.testclient import TestClient

    from service.core.config import Settings
    from service.main import create_app

    app = create_app(Settings(redis_url=redis_url, models_dir=models_dir, data_dir=tmp_path / "var"))
    with TestClient(app, raise_server_exceptions=False) as client:

        def broken(*_args: object, **_kwargs: object) -> None:
            raise RuntimeError("injected fault")

        app.state.services.engine.score = broken
        r = client.post("/score", json=SCORE, headers={"X-Request-ID": "walk-internal"})
    body = r.json()
    assert (r.status_code, body["error"]) == (500, "internal_error"), r.text
    assert body["request_id"] == r.headers["X-Request-ID"] == "walk-internal" and "injected" not in r.text
    return r.status_code, body


def test_head_on_the_probes_of_a_ready_service(make_service, models_dir: Path, redis_url: str) -> None:
    service = make_service(models_dir=models_dir, redis_url=redis_url)
    assert head_probe(service.port, "/healthz") == (200, b"")
    assert head_probe(service.port, "/readyz") == (200, b"")
    with service.client() as http:
        assert http.head("/healthz").status_code == 200 and http.head("/score").status_code == 405
        spec = http.get("/openapi.json").json()
    assert set(spec["paths"]["/healthz"]) == {"get"}  # HEAD is served, not a second documented operation


def test_request_ids_are_echoed_generated_and_validated(make_service, models_dir: Path, redis_url: str) -> None:
    service = make_service(models_dir=models_dir, redis_url=redis_url)
    event = {"item_id": CANDIDATES[0]["item_id"], "category_id": CANDIDATES[0]["category_id"], "timestamp": 1_511_600_000}
    with service.client() as http:
        r = http.post("/score", json=SCORE, headers={"X-Request-ID": "ad-7f3c.01"})
        assert r.status_code == 200 and r.json()["request_id"] == r.headers["X-Request-ID"] == "ad-7f3c.01"
        # the body's request_id wins over the header (a proxy may set the header on its own)
        r = http.post("/events", json={"user_id": "rid", "events": [event], "request_id": "body-1"},
                      headers={"X-Request-ID": "proxy-9"})  # fmt: skip
        assert r.status_code == 200 and r.json()["request_id"] == r.headers["X-Request-ID"] == "body-1"
        # none given: a fresh uuid4 hex per request, also on probes and errors
        ids = {http.get("/healthz").headers["X-Request-ID"] for _ in range(3)}
        r = http.get("/nope")
        ids.add(r.json()["request_id"])
        assert len(ids) == 4 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
        # malformed ids are refused, naming where they came from, and never echoed
        for bad in ("has space", "x" * 129, "new\nline"):
            r = http.post("/score", json={**SCORE, "request_id": bad})
            assert r.status_code == 422 and r.json()["fields"][0]["field"] == "request_id", r.text
            assert bad not in r.headers["X-Request-ID"]
        for bad in ("x" * 129, "tab\tin"):
            r = http.get("/healthz", headers={"X-Request-ID": bad})
            assert r.status_code == 422 and r.json()["fields"] == [
                {"field": "X-Request-ID", "message": "1 to 128 printable ASCII characters without spaces"}
            ]
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"])
    assert "Traceback" not in service.log_text()


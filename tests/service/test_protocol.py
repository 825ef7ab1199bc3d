"""`dare serve`'s HTTP protocol (`ScoreHttpProtocol`: uvicorn's httptools protocol answering POST /score below the
ASGI round) over real sockets: the same answers as plain uvicorn with FastAPI, and uvicorn's HTTP behaviour kept
(keep-alive, pipelining, a body in pieces, Expect: 100-continue, Connection: close, HTTP/1.0, chunked bodies, a
client that goes away). Real uvicorn servers in threads, a real Redis, a real exported model."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import uvicorn

from service.core.config import Settings
from service.main import create_app
from service.store import SequenceStore, make_events
from tests.conftest import TEST_CATE_RAW_IDS, TEST_ITEM_RAW_IDS, free_port
from tests.service.test_fast_path import CANDIDATES, CASES, _comparable

PROTOCOL = "service.api.protocol:ScoreHttpProtocol"
BODY = orjson.dumps({"user_id": "alice", "candidates": CANDIDATES})


@contextmanager
def served(settings: Settings, http: str = PROTOCOL) -> Iterator[tuple[int, Any]]:
    """A uvicorn server on `settings`' app in a thread: its port and the app."""
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), http=http, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield config.port, app
    finally:
        server.should_exit = True
        thread.join(15)


class Conn:
    """One raw HTTP/1.1 connection: send bytes, read whole responses (status, headers, body)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 16)
        self.buf += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"connection closed with {self.buf!r} unread"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        status = int(status_line.split(" ")[1])
        if status == 100:
            return status, headers, b""
        length = int(headers["content-length"])
        while len(self.buf) < length:
            assert self._fill(), "connection closed mid-body"
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed_by_server(self) -> bool:
        try:
            return not self._fill() and not self.buf
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def post(body: bytes, *, content_type: str | None = "application/json", extra: str = "", version: str = "1.1") -> bytes:
    headers = f"POST /score HTTP/{version}\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
    if content_type is not None:
        headers += f"Content-Type: {content_type}\r\n"
    return (headers + extra + "\r\n").encode() + body


def _raw_request(kwargs: dict[str, Any]) -> bytes:
    """The test client's request of a test_fast_path case, as bytes."""
    if "json" in kwargs:
        return post(orjson.dumps(kwargs["json"]))
    return post(kwargs["content"], content_type=kwargs.get("headers", {}).get("content-type"))


@pytest.fixture
def settings(models_dir: Path, redis_url: str, redis_server: Any, tmp_path: Path) -> Settings:
    SequenceStore.from_url(redis_url).replace(
        "alice", make_events([TEST_ITEM_RAW_IDS[0], 999_999, *TEST_ITEM_RAW_IDS[:3]],
                             [TEST_CATE_RAW_IDS[0], 77, *TEST_CATE_RAW_IDS[:3]], np.arange(5) + 1_511_600_000)  # fmt: skip
    )
    return Settings(redis_url=redis_url, models_dir=models_dir, data_dir=tmp_path / "var", max_candidates=10,
                    max_user_id_length=32)  # fmt: skip


def test_protocol_answers_as_uvicorn_and_fastapi_do(settings: Settings) -> None:
    """Every test_fast_path case, on the protocol with the fast path and on plain uvicorn (httptools) with every
    request through FastAPI: same status, body (less the timings) and content type."""
    plain = settings.model_copy(update={"score_fast_path": False})
    with served(settings) as (fast_port, _), served(plain, http="httptools") as (plain_port, _):
        fast, slow = Conn(fast_port), Conn(plain_port)
        for name, kwargs in CASES:
            answers = []
            for conn in (fast, slow):
                conn.send(_raw_request(kwargs))
                status, headers, body = conn.response()
                answers.append((status, _comparable(orjson.loads(body)), headers["content-type"]))
            assert answers[0] == answers[1], name


def test_keep_alive_pipelining_and_metrics(settings: Settings) -> None:
    """Requests one after another and pipelined in one write (POST /score behind POST /score, then a GET), all
    answered in order on one connection; each POST /score counted once in the request histogram."""
    with served(settings) as (port, _):
        conn = Conn(port)
        for _ in range(3):
            conn.send(post(BODY))
            status, headers, body = conn.response()
            assert status == 200 and headers["content-type"] == "application/json"
            assert len(orjson.loads(body)["scores"]) == len(CANDIDATES)
            assert "date" in headers and headers["server"] == "uvicorn"
        cold = orjson.dumps({"user_id": "nobody", "candidates": CANDIDATES[:2]})
        conn.send(post(BODY) + post(cold) + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        first, second, health = conn.response(), conn.response(), conn.response()
        assert first[0] == second[0] == health[0] == 200
        assert orjson.loads(first[2])["cold_start"] is False and len(orjson.loads(first[2])["scores"]) == 5
        assert orjson.loads(second[2])["cold_start"] is True and len(orjson.loads(second[2])["scores"]) == 2
        conn.send(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        metrics = conn.response()[2].decode()
        assert 'dare_http_request_duration_seconds_count{endpoint="/score",method="POST",model="dare-a",status="200"} 5.0' in metrics


def test_body_in_pieces_expect_continue_close_and_http_1_0(settings: Settings) -> None:
    with served(settings) as (port, _):
        conn = Conn(port)  # the body arrives in three writes: answered once it is complete
        request = post(BODY)
        head_end = request.index(b"\r\n\r\n") + 4
        for piece in (request[:head_end], request[head_end : head_end + 20], request[head_end + 20 :]):
            conn.send(piece)
            time.sleep(0.05)
        assert conn.response()[0] == 200

        conn.send(post(b"", extra="Expect: 100-continue\r\n").replace(b"Content-Length: 0", f"Content-Length: {len(BODY)}".encode()))
        assert conn.response()[0] == 100  # uvicorn's ASGI path sends 100 Continue when the app reads the body
        conn.send(BODY)
        assert conn.response()[0] == 200

        conn.send(post(BODY, extra="Connection: close\r\n"))
        status, headers, _ = conn.response()
        assert status == 200 and headers.get("connection") == "close" and conn.closed_by_server()

        old = Conn(port)
        old.send(post(BODY, version="1.0"))
        status, _, body = old.response()
        assert status == 200 and len(orjson.loads(body)["scores"]) == len(CANDIDATES) and old.closed_by_server()


def test_chunked_body_and_a_client_that_goes_away(settings: Settings) -> None:
    with served(settings) as (port, _):
        conn = Conn(port)  # no Content-Length: uvicorn's ASGI path and FastAPI
        conn.send(b"POST /score HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n")  # fmt: skip
        status, _, body = conn.response()
        assert status == 200 and len(orjson.loads(body)["scores"]) == len(CANDIDATES)

        for _ in range(5):  # whole requests, then gone before the answer
            gone = Conn(port)
            gone.send(post(BODY))
            gone.close()
        half = Conn(port)  # headers and half a body, then gone
        half.send(post(BODY)[: -len(BODY) // 2])
        half.close()
        time.sleep(0.2)
        conn.send(post(BODY))
        assert conn.response()[0] == 200  # the server carries on


def test_bad_http_is_uvicorns_400(settings: Settings) -> None:
    with served(settings) as (port, _):
        conn = Conn(port)
        conn.send(b"POST /score HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\n\r\n{}")
        status, _, body = conn.response()
        assert status == 400 and b"Invalid HTTP request" in body
        healthy = Conn(port)
        healthy.send(post(BODY))
        assert healthy.response()[0] == 200


def test_well_formed_requests_skip_the_asgi_app(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The protocol answers a well-formed POST /score itself; the rest reach the ASGI app (with plain uvicorn,
    everything does)."""
    from service.main import DareApp

    reached: list[str] = []
    asgi_call = DareApp.__call__

    async def counting(self: DareApp, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            reached.append(scope["path"])
        await asgi_call(self, scope, receive, send)

    monkeypatch.setattr(DareApp, "__call__", counting)
    for http, expected in ((PROTOCOL, ["/score", "/healthz"]), ("httptools", ["/score"] * 3 + ["/score", "/healthz"])):
        reached.clear()
        with served(settings, http=http) as (port, _):
            conn = Conn(port)
            for _ in range(3):
                conn.send(post(BODY))
                assert conn.response()[0] == 200
            conn.send(post(b'{"user_id": "alice", "candidates": []}'))
            assert conn.response()[0] == 422  # FastAPI's answer, naming the field
            conn.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert conn.response()[0] == 200
        assert reached == expected, http


def test_a_body_past_uvicorns_read_buffer_is_read_whole(settings: Settings) -> None:
    """uvicorn pauses reading past 64 kB of unread body until the app reads; the protocol reads on to the end."""
    many = orjson.dumps({"user_id": "alice", "candidates": CANDIDATES * 400})  # ~90 kB, 2,000 candidates
    assert len(many) > 65536
    with served(settings) as (port, _):
        conn = Conn(port)
        request = post(many)
        split = request.index(b"\r\n\r\n") + 4 + 65_600  # past the limit in one read, then the rest
        conn.send(request[:split])
        time.sleep(0.2)
        conn.send(request[split:])
        status, _, body = conn.response()
        assert status == 422 and orjson.loads(body)["fields"][0]["field"] == "candidates"  # over DARE_MAX_CANDIDATES
        conn.send(post(BODY))
        assert conn.response()[0] == 200


def test_concurrent_connections_each_get_their_own_answers(settings: Settings) -> None:
    """Six connections at once, each a mix of stored and cold users and a body FastAPI refuses: every answer is the
    one the same body gets alone, and every request is counted once."""
    bodies = [BODY, orjson.dumps({"user_id": "nobody", "candidates": CANDIDATES[:3]}),
              orjson.dumps({"user_id": "alice", "candidates": CANDIDATES[::-1], "explain": True}),
              b'{"user_id": "alice", "candidates": [{"item_id": -1, "category_id": 1}]}']  # fmt: skip
    with served(settings) as (port, _):
        alone = Conn(port)
        expected = []
        for body in bodies:
            alone.send(post(body))
            status, _, payload = alone.response()
            expected.append((status, _comparable(orjson.loads(payload))))
        assert [e[0] for e in expected] == [200, 200, 200, 422]
        failures: list[str] = []

        def client(seed: int) -> None:
            conn = Conn(port)
            for i in range(40):
                k = (seed + i) % len(bodies)
                conn.send(post(bodies[k]))
                status, _, payload = conn.response()
                if (status, _comparable(orjson.loads(payload))) != expected[k]:
                    failures.append(f"client {seed}, request {i}: {status} {payload[:200]!r}")

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures, failures[:3]
        alone.send(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        metrics = alone.response()[2].decode()
        answered = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith('dare_http_request_duration_seconds_count{endpoint="/score",method="POST"'))  # fmt: skip
        assert answered == len(bodies) + 6 * 40

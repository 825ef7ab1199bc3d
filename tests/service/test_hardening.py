"""What a client cannot make the service do: start store work with a body it then rejects, forge log lines, or learn
the store's address or the key layout from an answer."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from service.store import SequenceStore
from tests.conftest import TEST_CATE_RAW_IDS, TEST_ITEM_RAW_IDS
from tests.service.test_scoring import random_history

CANDIDATES = [{"item_id": TEST_ITEM_RAW_IDS[k], "category_id": TEST_CATE_RAW_IDS[k % 10]} for k in range(5)]


def read_commands(client) -> int:  # type: ignore[no-untyped-def]
    """GETRANGE and EXEC calls the server has run since its statistics were last reset."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("getrange", "exec"))


def test_a_rejected_score_body_never_reads_the_store(make_client, redis_server, redis_url: str, models_dir: Path) -> None:
    """20 connections sending rejected bodies for a user with a long history once starved valid clients (the read
    started before the body was validated). Now a 422 or 404 costs the store nothing."""
    store = SequenceStore.from_url(redis_url)
    store.replace("heavy", random_history(np.random.default_rng(3), 5_000))
    store.close()
    raw = redis_server.client()
    rejected = [
        {"user_id": "heavy", "candidates": [{"item_id": 1.5, "category_id": 2}]},  # 422: a fraction
        {"user_id": "heavy", "candidates": CANDIDATES, "model": "no-such-model"},  # 404
        {"user_id": "heavy", "candidates": CANDIDATES * 300},  # 422: over DARE_MAX_CANDIDATES
        {"user_id": "heavy", "candidates": CANDIDATES, "extra": 1},  # 422: unknown field
    ]
    with make_client(models_dir=models_dir, max_candidates=1000) as client:
        assert client.post("/score", json={"user_id": "heavy", "candidates": CANDIDATES}).status_code == 200
        raw.config_resetstat()
        for body in rejected * 5:
            assert client.post("/score", json=body).status_code in (404, 422)
        assert read_commands(raw) == 0
        assert client.post("/score", json={"user_id": "heavy", "candidates": CANDIDATES}).status_code == 200
        assert read_commands(raw) == 3  # the valid request's read: one EXEC running two GETRANGEs (header, tail)


def test_client_strings_never_forge_log_lines(make_client, redis_server, models_dir: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A user id with a newline and a corrupt stored value: the user id reaches the log escaped, on one line."""
    user = "evil\n2026-01-01 00:00:00 ERROR service: FORGED"
    store = SequenceStore.from_url(redis_server.url)
    redis_server.client().set(store.key(user), b"garbage!")
    store.close()
    caplog.set_level(logging.INFO)
    with make_client(models_dir=models_dir) as client:
        r = client.post("/score", json={"user_id": user, "candidates": CANDIDATES})
        assert r.status_code == 500 and r.json()["error"] == "corrupt_sequence"
        assert repr(user) in r.json()["detail"]
    messages = [record.getMessage() for record in caplog.records]
    assert any("corrupt" in m for m in messages)
    assert not any("\n" in m for m in messages), [m for m in messages if "\n" in m]


def test_answers_name_no_store_address_and_no_key(make_client, make_redis_server, models_dir: Path) -> None:
    """/readyz is open to anyone: it says whether the store answers, not where it is; a 503 or a 500 says what went
    wrong for the client, and the details (address, socket path, key) go to the log."""
    server = make_redis_server()
    with make_client(models_dir=models_dir, redis_url=server.unix_url, redis_connect_timeout_s=0.2,
                     redis_socket_timeout_s=0.2) as client:  # fmt: skip
        server.client().set("dare:{broken}:seq", b"garbage!")
        corrupt = client.post("/score", json={"user_id": "broken", "candidates": CANDIDATES})
        assert corrupt.status_code == 500 and "dare:" not in corrupt.text and "{broken}" not in corrupt.text
        server.stop()
        answers = [client.get("/readyz"), client.post("/score", json={"user_id": "u", "candidates": CANDIDATES}),
                   client.get("/users/u/history")]  # fmt: skip
        assert [a.status_code for a in answers] == [503, 503, 503]
        assert answers[0].json() == {"ready": False, "store": "unavailable", "models": 1}
        for answer in (corrupt, *answers):
            for secret in (str(server.socket_path), server.socket_path.name, str(server.port), "127.0.0.1"):
                assert secret not in answer.text, (secret, answer.text)


def test_ids_are_whole_numbers_as_written(make_client, models_dir: Path) -> None:
    """`1.0000000000000001` (a float parser's 1.0) was accepted as item 1; a whole number written 7.0 still counts."""
    item, cate = TEST_ITEM_RAW_IDS[0], TEST_CATE_RAW_IDS[0]
    with make_client(models_dir=models_dir) as client:
        for number, status in ((f"{item}.0000000000000001", 422), (f"{item}.0", 200), (f"{item}", 200)):
            body = '{"user_id": "u", "candidates": [{"item_id": %s, "category_id": %d}]}' % (number, cate)
            r = client.post("/score", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (number, r.text)
        body = '{"user_id": "u", "events": [{"item_id": 1.0000000000000001, "category_id": 2}]}'
        r = client.post("/events", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "events.0.item_id"

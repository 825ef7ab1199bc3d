"""Many clients append to ONE user's sequence at once, through a real `dare serve` with two worker processes:
the store ends up with exactly the events sent, each request's batch contiguous and in the order the answers
say, nothing lost or duplicated; past the lifelong maximum it keeps exactly the most recent events."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

CLIENTS = 12
LIFELONG_MAX = 300


@dataclass(frozen=True)
class Batch:
    client: int
    index: int  # the client's n-th request
    items: tuple[int, ...]
    started: float
    finished: float
    length: int  # the stored length the service answered


def run_clients(base_url: str, user: str, requests_per_client: int, events_per_request: int) -> list[Batch]:
    """CLIENTS threads, released together, each sending its requests one after the other (so its own events have
    a known order); item ids encode (user, client, request, event) and are unique."""
    start = threading.Barrier(CLIENTS)
    tag = 1 if user == "exact" else 2

    def client(c: int) -> list[Batch]:
        batches = []
        with httpx.Client(base_url=base_url, timeout=30) as http:
            start.wait()
            for r in range(requests_per_client):
                items = tuple(tag * 10**8 + c * 10**6 + r * 100 + e for e in range(events_per_request))
                body = {"user_id": user, "events": [{"item_id": i, "category_id": c, "timestamp": 1_511_600_000 + r}
                                                    for i in items]}  # fmt: skip
                started = time.monotonic()
                answer = http.post("/events", json=body)
                finished = time.monotonic()
                assert answer.status_code == 200, answer.text
                assert answer.json()["appended"] == events_per_request
                batches.append(Batch(c, r, items, started, finished, answer.json()["length"]))
        return batches

    with ThreadPoolExecutor(CLIENTS) as pool:
        return [b for batches in pool.map(client, range(CLIENTS)) for b in batches]


def stored_items(base_url: str, user: str) -> list[int]:
    body = httpx.get(f"{base_url}/users/{user}/history", params={"limit": 100_000}, timeout=30).json()
    items = [e["item_id"] for e in body["events"]]
    assert body["length"] == len(items)
    return items


def test_concurrent_appends_to_one_user(make_service, redis_url: str, tmp_path) -> None:
    (tmp_path / "no-models").mkdir()
    service = make_service(models_dir=tmp_path / "no-models", redis_url=redis_url, workers=2,
                           lifelong_max_events=LIFELONG_MAX, need_model=False)  # fmt: skip
    with ThreadPoolExecutor(2) as pool:  # both users at once: 24 clients in all
        exact_f = pool.submit(run_clients, service.base_url, "exact", 10, 2)  # 240 events <= the maximum
        trimmed_f = pool.submit(run_clients, service.base_url, "trimmed", 15, 3)  # 540 events > the maximum
        exact, trimmed = exact_f.result(), trimmed_f.result()

    # --- below the maximum: exactly the events sent, every append atomic -------------------------------------
    stored = stored_items(service.base_url, "exact")
    sent = [i for b in exact for i in b.items]
    assert len(stored) == len(sent) == 240
    assert sorted(stored) == sorted(sent)  # nothing lost, nothing duplicated
    # each answer's length is the length right after that append: all distinct, 2, 4, ..., 240 ...
    assert sorted(b.length for b in exact) == list(range(2, 241, 2))
    # ... and the batch sits exactly there, contiguous and in its own order
    for b in exact:
        assert tuple(stored[b.length - 2 : b.length]) == b.items, b
    # one client's requests are stored in the order it sent them
    for c in range(CLIENTS):
        mine = [b.length for b in sorted((b for b in exact if b.client == c), key=lambda b: b.index)]
        assert mine == sorted(mine)

    # --- past the maximum: the most recent LIFELONG_MAX events, nothing else -----------------------------------
    stored = stored_items(service.base_url, "trimmed")
    assert len(stored) == LIFELONG_MAX and len(set(stored)) == LIFELONG_MAX
    sent_items = {i for b in trimmed for i in b.items}
    assert set(stored) <= sent_items
    # stored = a suffix of the arrival order: batches are whole except the oldest stored one, cut at its start
    position = {item: k for k, item in enumerate(stored)}
    kept = [b for b in trimmed if any(i in position for i in b.items)]
    cut = [b for b in kept if not all(i in position for i in b.items)]
    assert len(cut) <= 1
    for b in kept:
        present = [position[i] for i in b.items if i in position]
        assert present == list(range(present[0], present[0] + len(present)))  # contiguous, in order
        if b in cut:
            assert present[0] == 0 and [i for i in b.items if i in position] == list(b.items[-len(present):])
    # per client, what is kept is the end of what it sent
    for c in range(CLIENTS):
        mine = sorted((b for b in trimmed if b.client == c), key=lambda b: b.index)
        flags = [i in position for b in mine for i in b.items]
        assert flags == sorted(flags), f"client {c}: an older event kept while a newer one was trimmed"
    # real-time order: an event trimmed away was sent before every kept one was acknowledged
    first_kept_ack = min(b.finished for b in kept)
    for b in trimmed:
        if b not in kept:
            assert b.started < first_kept_ack, b
    assert all(b.length <= LIFELONG_MAX for b in trimmed)
    assert max(b.length for b in trimmed) == LIFELONG_MAX

"""The sequence store against a REAL local Redis Cluster (3 masters started from `redis-server`, joined with
`redis-cli --cluster create`), reached through a `redis+cluster://` URL as a deployment would configure it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import redis
from redis.cluster import RedisCluster as ClusterClient

from service.store import SequenceStore, make_events

N_USERS = 60


def events(n: int, start: int = 0) -> np.ndarray:
    ids = np.arange(start, start + n, dtype=np.int64)
    return make_events(ids + 1000, ids % 7 + 1, ids + 1_511_600_000)


def test_store_spreads_users_over_all_masters_and_reads_them_back(redis_cluster) -> None:
    store = SequenceStore.from_url(redis_cluster.url)
    try:
        for user in range(N_USERS):
            assert store.replace(f"u{user}", events(user + 1)) == user + 1
        for user in range(N_USERS):
            history = store.read(f"u{user}", max_events=1000)
            assert history.exists and history.stored_length == user + 1
            np.testing.assert_array_equal(history.events, events(user + 1))
        assert not store.read("nobody", max_events=10).exists
    finally:
        store.close()
    # Every master holds some users: the cluster really shards, it is not one node answering for all.
    per_node = [redis.Redis(port=port).dbsize() for port in redis_cluster.ports]
    assert sum(per_node) == N_USERS and all(count > 0 for count in per_node), per_node


def test_all_keys_of_a_user_share_one_slot(redis_cluster) -> None:
    store = SequenceStore.from_url(redis_cluster.url)
    client = ClusterClient(host="127.0.0.1", port=redis_cluster.ports[0])
    try:
        key = store.key("user:42")
        assert "{user:42}" in key
        # The hash tag decides the slot: any other key with the same tag lands in the same slot (and node).
        assert client.keyslot(key) == client.keyslot("anything-{user:42}-else")
    finally:
        store.close()
        client.close()


def test_concurrent_appends_to_one_user_in_the_cluster_lose_nothing(redis_cluster) -> None:
    store = SequenceStore.from_url(redis_cluster.url, lifelong_max_events=10_000)
    user = "hot-user"
    store.delete(user)
    batches = [events(5, start=100 * i) for i in range(40)]
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda batch: store.append(user, batch), batches))
        history = store.read(user, max_events=10_000)
        assert history.stored_length == 200
        got = sorted(history.events["item_id"].tolist())
        want = sorted(np.concatenate(batches)["item_id"].tolist())
        assert got == want
    finally:
        store.close()


def test_trim_to_lifelong_maximum_in_the_cluster(redis_cluster) -> None:
    store = SequenceStore.from_url(redis_cluster.url, lifelong_max_events=50)
    try:
        store.delete("trim-user")
        for i in range(4):
            store.append("trim-user", events(20, start=20 * i))
        history = store.read("trim-user", max_events=1000)
        assert history.stored_length == 50
        np.testing.assert_array_equal(history.events, events(80)[-50:])
    finally:
        store.close()


def test_idempotent_append_in_the_cluster(redis_cluster) -> None:
    """The sequence key and the request's marker key share the user's hash tag: one slot, one script, no CROSSSLOT."""
    store = SequenceStore.from_url(redis_cluster.url, lifelong_max_events=1000)
    try:
        for user in ("idem-a", "idem-b", "idem-c"):
            store.delete(user)
            store.client.delete(store.request_marker_key(user, "req-1"))
            assert store.append_once(user, events(3), "req-1", ttl_s=60) == (3, False)
            assert store.append_once(user, events(3), "req-1", ttl_s=60) == (3, True)
            assert store.read(user, max_events=100).stored_length == 3
    finally:
        store.close()

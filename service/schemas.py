"""Request and response bodies of the HTTP API (pydantic v2). These models are also the OpenAPI document.

Ids are JSON integers, as JSON Schema defines them: numbers without a fractional part (`7`, `7.0`, `7e0`; read by
`exact_number`, so `1.0000000000000001`, which a float parser rounds to 1.0, is a fraction) in the ranges the store
can hold, or the same number as a canonical decimal string (`"18446744073709551615"`, for clients whose JSON numbers
are float64): item_id 0..2**64-1 (64-bit hashed ids), category_id 0..2**32-1. timestamp is an integer 0..2**32-1
(Unix seconds; a value in milliseconds is refused with a hint). Booleans, fractions, NaN, infinities and other
strings are refused. Answers always give ids as JSON integers (exact: orjson writes 64-bit integers as digits).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from decimal import Decimal
from itertools import repeat
from typing import Annotated, Any

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictStr,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from service.store import MAX_CATEGORY_ID, MAX_ITEM_ID, MAX_TIMESTAMP

# The hard ceiling of the schema; the configured limit (DARE_MAX_USER_ID_LENGTH) is checked by the routes.
USER_ID_MAX_CHARS = 1024
MODEL_NAME_MAX_CHARS = 200
# POST /events' Idempotency-Key header: printable ASCII without spaces (a UUID, a hash, a client's request id).
IDEMPOTENCY_KEY_MAX_CHARS = 128
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]+$"
# A request id (the `request_id` body field or the X-Request-ID header): the same alphabet, so it is safe in logs.
REQUEST_ID_MAX_CHARS = 128
REQUEST_ID_PATTERN = IDEMPOTENCY_KEY_PATTERN
# Unix seconds reach 10**11 in the year 5138; a timestamp this large is in milliseconds (or finer).
_SUBSECOND_UNITS = ((10**17, "nanoseconds"), (10**14, "microseconds"), (10**11, "milliseconds"))


def exact_number(text: str) -> int | float:
    """`json.loads`' parse_float: a JSON number written with a fraction or an exponent, read from its text. A whole
    number (7.0, 1e3) becomes that int; anything else stays a float, which the (strict) integer fields refuse."""
    value = Decimal(text)
    if value.is_finite() and value.adjusted() < 20 and value == value.to_integral_value():  # adjusted: no 1e999999
        return int(value)
    return float(text)


_DIGITS = re.compile(r"0|[1-9][0-9]{0,19}")  # a decimal number as written canonically: no sign, space, leading zero


def _decimal_string(value: Any) -> Any:
    """An id given as a string of decimal digits becomes that int (range-checked next); other strings are refused."""
    if type(value) is str:
        if _DIGITS.fullmatch(value) is None:
            raise PydanticCustomError(
                "id_string", "a string id must be a decimal number without sign, spaces or leading zeros, got {text}",
                {"text": repr(value[:40])},
            )
        return int(value)
    return value


def at_most_pattern(maximum: int) -> str:
    """A regular expression for the canonical decimal numbers 0..maximum (the string form of an id, in the schema)."""
    top = str(maximum)
    alternatives = ["0", f"[1-9][0-9]{{0,{len(top) - 2}}}"] if len(top) > 1 else ["0"]
    for i, digit in enumerate(top):  # as many digits as the maximum: its prefix, then a smaller digit, then any
        low = 1 if i == 0 else 0
        if int(digit) > low:
            alternatives.append(f"{top[:i]}[{low}-{int(digit) - 1}][0-9]{{{len(top) - i - 1}}}")
    return "^(" + "|".join([*alternatives, top]) + ")$"


def _id_schema(maximum: int, what: str) -> WithJsonSchema:
    # exclusiveMaximum (maximum + 1): 2**64 - 1 is not a float, and a tool reading the bound as a float would take
    # 2**64 + 383 for valid; 2**64 and 2**32 are floats, exact.
    return WithJsonSchema({
        "anyOf": [{"type": "integer", "minimum": 0, "exclusiveMaximum": maximum + 1},
                  {"type": "string", "pattern": at_most_pattern(maximum)}],
        "description": f"{what}: an integer 0..{maximum}, or the same number as a decimal string",
    })  # fmt: skip


def _unix_seconds(value: int) -> int:
    if value > MAX_TIMESTAMP:
        unit = next((f" (Unix seconds expected; this looks like {name})" for bound, name in _SUBSECOND_UNITS
                     if value >= bound), " (Unix seconds)")  # fmt: skip
        raise PydanticCustomError("timestamp_range", "at most {maximum}{unit}", {"maximum": MAX_TIMESTAMP, "unit": unit})
    return value


# Strict: a float is refused (an integral JSON number reaches them as an int: `exact_number`).
ItemId = Annotated[int, Strict(), Field(ge=0, le=MAX_ITEM_ID), BeforeValidator(_decimal_string),
                   _id_schema(MAX_ITEM_ID, "raw item id")]  # fmt: skip
CategoryId = Annotated[int, Strict(), Field(ge=0, le=MAX_CATEGORY_ID), BeforeValidator(_decimal_string),
                       _id_schema(MAX_CATEGORY_ID, "raw category id")]  # fmt: skip
Timestamp = Annotated[int, Strict(), Field(ge=0), WrapValidator(lambda v, h: _unix_seconds(h(v))),
                      WithJsonSchema({"type": "integer", "minimum": 0, "maximum": MAX_TIMESTAMP,
                                      "description": "Unix seconds, 0..2**32-1 (milliseconds are refused)"})]  # fmt: skip
UserId = Annotated[StrictStr, Field(min_length=1, max_length=USER_ID_MAX_CHARS, description="any non-empty string")]
RequestId = Annotated[StrictStr, Field(min_length=1, max_length=REQUEST_ID_MAX_CHARS, pattern=REQUEST_ID_PATTERN,
                                       description="the client's id of this request (printable ASCII, no spaces): "
                                       "echoed in the answer and its X-Request-ID header, and on the service's log "
                                       "lines; takes precedence over the X-Request-ID header")]  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Candidate(_Strict):
    item_id: ItemId
    category_id: CategoryId


@dataclass(frozen=True)
class CandidateIds:
    """The candidates as two arrays ([C] each: item ids uint64, category ids int64), what validating `candidates`
    gives for well-formed input."""

    item_id: np.ndarray
    category_id: np.ndarray

    def __len__(self) -> int:
        return len(self.item_id)


_CANDIDATE_KEYS = {"item_id", "category_id"}
_ITEM_ID, _CATEGORY_ID = operator.itemgetter("item_id"), operator.itemgetter("category_id")


def _ints(ids: list[Any]) -> list[int] | None:
    """The ids as ints when all are ints (not bool, float, None) or all are strings of decimal digits, else None."""
    kinds = set(map(type, ids))
    if kinds == {int}:
        return ids
    if kinds == {str} and all(map(_DIGITS.fullmatch, ids)):
        return list(map(int, ids))
    return None


def _candidate_arrays(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Vectorised validation of the candidate list; anything it does not accept as is goes to pydantic.

    Per-id validation costs ~0.5 us per id (~0.1 ms for 200 candidates, on every /score). This accepts exactly the
    input pydantic would accept: a non-empty list of objects with the two keys only, whose ids are JSON integers
    (Python `int`, not `bool`) or strings of decimal digits, in range. Everything else runs through the full
    `list[Candidate]` validation, so the 422 messages name the offending fields (tests/service/test_schemas.py
    holds the two alike).
    """
    # map() and set() keep the per-candidate loops in C: a generator or comprehension costs ~3x more per id.
    if type(value) is not list or not value or set(map(type, value)) != {dict}:
        return handler(value)
    if not all(map(operator.eq, map(dict.keys, value), repeat(_CANDIDATE_KEYS))):  # exactly the two keys
        return handler(value)
    item_ids, cate_ids = _ints(list(map(_ITEM_ID, value))), _ints(list(map(_CATEGORY_ID, value)))
    if item_ids is None or cate_ids is None:
        return handler(value)
    try:  # uint64 holds exactly 0..MAX_ITEM_ID: anything outside raises
        items, cates = np.array(item_ids, dtype=np.uint64), np.array(cate_ids, dtype=np.int64)  # [C] each
    except OverflowError:
        return handler(value)
    if cates.min() < 0 or cates.max() > MAX_CATEGORY_ID:
        return handler(value)
    return CandidateIds(items, cates)


class ScoreRequest(_Strict):
    user_id: UserId
    # Validated to CandidateIds (well-formed input, vectorised) or, for input pydantic must check, list[Candidate].
    candidates: Annotated[list[Candidate], WrapValidator(_candidate_arrays)] = Field(
        min_length=1, description="at least one; at most DARE_MAX_CANDIDATES (default 1,000); duplicates are scored"
    )
    model: Annotated[StrictStr, Field(min_length=1, max_length=MODEL_NAME_MAX_CHARS)] | None = Field(
        None, description="a loaded model's name (GET /models); default: the service's default model"
    )
    explain: StrictBool = Field(False, description="also return the top-K retrieved behaviours per candidate")
    request_id: RequestId | None = None

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user_id": "1",
                    "candidates": [
                        {"item_id": 2268318, "category_id": 2520377},
                        {"item_id": 2333346, "category_id": 2520771},
                    ],
                }
            ]
        },
    )


class RetrievedBehaviour(BaseModel):
    item_id: int
    category_id: int
    timestamp: int
    position: int = Field(description="1 = the most recent behaviour used")
    weight: float = Field(description="softmax weight over the retrieved top-K")


class ScoreResponse(BaseModel):
    request_id: str = Field(description="the client's request_id or X-Request-ID, else one the service generated")
    user_id: str
    model: str
    version: str
    scores: list[float] = Field(description="click probability per candidate, in request order")
    history_length: int = Field(description="events of the user's history used (at most DARE_MAX_HISTORY)")
    stored_length: int = Field(description="events stored for the user")
    cold_start: bool = Field(description="the user has no stored history (scored from an empty one)")
    degraded: bool = Field(description="the store failed and the scores come from an empty history")
    timings_ms: dict[str, float] = Field(description="store_fetch, id_mapping, search, scoring")
    explain: list[list[RetrievedBehaviour]] | None = Field(
        None, description="with explain=true: per candidate, the retrieved behaviours (padding left out)"
    )


class Event(_Strict):
    item_id: ItemId
    category_id: CategoryId
    timestamp: Timestamp | None = Field(None, description="default: the time the service receives the request")


class EventsRequest(_Strict):
    user_id: UserId
    events: list[Event] = Field(
        min_length=1, description="oldest first; at most DARE_MAX_EVENTS_PER_REQUEST (default 10,000)"
    )
    request_id: RequestId | None = None


class EventsResponse(BaseModel):
    request_id: str = Field(description="the client's request_id or X-Request-ID, else one the service generated")
    user_id: str
    appended: int = Field(description="events this request appended (0 when replayed)")
    length: int = Field(description="events stored for the user after the append and the trim")
    replayed: bool = Field(
        False, description="the Idempotency-Key was seen before for this user: nothing was appended by this request"
    )


class StoredEvent(BaseModel):
    item_id: int
    category_id: int
    timestamp: int


class HistoryResponse(BaseModel):
    request_id: str = Field(description="the client's X-Request-ID, else one the service generated")
    user_id: str
    exists: bool
    length: int = Field(description="events stored for the user")
    events: list[StoredEvent] = Field(description="the most recent `limit` events, oldest first")


class ModelInfo(BaseModel):
    name: str
    version: str
    kind: str
    att_dim: int
    repr_dim: int
    top_k: int
    max_position: int
    item_rows: int
    cate_rows: int
    opset: int
    metrics: dict[str, float | int | None]
    data_fingerprint: str
    code_version: str
    created_at: str
    loaded_at: str
    default: bool


class ModelsResponse(BaseModel):
    default: str | None
    models: list[ModelInfo]
    traffic_split: dict[str, float] | None = Field(
        None, description="model -> weight of the traffic split serving requests that name no model (none: the default)"
    )
    shadow_model: str | None = Field(None, description="the model that shadow-scores requests (never returned)")


class ReloadResponse(BaseModel):
    loaded: list[str]
    unchanged: list[str]
    removed: list[str]
    rejected: dict[str, str] = Field(description="folder name -> why it was rejected (the old version, if any, serves)")
    default: str | None
    traffic_split: dict[str, float] | None = Field(None, description="the traffic split now serving (model -> weight)")
    shadow_model: str | None = Field(None, description="the shadow model now serving")
    traffic_error: str | None = Field(
        None, description="why the configured split / shadow was rejected (the previous one keeps serving)"
    )


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    store: str = Field(description='"ok" or "unavailable" (the reason is in the service log)')
    models: int = Field(description="models loaded")


class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer: a stable machine-readable `error` code and a human `detail`."""

    error: str = Field(description="the error code (README, API: the table of every code and its status)")
    detail: str
    request_id: str = Field(description="the client's request_id or X-Request-ID, else one the service generated")
    fields: list[FieldError] | None = Field(None, description="for 422: each offending field and what is wrong")

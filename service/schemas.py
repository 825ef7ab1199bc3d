"""Request and response bodies of the HTTP API (pydantic v2). These models are also the OpenAPI document.

Ids are JSON integers (whole numbers; 7.0 counts as 7, as in JSON Schema; strings, booleans, fractions, NaN and
infinities are rejected) in the ranges the store can hold:
item_id 0..2**53-1 (exact in every JSON parser), category_id 0..2**32-1, timestamp 0..2**32-1 (Unix seconds).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from itertools import repeat
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictBool, StrictStr, ValidatorFunctionWrapHandler, WrapValidator

from service.store import MAX_CATEGORY_ID, MAX_ITEM_ID, MAX_TIMESTAMP

try:
    from service import _ids  # the compiled candidate check (service/_ids.c), optional
except ImportError:  # pragma: no cover - built by every install with a C compiler
    _ids = None

# The hard ceiling of the schema; the configured limit (DARE_MAX_USER_ID_LENGTH) is checked by the routes.
USER_ID_MAX_CHARS = 1024
MODEL_NAME_MAX_CHARS = 200
# POST /events' Idempotency-Key header: printable ASCII without spaces (a UUID, a hash, a client's request id).
IDEMPOTENCY_KEY_MAX_CHARS = 128
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]+$"

def _json_integer(value: object) -> object:
    """JSON Schema's "integer": a number with no fractional part (so 7.0 is 7); never a string or a boolean."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a JSON integer, got {type(value).__name__}")
    if isinstance(value, float):
        if not value.is_integer():  # also NaN and infinities
            raise ValueError(f"must be a whole number, got {value!r}")
        return int(value)
    return value


ItemId = Annotated[
    int, Strict(), Field(ge=0, le=MAX_ITEM_ID, description="raw item id, 0..2**53-1"), BeforeValidator(_json_integer)
]
CategoryId = Annotated[
    int, Strict(), Field(ge=0, le=MAX_CATEGORY_ID, description="raw category id, 0..2**32-1"), BeforeValidator(_json_integer)
]
Timestamp = Annotated[
    int, Strict(), Field(ge=0, le=MAX_TIMESTAMP, description="Unix seconds, 0..2**32-1"), BeforeValidator(_json_integer)
]
UserId = Annotated[StrictStr, Field(min_length=1, max_length=USER_ID_MAX_CHARS, description="any non-empty string")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Candidate(_Strict):
    item_id: ItemId
    category_id: CategoryId


@dataclass(frozen=True)
class CandidateIds:
    """The candidates as two int64 arrays ([C] each), what validating `candidates` gives for well-formed input."""

    item_id: np.ndarray
    category_id: np.ndarray

    def __len__(self) -> int:
        return len(self.item_id)


_CANDIDATE_KEYS = {"item_id", "category_id"}
_ITEM_ID, _CATEGORY_ID = operator.itemgetter("item_id"), operator.itemgetter("category_id")


def _candidate_arrays(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Vectorised validation of the candidate list; anything it does not accept as is goes to pydantic.

    Per-id validation costs ~0.5 us per id in Python (~0.1 ms for 100 candidates, on every /score). The fast path
    accepts exactly the input pydantic would accept unchanged: a list of objects with the two keys only, whose ids
    are JSON integers (Python `int`, not `bool`) in range. Everything else (fractions, 7.0, strings, missing or extra
    keys, out-of-range ids, an empty list) runs through the full `list[Candidate]` validation, so the 422 messages
    name the same fields as before. service/_ids.c applies this rule in one C loop where it was built (round 9);
    `_candidate_arrays_py` is the same in Python.
    """
    if _ids is None:
        return _candidate_arrays_py(value, handler)
    found = _ids.candidate_ids(value, MAX_ITEM_ID, MAX_CATEGORY_ID)
    if found is None:
        return handler(value)
    return CandidateIds(np.frombuffer(found[0], dtype=np.int64), np.frombuffer(found[1], dtype=np.int64))


def _candidate_arrays_py(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # map() and set() keep the per-candidate loops in C: a generator or comprehension costs ~3x more per id.
    if type(value) is not list or not value or set(map(type, value)) != {dict}:
        return handler(value)
    if not all(map(operator.eq, map(dict.keys, value), repeat(_CANDIDATE_KEYS))):  # exactly the two keys
        return handler(value)
    item_ids, cate_ids = list(map(_ITEM_ID, value)), list(map(_CATEGORY_ID, value))
    if set(map(type, item_ids)) != {int} or set(map(type, cate_ids)) != {int}:  # excludes bool, float, None, str
        return handler(value)
    try:
        items, cates = np.array(item_ids, dtype=np.int64), np.array(cate_ids, dtype=np.int64)  # [C] each
    except OverflowError:
        return handler(value)
    if items.min() < 0 or items.max() > MAX_ITEM_ID or cates.min() < 0 or cates.max() > MAX_CATEGORY_ID:
        return handler(value)
    return CandidateIds(items, cates)


class ScoreRequest(_Strict):
    user_id: UserId
    # Validated to CandidateIds (the fast path) or, for input that needs conversion, to list[Candidate].
    candidates: Annotated[list[Candidate], WrapValidator(_candidate_arrays)] = Field(
        min_length=1, description="at least one; at most DARE_MAX_CANDIDATES (default 1,000); duplicates are scored"
    )
    model: Annotated[StrictStr, Field(min_length=1, max_length=MODEL_NAME_MAX_CHARS)] | None = Field(
        None, description="a loaded model's name (GET /models); default: the service's default model"
    )
    explain: StrictBool = Field(False, description="also return the top-K retrieved behaviours per candidate")

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


_REQUEST_KEYS = frozenset(ScoreRequest.model_fields)


def parse_score_request(data: Any) -> ScoreRequest:
    """`ScoreRequest.model_validate(data)` (raising its ValidationError), with the common case checked here first:
    the keys, user_id, model and explain by their types and lengths, the candidates by service/_ids.c. A body this
    check accepts is one the schema accepts unchanged, so it is built without running pydantic's validators, which
    cost ~0.1 ms with the caches cold after a scoring call (docs/performance.md, round 9); anything else is
    validated by the schema. tests/service/test_schemas.py holds the two to the same answers."""
    if type(data) is dict and _ids is not None and data.keys() <= _REQUEST_KEYS:
        user_id, model, explain = data.get("user_id"), data.get("model"), data.get("explain", False)
        if (
            type(user_id) is str
            and 0 < len(user_id) <= USER_ID_MAX_CHARS
            and (model is None or (type(model) is str and 0 < len(model) <= MODEL_NAME_MAX_CHARS))
            and type(explain) is bool
        ):
            found = _ids.candidate_ids(data.get("candidates"), MAX_ITEM_ID, MAX_CATEGORY_ID)
            if found is not None:
                candidates = CandidateIds(np.frombuffer(found[0], dtype=np.int64), np.frombuffer(found[1], dtype=np.int64))
                return ScoreRequest.model_construct(user_id=user_id, candidates=candidates, model=model, explain=explain)
    return ScoreRequest.model_validate(data)


class RetrievedBehaviour(BaseModel):
    item_id: int
    category_id: int
    timestamp: int
    position: int = Field(description="1 = the most recent behaviour used")
    weight: float = Field(description="softmax weight over the retrieved top-K")


class ScoreResponse(BaseModel):
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


class EventsResponse(BaseModel):
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


class ReloadResponse(BaseModel):
    loaded: list[str]
    unchanged: list[str]
    removed: list[str]
    rejected: dict[str, str] = Field(description="folder name -> why it was rejected (the old version, if any, serves)")
    default: str | None


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    store: str = Field(description='"ok" or why the store is not reachable')
    models: int = Field(description="models loaded")


class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer: a stable machine-readable `error` code and a human `detail`."""

    error: str = Field(description="e.g. invalid_request, limit_exceeded, unauthorized, unknown_model, store_unavailable")
    detail: str
    fields: list[FieldError] | None = Field(None, description="for 422: each offending field and what is wrong")

"""POST /events and GET /users/{user_id}/history: writing to and reading the sequence store."""

from __future__ import annotations

import time
from functools import partial
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Header, Path, Query, Request
from starlette.convertors import Convertor, register_url_convertor

from service.api.deps import ApiAuth, ExactNumbersRoute, ServicesDep
from service.api.request_id import use_request_id
from service.api.responses import errors
from service.api.routes.scoring import check_user_id
from service.errors import LimitExceededError
from service.schemas import (
    IDEMPOTENCY_KEY_MAX_CHARS,
    IDEMPOTENCY_KEY_PATTERN,
    USER_ID_MAX_CHARS,
    EventsRequest,
    EventsResponse,
    HistoryResponse,
    StoredEvent,
)
from service.store import make_events

router = APIRouter(tags=["sequences"], route_class=ExactNumbersRoute)


class UserIdConvertor(Convertor[str]):
    """A path segment that may hold any character, slashes and newlines included (percent-encoded by the client,
    decoded before routing): Starlette's `str` stops at a slash and its `path` at a newline."""

    regex = "(?s:.+)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("user_id", UserIdConvertor())


def default_history_limit(max_history: int) -> int:
    """`limit` of GET /users/{user_id}/history when the request gives none."""
    return min(100, max_history)


@router.post(
    "/events",
    response_model=EventsResponse,
    responses=errors(400, 401, 413, 415, 422, 500, 503),
    dependencies=[ApiAuth],
    summary="Append behaviours to a user's sequence (atomic; trimmed to the lifelong maximum)",
)
async def append_events(
    body: EventsRequest,
    services: ServicesDep,
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key", min_length=1, max_length=IDEMPOTENCY_KEY_MAX_CHARS, pattern=IDEMPOTENCY_KEY_PATTERN,
            description="optional; a retry with the same key (same user, within DARE_IDEMPOTENCY_TTL_S) appends nothing "
            "and answers `replayed: true`, so a client can safely retry after a timeout or a 503",
        ),
    ] = None,
) -> EventsResponse:
    use_request_id(request.state, body.request_id)
    settings = services.settings
    check_user_id(body.user_id, settings.max_user_id_length)
    n = len(body.events)
    if n > settings.max_events_per_request:
        raise LimitExceededError(
            "events", f"at most {settings.max_events_per_request} events per request (DARE_MAX_EVENTS_PER_REQUEST), got {n}"
        )
    now = int(time.time())
    events = make_events(
        np.fromiter((e.item_id for e in body.events), dtype=np.uint64, count=n),
        np.fromiter((e.category_id for e in body.events), dtype=np.int64, count=n),
        np.fromiter((now if e.timestamp is None else e.timestamp for e in body.events), dtype=np.int64, count=n),
    )
    if idempotency_key is None:
        length = await services.blocking.run(partial(services.store.append, body.user_id, events), what="append", key=body.user_id)
        replayed = False
    else:
        length, replayed = await services.blocking.run(
            partial(services.store.append_once, body.user_id, events, idempotency_key, settings.idempotency_ttl_s),
            what="append",
            key=body.user_id,
        )
    if replayed:
        services.metrics.events_replayed.inc()
        return EventsResponse(request_id=request.state.request_id, user_id=body.user_id, appended=0, length=length,
                              replayed=True)  # fmt: skip
    services.metrics.events_appended.inc(n)
    return EventsResponse(request_id=request.state.request_id, user_id=body.user_id, appended=n, length=length)


@router.get(
    "/users/{user_id:user_id}/history",
    response_model=HistoryResponse,
    responses=errors(401, 422, 500, 503),
    dependencies=[ApiAuth],
    summary="A user's stored sequence length and most recent events (for debugging and checks)",
)
async def history(
    services: ServicesDep,
    request: Request,
    user_id: Annotated[str, Path(min_length=1, max_length=USER_ID_MAX_CHARS)],
    limit: Annotated[
        int | None,
        Query(ge=0, description="most recent events to return (default 100, at most DARE_MAX_HISTORY)"),
    ] = None,
) -> HistoryResponse:
    settings = services.settings
    check_user_id(user_id, settings.max_user_id_length)
    if limit is None:
        # The default must respect the configured maximum, or a request without parameters would be refused.
        limit = default_history_limit(settings.max_history)
    if limit > settings.max_history:
        raise LimitExceededError("limit", f"at most {settings.max_history} (DARE_MAX_HISTORY), got {limit}")
    hist = await services.blocking.run(partial(services.store.read, user_id, limit), what="history read", key=user_id)
    events = [
        StoredEvent(item_id=i, category_id=c, timestamp=t)
        for i, c, t in zip(
            hist.events["item_id"].tolist(), hist.events["category_id"].tolist(), hist.events["timestamp"].tolist()
        )
    ]
    return HistoryResponse(request_id=request.state.request_id, user_id=user_id, exists=hist.exists,
                           length=hist.stored_length, events=events)  # fmt: skip

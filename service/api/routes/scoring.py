"""POST /score: the FastAPI route (the OpenAPI document, and every request the fast path hands over) and
`ScoreFastPath`, the same endpoint without FastAPI: a pure-ASGI handler in front of it, and the core of `dare serve`'s
HTTP protocol (service/api/protocol.py), which calls it below the ASGI round.

Why two: FastAPI's routing, dependency solving, stdlib JSON parsing and response machinery cost 0.15 ms (W1: N=200,
C=100) to 0.5 ms (W2: C=200) per request on the 2-core machine (docs/performance.md, round 3). The fast path answers
the common case, a well-formed JSON request, with the same validation (`ScoreRequest`, through
`parse_score_request`), the same checks (`checked_request`), the same scoring call (`score_request`) and the same
error bodies (`service_error_response`).
Anything else (not `application/json`, a wrong or missing bearer token, JSON orjson refuses, a body `ScoreRequest`
rejects) goes to the FastAPI route unchanged, with the body replayed, so every 4xx is produced in one place.
`DARE_SCORE_FAST_PATH=false` routes every request through FastAPI (identical answers: tests/service/test_fast_path.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnxruntime as ort
import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.concurrency import run_blocking
from service.api.deps import ApiAuth, Services, ServicesDep, bearer_matches
from service.api.middleware import replay_body
from service.api.responses import JSON_OPTIONS, OrjsonResponse, error_response, errors, service_error_response
from service.engine import ScoreResult
from service.metrics import ServiceMetrics
from service.errors import LimitExceededError, RequestTimeoutError, ServiceError
from service.registry import LoadedModel
from service.schemas import CandidateIds, ScoreRequest, ScoreResponse, parse_score_request
from service.store import PendingRead

log = logging.getLogger("service")
router = APIRouter(tags=["scoring"])


def check_user_id(user_id: str, max_length: int) -> None:
    if len(user_id) > max_length:
        raise LimitExceededError("user_id", f"at most {max_length} characters (DARE_MAX_USER_ID_LENGTH), got {len(user_id)}")


def checked_request(body: ScoreRequest, services: Services) -> tuple[LoadedModel, np.ndarray, np.ndarray]:
    """The configured limits and the model (404 / 503) before any work; the candidates as int64 arrays [C]."""
    settings = services.settings
    check_user_id(body.user_id, settings.max_user_id_length)
    n = len(body.candidates)
    if n > settings.max_candidates:
        raise LimitExceededError(
            "candidates", f"at most {settings.max_candidates} candidates per request (DARE_MAX_CANDIDATES), got {n}"
        )
    model = services.registry.current.get(body.model)
    if isinstance(body.candidates, CandidateIds):  # the schema's vectorised path: already int64 arrays
        return model, body.candidates.item_id, body.candidates.category_id
    items = np.fromiter((c.item_id for c in body.candidates), dtype=np.int64, count=n)  # [C]
    cates = np.fromiter((c.category_id for c in body.candidates), dtype=np.int64, count=n)  # [C]
    return model, items, cates


def inline_allowed(services: Services) -> bool:
    """Whether a small request may run on the event loop now: enabled, an asyncio store client, and no other
    blocking work running in the process (under concurrency, requests spread over the worker threads and cores)."""
    return (
        services.settings.inline_max_pairs > 0
        and services.store.async_client is not None
        and services.blocking.busy == 0
    )


def start_prefetch(services: Services, data: object) -> PendingRead | None:
    """Start reading the user's history before the rest of the request is validated (the fast path; see
    `score_request`): the read's commands are on their way to the store when this returns, or None when the request
    will not read on the loop or names no usable user id.

    The read is the same read-only MULTI/EXEC `score_request` would issue next; a request that then fails validation
    abandons it (`cancel_prefetch`)."""
    if type(data) is not dict or not inline_allowed(services):
        return None
    user_id = data.get("user_id")
    if type(user_id) is not str or not 0 < len(user_id) <= services.settings.max_user_id_length:
        return None
    return services.engine.begin_afetch(user_id)


def cancel_prefetch(prefetch: PendingRead | None) -> None:
    if prefetch is not None:
        prefetch.abandon()


async def score_request(
    services: Services,
    body: ScoreRequest,
    model: LoadedModel,
    items: np.ndarray,
    cates: np.ndarray,
    prefetch: PendingRead | None = None,
) -> dict[str, object]:
    """Score and build the response body. A small request (history x candidates <= DARE_INLINE_MAX_PAIRS) that finds
    no other blocking work running stays on the event loop: its store read through the asyncio client (a stalled
    store holds up this request, not the loop), its graphs inline (~1 ms at most), saving the hand-off to a worker
    thread and back (docs/performance.md, round 5). `prefetch` is that read already started by the fast path before
    the body was validated, so the Redis round trip overlaps the validation (rounds 6 and 9). Everything else runs in a
    worker thread, bounded in number and time, which lets concurrent requests use every core. The whole call is
    bounded by DARE_REQUEST_TIMEOUT_S."""
    engine, settings = services.engine, services.settings
    fetched = None
    timeout = settings.request_timeout_s
    if prefetch is not None or inline_allowed(services):
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                fetched = await engine.afetch(body.user_id, prefetch)
        except TimeoutError:
            raise RequestTimeoutError(
                f"the store read did not finish within DARE_REQUEST_TIMEOUT_S ({timeout:g} s)"
            ) from None
        if len(fetched.history.events) * len(items) <= settings.inline_max_pairs:
            result = engine.score(body.user_id, items, cates, model=model, fetched=fetched)
            return score_body(body.user_id, result, explain=body.explain)
        timeout -= time.monotonic() - started  # what the store read left of the request's time
    run_options = ort.RunOptions()
    result = await run_blocking(
        services,
        partial(engine.score, body.user_id, items, cates, model=model, run_options=run_options, fetched=fetched),
        what="scoring",
        run_options=run_options,
        timeout=timeout,
    )
    return score_body(body.user_id, result, explain=body.explain)


@router.post(
    "/score",
    response_model=ScoreResponse,
    responses=errors(400, 401, 404, 413, 422, 500, 503),
    dependencies=[ApiAuth],
    summary="Click probabilities of candidates for one user",
)
async def score(body: ScoreRequest, services: ServicesDep, request: Request) -> OrjsonResponse:
    model, items, cates = checked_request(body, services)
    request.state.model = model.name
    return OrjsonResponse(await score_request(services, body, model, items, cates))


@dataclass
class Prepared:
    """A POST /score body the fast path takes: validated, checked, and its store read on its way (or the service
    error the checks raised, answered as such)."""

    body: ScoreRequest | None = None
    model: LoadedModel | None = None
    items: np.ndarray | None = None
    cates: np.ndarray | None = None
    prefetch: PendingRead | None = None
    error: ServiceError | None = None


class ScoreFastPath:
    """`POST /score` for well-formed JSON requests without FastAPI, in two places: as pure ASGI, called by
    `service.main.DareApp` *before* FastAPI's middleware stack, and from `dare serve`'s HTTP protocol
    (`service.api.protocol.ScoreHttpProtocol`), which skips the ASGI round as well. Both use `prepare` (parse,
    start the store read, validate, check) and `answer` (score, render), so they answer alike. It applies what the
    stack would: the body size limit (it takes only requests whose Content-Length is within DARE_MAX_BODY_BYTES;
    the others go to the stack, which answers 413), the request-duration histogram (observed here for the requests
    it answers; the stack's RequestMetrics observes the ones it hands over), the service's error bodies, and a
    logged JSON 500 for an unexpected error.

    Skipping the stack's seven ASGI layers (FastAPI's and Starlette's own included) and their send wrappers is part
    of what round 6 took off the service's own code (docs/bench/asgi_overhead.py; docs/performance.md, round 6). With DARE_SCORE_FAST_PATH=false every
    request goes through FastAPI, including FastAPI's native OpenTelemetry instrumentation when it is configured."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, max_body_bytes: int) -> None:
        self.app = app  # the full stack: FastAPI's middleware, routing and the FastAPI route
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    def takes(self, scope: Scope) -> bool:
        """A POST /score with a JSON body of a declared length within the limit (the rest: the full stack)."""
        if scope["type"] != "http" or scope["path"] != "/score" or scope["method"] != "POST" or not _is_json(scope):
            return False
        declared = _header(scope, b"content-length")
        return declared is not None and declared.isdigit() and int(declared) <= self.max_body_bytes

    def authorized(self, scope: Scope, services: Services) -> bool:
        """The check of `require_api_token`; a request that fails it goes to FastAPI for the 401."""
        token = services.settings.api_token
        # Header values decoded as Starlette decodes them (latin-1), so both paths compare the same string.
        return token is None or bearer_matches((_header(scope, b"authorization") or b"").decode("latin-1"), token)

    def prepare(self, services: Services, raw: bytes | bytearray) -> Prepared | None:
        """Parse and validate a body; None hands the request to FastAPI (which answers with the 422 naming the
        fields). The store read starts (is sent) before the validation, which it overlaps (~0.05-0.15 ms for 100
        candidates)."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        prefetch = start_prefetch(services, data)
        try:
            body = parse_score_request(data)
            model, items, cates = checked_request(body, services)
        except ValidationError:
            cancel_prefetch(prefetch)
            return None
        except ServiceError as exc:
            cancel_prefetch(prefetch)
            return Prepared(error=exc)
        except BaseException:
            cancel_prefetch(prefetch)
            raise
        return Prepared(body, model, items, cates, prefetch)

    async def answer(self, services: Services, prepared: Prepared) -> tuple[int, list[tuple[bytes, bytes]], bytes, str]:
        """Status, headers, body and model name of the answer to a prepared request."""
        body, model = prepared.body, prepared.model
        model_name = model.name if model is not None else ""
        try:
            if prepared.error is not None:
                raise prepared.error
            assert body is not None and model is not None and prepared.items is not None and prepared.cates is not None
            result = await score_request(services, body, model, prepared.items, prepared.cates, prepared.prefetch)
            payload = orjson.dumps(result, option=JSON_OPTIONS)
        except ServiceError as exc:
            response = service_error_response(exc, "POST", "/score")
        except Exception:
            log.exception("unhandled error on POST /score")
            response = error_response(500, "internal_error", "internal error (see the service log)")
        else:
            return 200, [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))], payload, model_name
        return response.status_code, response.raw_headers, bytes(response.body), model_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        services: Services = scope["app"].state.services
        if not self.authorized(scope, services):
            await self.app(scope, receive, send)  # FastAPI's dependency answers the 401
            return
        raw = await _read_body(receive)
        if raw is None:  # the client went away
            self.observe("", 500, started)
            return
        prepared = self.prepare(services, raw)
        if prepared is None:
            await self.app(scope, replay_body(raw, receive), send)
            return
        status, headers, payload, model_name = await self.answer(services, prepared)
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
        finally:
            self.observe(model_name, status, started)

    def observe(self, model: str, status: int, started: float) -> None:
        self.metrics.request_series("/score", "POST", model, str(status)).observe(time.perf_counter() - started)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _is_json(scope: Scope) -> bool:
    content_type = _header(scope, b"content-type")
    return content_type is not None and content_type.split(b";", 1)[0].strip().lower() == b"application/json"


async def _read_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def score_body(user_id: str, result: ScoreResult, *, explain: bool) -> dict[str, object]:
    body: dict[str, object] = {
        "user_id": user_id,
        "model": result.model.name,
        "version": result.model.manifest.version,
        "scores": result.probs,  # float32 [C], serialised by orjson as is
        "history_length": len(result.history),
        "stored_length": result.stored_length,
        "cold_start": result.cold_start,
        "degraded": result.degraded,
        "timings_ms": {k: round(v * 1000.0, 4) for k, v in result.timings.items()},
        "explain": explain_behaviours(result) if explain else None,
    }
    return body


def explain_behaviours(result: ScoreResult) -> list[list[dict[str, object]]]:
    """Per candidate, the retrieved history behaviours with raw ids, timestamps, positions and weights."""
    assert result.topk_index is not None and result.topk_weight is not None
    history = result.history
    n = len(history)
    index = result.topk_index  # [C, K], -1 = padding
    valid = index >= 0  # [C, K]
    if n == 0:
        return [[] for _ in range(len(index))]
    safe = np.where(valid, index, 0)  # [C, K]
    items = history["item_id"][safe].tolist()
    cates = history["category_id"][safe].tolist()
    stamps = history["timestamp"][safe].tolist()
    positions = (n - safe).tolist()  # most recent = 1
    weights = result.topk_weight.tolist()
    keep = valid.tolist()
    return [
        [
            {"item_id": it, "category_id": ca, "timestamp": ts, "position": po, "weight": we}
            for it, ca, ts, po, we, ok in zip(items[c], cates[c], stamps[c], positions[c], weights[c], keep[c])
            if ok
        ]
        for c in range(len(index))
    ]

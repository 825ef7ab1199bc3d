"""POST /score: validate the body (the schema), check the limits and the model, read the history, score."""

from __future__ import annotations

from functools import partial

import numpy as np
import onnxruntime as ort
from fastapi import APIRouter, Request

from service.api.deps import ApiAuth, ExactNumbersRoute, Services, ServicesDep
from service.api.request_id import use_request_id
from service.api.responses import OrjsonResponse, errors
from service.engine import ScoreResult
from service.errors import LimitExceededError
from service.registry import LoadedModel
from service.schemas import CandidateIds, ScoreRequest, ScoreResponse

router = APIRouter(tags=["scoring"], route_class=ExactNumbersRoute)


def check_user_id(user_id: str, max_length: int) -> None:
    if len(user_id) > max_length:
        raise LimitExceededError("user_id", f"at most {max_length} characters (DARE_MAX_USER_ID_LENGTH), got {len(user_id)}")


def checked_request(body: ScoreRequest, services: Services) -> tuple[LoadedModel, np.ndarray, np.ndarray]:
    """The configured limits and the model (404 / 503; the traffic split's when the body names none) before any
    work; the candidates as arrays [C] (item ids uint64, category ids int64)."""
    settings = services.settings
    check_user_id(body.user_id, settings.max_user_id_length)
    n = len(body.candidates)
    if n > settings.max_candidates:
        raise LimitExceededError(
            "candidates", f"at most {settings.max_candidates} candidates per request (DARE_MAX_CANDIDATES), got {n}"
        )
    model, by = services.registry.current.route(body.model, body.user_id)
    if by == "split":
        services.metrics.split_series(model.name).inc()
    if isinstance(body.candidates, CandidateIds):  # the schema's vectorised path: already arrays
        return model, body.candidates.item_id, body.candidates.category_id
    items = np.fromiter((c.item_id for c in body.candidates), dtype=np.uint64, count=n)  # [C]
    cates = np.fromiter((c.category_id for c in body.candidates), dtype=np.int64, count=n)  # [C]
    return model, items, cates


@router.post(
    "/score",
    response_model=ScoreResponse,
    responses=errors(400, 401, 404, 413, 415, 422, 500, 503),
    dependencies=[ApiAuth],
    summary="Click probabilities of candidates for one user",
)
async def score(body: ScoreRequest, services: ServicesDep, request: Request) -> OrjsonResponse:
    """The body is valid and the limits hold before the store is touched. Then one worker thread reads the history
    and runs both graphs, the whole request within DARE_REQUEST_TIMEOUT_S; one user holds at most half of the
    workers (`BlockingPool`), so a user whose reads stall does not hold up the others."""
    use_request_id(request.state, body.request_id)
    snapshot = services.registry.current
    model, items, cates = checked_request(body, services)
    request.state.model = model.name
    run_options = ort.RunOptions()
    result = await services.blocking.run(
        partial(services.engine.score, body.user_id, items, cates, model=model, run_options=run_options),
        what="scoring",
        key=body.user_id,
        run_options=run_options,
    )
    if services.tracing is not None:
        services.tracing.score_spans(result, "request" if body.model is not None else "split" if snapshot.routing.split else "default")
    if snapshot.routing.shadow is not None and services.shadow is not None:
        shadow = snapshot.shadow_for(model)
        if shadow is not None:
            services.shadow.offer(shadow, result, items, cates)
    return OrjsonResponse(score_body(body.user_id, result, explain=body.explain, request_id=request.state.request_id))


def score_body(user_id: str, result: ScoreResult, *, explain: bool, request_id: str) -> dict[str, object]:
    body: dict[str, object] = {
        "request_id": request_id,
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

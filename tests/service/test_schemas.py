"""POST /score's quick body checks give the schema's answers: `parse_score_request` (checks in Python, candidates in
service/_ids.c) against `ScoreRequest.model_validate`, and the compiled candidate check against the Python one."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from service import schemas
from service.schemas import MAX_CATEGORY_ID, MAX_ITEM_ID, CandidateIds, ScoreRequest, parse_score_request

OK = [{"item_id": 1, "category_id": 2}, {"item_id": MAX_ITEM_ID, "category_id": MAX_CATEGORY_ID}, {"category_id": 0, "item_id": 0}]

BODIES: list[tuple[str, Any]] = [
    ("plain", {"user_id": "alice", "candidates": OK}),
    ("all fields", {"user_id": "alice", "candidates": OK, "model": "dare-a", "explain": True}),
    ("model null", {"user_id": "alice", "candidates": OK, "model": None, "explain": False}),
    ("longest user id", {"user_id": "u" * schemas.USER_ID_MAX_CHARS, "candidates": OK}),
    ("user id too long", {"user_id": "u" * (schemas.USER_ID_MAX_CHARS + 1), "candidates": OK}),
    ("empty user id", {"user_id": "", "candidates": OK}),
    ("int user id", {"user_id": 7, "candidates": OK}),
    ("non-ASCII user id", {"user_id": "üser ✓", "candidates": OK}),
    ("longest model", {"user_id": "a", "candidates": OK, "model": "m" * schemas.MODEL_NAME_MAX_CHARS}),
    ("model too long", {"user_id": "a", "candidates": OK, "model": "m" * (schemas.MODEL_NAME_MAX_CHARS + 1)}),
    ("empty model", {"user_id": "a", "candidates": OK, "model": ""}),
    ("model int", {"user_id": "a", "candidates": OK, "model": 3}),
    ("explain int", {"user_id": "a", "candidates": OK, "explain": 1}),
    ("explain string", {"user_id": "a", "candidates": OK, "explain": "true"}),
    ("explain null", {"user_id": "a", "candidates": OK, "explain": None}),
    ("extra key", {"user_id": "a", "candidates": OK, "debug": True}),
    ("no user", {"candidates": OK}),
    ("no candidates", {"user_id": "a"}),
    ("not a dict", [("user_id", "a")]),
    ("ordered dict", OrderedDict(user_id="a", candidates=OK)),
    ("empty candidates", {"user_id": "a", "candidates": []}),
    ("candidates not a list", {"user_id": "a", "candidates": {"item_id": 1, "category_id": 2}}),
    ("candidates tuple", {"user_id": "a", "candidates": tuple(OK)}),
    ("bool id", {"user_id": "a", "candidates": [{"item_id": True, "category_id": 2}]}),
    ("whole float id", {"user_id": "a", "candidates": [{"item_id": 7.0, "category_id": 2}]}),
    ("fraction id", {"user_id": "a", "candidates": [{"item_id": 7.5, "category_id": 2}]}),
    ("string id", {"user_id": "a", "candidates": [{"item_id": "7", "category_id": 2}]}),
    ("null id", {"user_id": "a", "candidates": [{"item_id": None, "category_id": 2}]}),
    ("negative id", {"user_id": "a", "candidates": [{"item_id": -1, "category_id": 2}]}),
    ("item id above range", {"user_id": "a", "candidates": [{"item_id": MAX_ITEM_ID + 1, "category_id": 2}]}),
    ("category above range", {"user_id": "a", "candidates": [{"item_id": 1, "category_id": MAX_CATEGORY_ID + 1}]}),
    ("beyond int64", {"user_id": "a", "candidates": [{"item_id": 2**64, "category_id": 2}]}),
    ("missing key", {"user_id": "a", "candidates": [{"item_id": 1}]}),
    ("other key", {"user_id": "a", "candidates": [{"item_id": 1, "category": 2}]}),
    ("extra candidate key", {"user_id": "a", "candidates": [{"item_id": 1, "category_id": 2, "x": 0}]}),
    ("candidate not a dict", {"user_id": "a", "candidates": [[1, 2]]}),
    ("bad one among good", {"user_id": "a", "candidates": [*OK, {"item_id": 1, "category_id": -2}, *OK]}),
]


def _as_pairs(candidates: Any) -> list[tuple[int, int]]:
    if isinstance(candidates, CandidateIds):
        return list(zip(candidates.item_id.tolist(), candidates.category_id.tolist()))
    return [(c.item_id, c.category_id) for c in candidates]


def _outcome(parse: Any, data: Any) -> Any:
    try:
        body = parse(data)
    except ValidationError as exc:
        return ("invalid", [(e["loc"], e["type"]) for e in exc.errors()])
    return ("valid", body.user_id, _as_pairs(body.candidates), body.model, body.explain)


@pytest.mark.parametrize("name,data", BODIES, ids=[b[0] for b in BODIES])
def test_parse_score_request_answers_as_the_schema_does(name: str, data: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick path, the schema, and the schema on an install without service._ids (its Python candidate check):
    one answer."""
    answers = [_outcome(parse_score_request, data), _outcome(ScoreRequest.model_validate, data)]
    monkeypatch.setattr(schemas, "_ids", None)
    answers.append(_outcome(parse_score_request, data))
    assert answers[0] == answers[1] == answers[2]


def test_parse_score_request_takes_the_common_body_without_pydantic(monkeypatch: pytest.MonkeyPatch) -> None:
    if schemas._ids is None:
        pytest.skip("service._ids was not built")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the schema's validators ran")

    monkeypatch.setattr(ScoreRequest, "model_validate", refuse)
    body = parse_score_request({"user_id": "alice", "candidates": OK, "explain": True})
    assert isinstance(body.candidates, CandidateIds) and body.candidates.item_id.dtype == np.int64
    assert _as_pairs(body.candidates) == [(1, 2), (MAX_ITEM_ID, MAX_CATEGORY_ID), (0, 0)] and body.explain is True


@pytest.mark.parametrize("name,data", BODIES, ids=[b[0] for b in BODIES])
def test_compiled_candidate_check_matches_the_python_one(name: str, data: Any) -> None:
    if schemas._ids is None:
        pytest.skip("service._ids was not built")
    candidates = data.get("candidates") if isinstance(data, dict) else data

    def handler(value: Any) -> str:
        return "handed to pydantic"

    python = schemas._candidate_arrays_py(candidates, handler)
    compiled = schemas._candidate_arrays(candidates, handler)
    if isinstance(python, CandidateIds):
        assert isinstance(compiled, CandidateIds) and _as_pairs(compiled) == _as_pairs(python)
    else:
        assert compiled == python == "handed to pydantic"

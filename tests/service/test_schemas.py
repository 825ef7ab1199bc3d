"""POST /score's body schema: its vectorised candidate check gives the answers of plain `list[Candidate]` validation
on every body, and ids are JSON integers read from their text (no fraction, even one a float parser rounds to a whole
number)."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
from pydantic import Field, ValidationError

from service import schemas
from service.schemas import MAX_CATEGORY_ID, MAX_ITEM_ID, Candidate, CandidateIds, ScoreRequest, exact_number

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
    ("string ids", {"user_id": "a", "candidates": [{"item_id": str(MAX_ITEM_ID), "category_id": "4294967295"}]}),
    ("string id with a sign", {"user_id": "a", "candidates": [{"item_id": "+7", "category_id": 2}]}),
    ("string id with spaces", {"user_id": "a", "candidates": [{"item_id": "7 ", "category_id": 2}]}),
    ("string id beyond range", {"user_id": "a", "candidates": [{"item_id": str(2**64), "category_id": 2}]}),
    ("string category beyond range", {"user_id": "a", "candidates": [{"item_id": "1", "category_id": str(2**32)}]}),
    ("empty string id", {"user_id": "a", "candidates": [{"item_id": "", "category_id": 2}]}),
    ("string id with a leading zero", {"user_id": "a", "candidates": [{"item_id": "07", "category_id": 2}]}),
    ("string zero", {"user_id": "a", "candidates": [{"item_id": "0", "category_id": "0"}]}),
    ("mixed int and string ids", {"user_id": "a", "candidates": [{"item_id": "7", "category_id": 2}, *OK]}),
    ("above int64", {"user_id": "a", "candidates": [{"item_id": 2**63 + 192, "category_id": 2}]}),
    ("null id", {"user_id": "a", "candidates": [{"item_id": None, "category_id": 2}]}),
    ("negative id", {"user_id": "a", "candidates": [{"item_id": -1, "category_id": 2}]}),
    ("item id above range", {"user_id": "a", "candidates": [{"item_id": MAX_ITEM_ID + 1, "category_id": 2}]}),
    ("category above range", {"user_id": "a", "candidates": [{"item_id": 1, "category_id": MAX_CATEGORY_ID + 1}]}),
    ("beyond uint64", {"user_id": "a", "candidates": [{"item_id": 2**64, "category_id": 2}]}),
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


class PlainScoreRequest(ScoreRequest):
    """The same schema with the candidates validated by pydantic alone (no vectorised check)."""

    candidates: list[Candidate] = Field(min_length=1)


@pytest.mark.parametrize("name,data", BODIES, ids=[b[0] for b in BODIES])
def test_vectorised_candidate_check_answers_as_pydantic_does(name: str, data: Any) -> None:
    assert _outcome(ScoreRequest.model_validate, data) == _outcome(PlainScoreRequest.model_validate, data)


def test_well_formed_candidates_become_arrays() -> None:
    body = ScoreRequest.model_validate({"user_id": "alice", "candidates": OK, "explain": True})
    assert isinstance(body.candidates, CandidateIds) and body.candidates.item_id.dtype == np.uint64
    assert _as_pairs(body.candidates) == [(1, 2), (MAX_ITEM_ID, MAX_CATEGORY_ID), (0, 0)] and body.explain is True


@pytest.mark.parametrize("text,valid", [("7", True), ("7.0", True), ("7e0", True), ("1.0000000000000001", False),
                                        ("7.5", False), ("1e999999999", False), ("NaN", False), ("-0.0", True)])
def test_ids_are_read_from_their_json_text(text: str, valid: bool) -> None:
    """`1.0000000000000001` parses to the float 1.0 and was once accepted as item 1."""
    raw = '{"user_id": "a", "candidates": [{"item_id": %s, "category_id": 2}]}' % text
    data = json.loads(raw, parse_float=exact_number)
    if valid:
        assert _as_pairs(ScoreRequest.model_validate(data).candidates) == [(int(float(text)), 2)]
    else:
        with pytest.raises(ValidationError) as info:
            ScoreRequest.model_validate(data)
        assert [e["loc"] for e in info.value.errors()] == [("candidates", 0, "item_id")]


@pytest.mark.parametrize("maximum", [0, 9, 10, 4095, schemas.MAX_CATEGORY_ID, 2**53, MAX_ITEM_ID])
def test_the_documented_string_id_pattern_is_exactly_0_to_the_maximum(maximum: int) -> None:
    """The OpenAPI pattern of the string form of an id accepts exactly what the service accepts."""
    import random
    import re

    pattern = re.compile(schemas.at_most_pattern(maximum))
    rng = random.Random(maximum)
    values = [*range(3000), maximum - 1, maximum, maximum + 1, 10 * maximum, *(rng.randrange(3 * maximum + 10) for _ in range(5000))]
    for value in values:
        assert (pattern.fullmatch(str(value)) is not None) == (0 <= value <= maximum), value
    assert not any(pattern.fullmatch(text) for text in ("", "00", "01", "+1", "-0", " 1", "1 "))

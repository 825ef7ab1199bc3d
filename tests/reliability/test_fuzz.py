"""schemathesis against the OpenAPI document of a real `dare serve`: generated valid and invalid requests for every
operation; no answer is a 5xx, and every answer matches the documented status codes, content types and schemas.

Bounded here (DARE_FUZZ_EXAMPLES examples per operation, default 30). The longer run is documented in
docs/reliability.md, e.g. `DARE_FUZZ_EXAMPLES=1000 .venv/bin/pytest -q tests/reliability/test_fuzz.py`.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

MAX_EXAMPLES = int(os.environ.get("DARE_FUZZ_EXAMPLES", "30"))
# Small limits, so the fuzzer reaches them with the sizes it generates (the defaults it would rarely hit).
SERVICE_SETTINGS = {"max_candidates": 20, "max_events_per_request": 20, "max_history": 50, "max_user_id_length": 64,
                    "lifelong_max_events": 100}  # fmt: skip


OPERATIONS = ["POST /score", "POST /events", "GET /users/{user_id}/history", "GET /models", "POST /admin/reload",
              "GET /metrics", "GET /healthz", "GET /readyz"]  # fmt: skip


def _beyond_uint64(value: object) -> bool:
    if isinstance(value, dict):
        return any(_beyond_uint64(v) for v in value.values())
    if isinstance(value, list):
        return any(_beyond_uint64(v) for v in value)
    return type(value) is int and value >= 2**64


@pytest.fixture(scope="module")
def api_schema(module_service):
    return schemathesis.openapi.from_url(module_service.base_url + "/openapi.json")


def test_every_operation_is_fuzzed(api_schema) -> None:
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == set(OPERATIONS), "update OPERATIONS: the fuzz tests must cover every operation"


@pytest.mark.parametrize("label", OPERATIONS)
def test_operation_never_5xx_and_matches_the_schema(api_schema, label: str) -> None:
    """Valid and invalid requests (both generation modes) for one operation, each answer checked by all of
    schemathesis' default checks: not a server error, documented status code, content type and body schema, ..."""
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None
    cases = st.one_of([operation.as_strategy(generation_mode=mode) for mode in GenerationMode])

    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=cases)
    def fuzz(case) -> None:
        # The generator reads integer bounds near 2**64 through a float (item_id's exclusiveMaximum 2**64 becomes
        # 18446744073709552000) and so offers ids up to ~2**64 + 383 as valid; the service rightly refuses them
        # (tests/reliability/test_bad_input.py checks ids >= 2**64 explicitly).
        assume(not _beyond_uint64(case.body))
        case.call_and_validate(timeout=30)

    fuzz()


def test_service_survived_the_fuzzing(module_service) -> None:
    import httpx

    assert module_service.alive()
    assert httpx.get(module_service.base_url + "/readyz", timeout=10).status_code == 200
    assert "Traceback" not in module_service.log_text()
    # the fuzzer really talked to this server: its requests are in the service's own request counter
    metrics = httpx.get(module_service.base_url + "/metrics", timeout=10).text
    served = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith("dare_http_request_duration_seconds_count{") and 'endpoint="/score"' in line)  # fmt: skip
    assert served >= MAX_EXAMPLES

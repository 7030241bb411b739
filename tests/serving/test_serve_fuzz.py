"""Property-based fuzzing of the OpenAPI schema (schemathesis) against the real server: no input
gets a 5xx, and afterwards the server still answers normally.

Both valid (positive) and schema-violating (negative) requests are generated, with a bounded
number of examples per operation so the test stays well under a minute.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from serve_helpers import KEYS, MODEL, auth, chat_body

EXAMPLES = 40


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_crashes_the_server(live, mode):
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    url, server = live
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    headers = {"Authorization": f"Bearer {KEYS['kids']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert "POST /v1/chat/completions" in labels and "POST /v1/completions" in labels
    statuses: dict[int, int] = {}
    for op in operations:
        strategy = op.as_strategy(generation_mode=GenerationMode(mode))

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        )
        @given(case=strategy)
        def check(case):
            if mode == "positive" and isinstance(case.body, dict):
                case.body["model"] = MODEL  # reach generation, not just the unknown-model 404
            response = case.call(base_url=url, headers=headers, timeout=30)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            case.validate_response(response, checks=[not_a_server_error])

        try:
            check()
        except Unsatisfiable:  # nothing to negate (an operation without parameters or body)
            assert mode == "negative" and op.method.upper() == "GET", op.label
    assert all(code < 500 for code in statuses), statuses
    if mode == "positive":
        assert statuses.get(200, 0) > 0, statuses  # some fuzzed requests were generated for
    assert sum(statuses.values()) >= EXAMPLES  # the fuzzer really sent requests
    r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers=auth("kids"))
    assert r.status_code == 200 and server.engine.alive

"""Property-based fuzzing over /openapi.json with schemathesis: no input may cause a 5xx.

Driven through schemathesis's strategies and hypothesis directly (its pytest plugin does
not run under pytest 9), for every operation, with valid and invalid inputs.
"""

from __future__ import annotations

import pytest
import schemathesis
from serve_helpers import KEY
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def api_schema(start_server):
    server = start_server(max_tokens=32)  # every generated request stays cheap
    return schemathesis.openapi.from_url(server.url + "/openapi.json", headers=AUTH)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_makes_a_server_error(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize"}
    statuses: list[int] = []
    for op in operations:
        if mode is GenerationMode.NEGATIVE and not len(op.body):
            continue  # nothing to make invalid
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def call(case):
            response = case.call(headers=AUTH, timeout=60)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and error["type"]

        call()
    assert statuses
    if mode is GenerationMode.POSITIVE:
        assert 200 in statuses  # valid requests were generated and served, not only refused

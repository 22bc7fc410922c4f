"""The app's own OpenAPI schema, fuzzed against it live: no operation answers 5xx or hangs, and
every answer is one the schema declares."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

from tests.server.api.conftest import ALIAS

REQUEST_TIMEOUT_S = 5  # a request not answered by then is a hang, and fails the test
EXAMPLES = 25  # per operation and generation mode

# NOTE: the firm checks are not_a_server_error and the timeout. The conformance checks hold too:
# errors are declared OpenAI-shaped 4XX/5XX and streams as text/event-stream. Not checked:
# positive_data_acceptance, since the schema states types but not ranges (temperature=1e9 is
# schema-valid yet a 400 naming the field), and the auth, resource and stateful checks, since
# the app has no resources and serves this test without an API key.
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]
CONFIG = schemathesis.Config.from_dict({"seed": 0, "request-timeout": REQUEST_TIMEOUT_S})


@pytest.fixture(scope="module")
def api_schema(shared_server):
    return schemathesis.openapi.from_url(shared_server.url + "/openapi.json", config=CONFIG)


def served(case):
    """The case naming the served model: any string is schema-valid, but only that one gets past
    the 404 to generation (unknown names are tested in test_errors)."""
    case.body["model"] = ALIAS
    return case


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_operation_fails_or_hangs(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {"POST /v1/completions", "POST /v1/chat/completions"} <= {o.label for o in operations}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not operation.body:
            continue  # nothing to get wrong: no body, no parameters

        cases = operation.as_strategy(generation_mode=mode)
        if mode is GenerationMode.POSITIVE and operation.body:
            cases = cases.map(served)

        @given(case=cases)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case):
            case.call_and_validate(checks=CHECKS, timeout=REQUEST_TIMEOUT_S)

        fuzz()

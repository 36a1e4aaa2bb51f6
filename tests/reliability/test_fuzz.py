"""Schemathesis against the app's own OpenAPI schema, every operation, on a real server: no 5xx, and every
response conforms to the schema."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

EXAMPLES_PER_OPERATION = 25
# No 5xx, and every response (status, content type, body) conforms to the schema. Schema-valid requests may still
# be refused for reasons the schema cannot carry (an unknown label, n over a configured limit), so acceptance of
# positive data is not checked.
CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance, schemathesis.checks.response_schema_conformance]


@pytest.fixture
def server_env() -> dict[str, str]:
    # small limits keep every generated request quick on CPU
    return {"SYNTHGEN_MAX_SAMPLES_PER_REQUEST": "64", "SYNTHGEN_MAX_DATASET_SAMPLES": "256",
            "SYNTHGEN_MAX_NPZ_SAMPLES": "128", "SYNTHGEN_MAX_AUGMENT_OUTPUTS": "256", "SYNTHGEN_LOG_LEVEL": "warning",
            "SYNTHGEN_JOBS_QUOTA_BYTES": "10000000"}


def test_every_operation_conforms(server: tuple[str, int]) -> None:
    url, _ = server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations, examples = 0, 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            nonlocal examples
            examples += 1
            case.call_and_validate(checks=CHECKS)

        check()
    print(f"schemathesis: {operations} operations, {examples} examples")
    assert operations >= 17 and examples >= 200  # every operation of the schema

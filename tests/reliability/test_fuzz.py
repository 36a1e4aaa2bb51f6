"""Schemathesis against the app's own OpenAPI schema, every operation, on a real server: no 5xx, and every
response conforms to the schema."""

from __future__ import annotations

import zlib

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

EXAMPLES_PER_OPERATION = 100
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
    assert operations >= 18 and examples >= 1000  # every operation of the schema


def test_stateful_links_between_create_read_and_delete(server: tuple[str, int]) -> None:
    """Sequences that follow the OpenAPI links of POST /v1/jobs (read, download, delete the job it made)."""
    url, _ = server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    followed: list[tuple[str, str, int]] = []

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case) -> None:
            # random submissions are almost never valid (an existing model, exactly one of n and per_class): make
            # three in four valid, so that the links from a created job are followed
            key = zlib.crc32(repr(case.body).encode())  # from the case alone: replays must draw the same
            if case.method == "POST" and case.path == "/v1/jobs" and key % 4:
                case.body = {"model": "digits-gan", "n": 1 + key % 50, "format": ("zip", "tar", "npz")[key % 3]}

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            followed.append((case.method, case.path, response.status_code))
            case.validate_response(response, checks=CHECKS)

    Machine.run(settings=settings(max_examples=60, stateful_step_count=5, deadline=None, database=None,
                                  derandomize=True, suppress_health_check=list(HealthCheck)))
    linked = {(method, path) for method, path, status in followed if path.startswith("/v1/jobs/{job_id}")
              and status in (200, 204, 409)}
    print(f"schemathesis stateful: {len(followed)} calls, linked operations reached: {sorted(linked)}")
    created = sum(1 for method, path, status in followed if (method, path, status) == ("POST", "/v1/jobs", 202))
    print(f"  jobs created: {created}")
    assert created and ("DELETE", "/v1/jobs/{job_id}") in linked and any(method == "GET" for method, _ in linked)

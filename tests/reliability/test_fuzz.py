"""Schemathesis, as its users run it (`schemathesis run`), against the app's own OpenAPI schema on a real server:
every operation through the examples, coverage, fuzzing and stateful phases. No 5xx, and every response conforms to
the schema; the stateful phase follows the OpenAPI links from a created job to reading, downloading and deleting it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import launch_server, stop_server

pytest.importorskip("schemathesis")
# Schema-valid requests may still be refused for reasons the schema cannot carry (an unknown label, n over a
# configured limit), so acceptance of positive data is not checked.
USER_KEY = "fuzzer-user-key-0123456789"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_every_operation_and_the_links_between_jobs_conform(tmp_path: Path, tiny_gan: Path, tiny_vae: Path) -> None:
    models = tmp_path / "models"
    # named as in the schema's examples, so that the examples phase creates real jobs for the stateful phase
    shutil.copytree(tiny_gan, models / "mnist-cgan")
    shutil.copytree(tiny_vae, models / "mnist-cvae")
    process, url = launch_server(models, tmp_path / "data", {
        "SYNTHGEN_MAX_SAMPLES_PER_REQUEST": "256", "SYNTHGEN_MAX_DATASET_SAMPLES": "20000",
        "SYNTHGEN_MAX_NPZ_SAMPLES": "256", "SYNTHGEN_MAX_AUGMENT_OUTPUTS": "256", "SYNTHGEN_LOG_LEVEL": "warning",
        "SYNTHGEN_MAX_QUEUED_JOBS": "100000", "SYNTHGEN_MAX_CONCURRENT_JOBS": "4",
        # the fuzzer holds a user key: it may try load and unload (403) but not take the models away from /readyz
        "SYNTHGEN_API_KEYS": USER_KEY, "SYNTHGEN_ADMIN_API_KEYS": "admin-" + USER_KEY})
    report = tmp_path / "schemathesis.json"
    try:
        command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/openapi.json", "--header",
                   f"Authorization: Bearer {USER_KEY}", "--checks", CHECKS, "--max-examples", "60", "--seed", "1",
                   "--report", "json", "--report-json-path", str(report)]
        run = subprocess.run(command, capture_output=True, text=True, timeout=600)
        metrics = httpx.get(f"{url}/metrics").text  # /metrics needs no key
    finally:
        stop_server(process)
    output = run.stdout + run.stderr
    result = json.loads(report.read_text())
    links = re.search(r"API Links:\s+(\d+) covered / (\d+) selected", output)
    print(f"\nschemathesis: {result['test_cases']['generated']} cases over {result['operations']['tested']} "
          f"operations, phases {sorted(result['phases'])}, links {links.group(1)}/{links.group(2)} covered")
    assert run.returncode == 0 and not result["failures"] and not result["errors"], output[-5000:]
    assert result["operations"]["tested"] == result["operations"]["total"] >= 18
    assert result["test_cases"]["generated"] >= 1000
    assert all(phase["status"] == "success" for phase in result["phases"].values()), result["phases"]

    def served(route: str, status: str) -> float:
        match = re.search(rf'synthgen_requests_total\{{route="{re.escape(route)}",status="{status}"\}} (\S+)', metrics)
        return float(match.group(1)) if match else 0.0

    # random 32-hex ids are 404s: a 200 or 204 on a job means a link from a created job was followed
    assert served("/v1/jobs", "202") > 0
    assert served("/v1/jobs/{job_id}", "200") > 0 and served("/v1/jobs/{job_id}", "204") > 0

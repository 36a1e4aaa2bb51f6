"""A client generated from the served OpenAPI document (openapi-python-client, with the shipped configuration) and
used against a real server process: typed models, named functions, binary archives, jobs and errors."""

from __future__ import annotations

import base64
import importlib
import io
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import ROOT

GENERATOR = Path(sys.executable).parent / "openapi-python-client"
CONFIG = ROOT / "clients" / "openapi" / "openapi-python-client.yaml"


@pytest.fixture
def generated(server: tuple[str, int], tmp_path: Path):
    if not GENERATOR.exists():
        pytest.skip("openapi-python-client is a dev dependency (pip install -e .[dev]); it is not installed")
    url, _ = server
    (tmp_path / "openapi.json").write_text(httpx.get(f"{url}/openapi.json").text)
    result = subprocess.run([str(GENERATOR), "generate", "--path", str(tmp_path / "openapi.json"), "--config",
                             str(CONFIG), "--meta", "none", "--output-path", str(tmp_path / "synthgen_api")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Unsupported content_type" not in result.stdout + result.stderr  # every answer is typed
    sys.path.insert(0, str(tmp_path))
    try:
        yield url, importlib.import_module("synthgen_api")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name.split(".")[0] == "synthgen_api"]:
            del sys.modules[name]


def test_a_generated_client_works_against_a_real_server(generated) -> None:
    url, api = generated
    from synthgen_api.api.datasets import export_dataset
    from synthgen_api.api.generate import generate_samples
    from synthgen_api.api.jobs import create_dataset_job, download_job_result, get_dataset_job
    from synthgen_api.api.models import get_model, list_models
    from synthgen_api.models import (
        DatasetRequest,
        ErrorPublic,
        GenerateRequest,
        GenerateRequestFormat,
        JobRequest,
        JobRequestFormat,
        SamplesPublic,
    )

    client = api.Client(base_url=url, timeout=httpx.Timeout(60))
    assert {model.name for model in list_models.sync(client=client).models} == {"digits-gan", "digits-vae"}
    samples = generate_samples.sync(name="digits-gan", client=client,
                                    body=GenerateRequest(n=3, label="4", seed=7, format_=GenerateRequestFormat.JSON))
    assert isinstance(samples, SamplesPublic) and samples.seed == 7
    assert [s.class_name for s in samples.samples] == ["4"] * 3
    assert Image.open(io.BytesIO(base64.b64decode(samples.samples[0].png_base64))).size == (8, 8)

    archive = export_dataset.sync(name="digits-vae", client=client, body=DatasetRequest(per_class=2, seed=1))
    with zipfile.ZipFile(archive.payload) as exported:
        assert sum(name.endswith(".png") for name in exported.namelist()) == 20

    body = JobRequest(model="digits-gan", n=5, seed=2, format_=JobRequestFormat.NPZ)
    job = create_dataset_job.sync(client=client, body=body)
    for _ in range(300):
        job = get_dataset_job.sync(job_id=job.id, client=client)
        if job.state in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert job.state == "succeeded" and job.created_at.tzinfo is not None  # ISO 8601, parsed to a datetime
    assert download_job_result.sync(job_id=job.id, client=client).payload.read()[:2] == b"PK"  # npz is a zip

    missing = get_model.sync(name="no-such-model", client=client)
    assert isinstance(missing, ErrorPublic) and "no-such-model" in missing.detail

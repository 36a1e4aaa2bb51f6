"""The application as a whole: API keys on every /v1 route, the OpenAPI document and the local Swagger UI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, serve

pytestmark = pytest.mark.anyio


async def test_api_keys(models_dir: Path) -> None:
    key = "k" * 20
    async with serve(models_dir, api_keys=[key]) as client:
        missing = await client.get("/v1/models")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code == 403
        assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code == 200
        assert (await client.get("/healthz")).status_code == 200  # probes stay open

async def test_openapi_documents_every_route(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        schema = (await client.get("/openapi.json")).json()
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                assert operation.get("summary") and operation.get("description"), (method, path)
        generate = schema["paths"]["/v1/models/{name}/generate"]["post"]
        assert "image/png" in generate["responses"]["200"]["content"]
        training = schema["components"]["schemas"]["Body_create_training"]["properties"]
        assert training["eval_per_class"]["minimum"] == 10 and training["eval_per_class"]["maximum"] == 1000
        assert '"ge"' not in json.dumps(schema) and '"le"' not in json.dumps(schema)  # JSON Schema's names for bounds
        docs = await client.get("/docs")
        assert docs.status_code == 200 and "cdn" not in docs.text  # Swagger UI is served locally (no internet needed)
        assert (await client.get("/static/swagger-ui/swagger-ui-bundle.js")).status_code == 200


def test_the_server_loads_no_offline_code() -> None:
    """Training, evaluation, plotting and the benchmark run in their own commands; a fresh interpreter importing the
    app loads none of them (training jobs run `synthgen train` as child processes)."""
    probe = ("import re, sys, app.api.app; print(sorted(m for m in sys.modules if m.startswith(('app.ml', 'app.bench'))"
             " or (m.startswith('app.') and re.search('train|evaluat|plot|bench|protocol', m))))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout

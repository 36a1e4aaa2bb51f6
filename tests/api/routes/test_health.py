"""Liveness and readiness."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import serve

pytestmark = pytest.mark.anyio


async def test_readyz_before_and_after_loading(tmp_path: Path, tiny_gan: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    async with serve(root) as client:
        assert (await client.get("/healthz")).status_code == 200
        before = await client.get("/readyz")
        assert before.status_code == 503
        assert any(p.startswith("no model is loaded: SYNTHGEN_MODELS_DIR holds no") for p in before.json()["problems"])
        shutil.copytree(tiny_gan, root / "late")
        assert (await client.post("/v1/models/late/load")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        unloaded = await client.delete("/v1/models/late")
        assert unloaded.json()["status"] == "unloaded"
        assert (await client.post("/v1/models/late/generate", json={"n": 1})).status_code == 409

"""One real server process: `synthgen serve` under uvicorn on 127.0.0.1 and a free port."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path, tiny_gan: Path) -> str:
    models = tmp_path / "models"
    shutil.copytree(tiny_gan, models / "digits-gan")
    port = _free_port()
    env = {**os.environ, "SYNTHGEN_MAX_BATCH_WAIT_MS": "2", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port), "--models-dir", str(models),
                                "--device", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            time.sleep(0.2)
        else:
            raise AssertionError("the server did not become ready within 60 s")
        yield url
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0].decode()
        assert process.returncode in (0, -15), output


def test_real_server_generates(server: str) -> None:
    response = httpx.post(f"{server}/v1/models/digits-gan/generate", json={"n": 4, "seed": 3, "format": "npz"},
                          headers={"X-Request-ID": "abc-123"}, timeout=30)
    assert response.status_code == 200 and response.headers["x-request-id"] == "abc-123"
    with np.load(io.BytesIO(response.content), allow_pickle=False) as archive:
        assert archive["images"].shape == (4, 8, 8)
    png = httpx.post(f"{server}/v1/models/digits-gan/generate", json={"n": 4, "format": "png"}, timeout=30)
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    metrics = httpx.get(f"{server}/metrics").text
    assert 'synthgen_requests_total{route="/v1/models/{name}/generate",status="200"} 2.0' in metrics
    assert 'synthgen_model_status{model="digits-gan",status="ready"} 1.0' in metrics

"""Shared fixtures: tiny models trained on scikit-learn's 8×8 digits, a fault-injecting model, the app behind
ASGITransport and a real server process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager

from app.api.app import create_app
from app.core.checkpoint import register
from app.core.nets import ConditionalGAN
from app.ml.training import TrainOptions, train
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

MNIST = ROOT.parent / "shared" / "datasets" / "mnist"
TINY_GAN = {"g_channels": 8, "d_channels": 8, "latent_dim": 16, "embed_dim": 8}
TINY_VAE = {"base_channels": 8, "latent_dim": 8}


def train_tiny(arch: str, out: Path, epochs: int = 1, hyperparameters: dict | None = None, **kwargs) -> Path:
    hyperparameters = hyperparameters or (TINY_GAN if arch == "gan" else TINY_VAE)
    train(TrainOptions(arch=arch, data="digits", out=out, epochs=epochs, device="cpu", progress=False,
                       hyperparameters=hyperparameters, lr=2e-4 if arch == "gan" else 1e-3, **kwargs))
    return out


@pytest.fixture(scope="session")
def tiny_gan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny("gan", tmp_path_factory.mktemp("models") / "digits-gan")


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny("vae", tmp_path_factory.mktemp("models") / "digits-vae", epochs=2)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def models_dir(tmp_path: Path, tiny_gan: Path, tiny_vae: Path) -> Path:
    """A model repository with copies of the tiny GAN and VAE (tests may break or edit them)."""
    root = tmp_path / "models"
    shutil.copytree(tiny_gan, root / "digits-gan")
    shutil.copytree(tiny_vae, root / "digits-vae")
    return root


def copy_shipped(tmp_path: Path, name: str) -> Path:
    """A model repository holding a copy of one shipped model (without its training state and sample grids)."""
    root = tmp_path / "models"
    shutil.copytree(ROOT / "models" / name, root / name, ignore=shutil.ignore_patterns("training_state*", "samples"))
    return root


@asynccontextmanager
async def serve(models_dir: Path, **overrides) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan, behind an httpx client on ASGITransport; `client.app` is the app."""
    defaults = {"max_batch_wait_ms": 2, "data_dir": models_dir.parent / "data"}
    settings = Settings(models_dir=models_dir, device="cpu", **{**defaults, **overrides})
    app = create_app(settings)
    async with LifespanManager(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                       base_url="http://test", timeout=60) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def server_env() -> dict[str, str]:
    """Extra SYNTHGEN_* settings for the `server` fixture; a test module may override it."""
    return {}


def launch_server(models: Path, data: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start a real `synthgen serve` process (uvicorn) on 127.0.0.1 and a free port; returns once /readyz is 200."""
    port = _free_port()
    full_env = {**os.environ, "SYNTHGEN_MAX_BATCH_WAIT_MS": "2", "PYTHONUNBUFFERED": "1",
                "SYNTHGEN_DATA_DIR": str(data), **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port), "--models-dir", str(models),
                                "--device", "cpu"], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise AssertionError(process.stdout.read().decode() if process.stdout else "the server exited")
        time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not become ready within 60 s")


def stop_server(process: subprocess.Popen) -> str:
    """SIGTERM, wait, and return the server's output (asserting a clean exit)."""
    if process.poll() is None:
        process.terminate()
    output = process.communicate(timeout=60)[0].decode()
    assert process.returncode in (0, -15), output
    return output


@pytest.fixture
def server(tmp_path: Path, tiny_gan: Path, tiny_vae: Path, server_env: dict[str, str]):
    """A real server process on the tiny models: yields (url, pid)."""
    models = tmp_path / "models"
    shutil.copytree(tiny_gan, models / "digits-gan")
    shutil.copytree(tiny_vae, models / "digits-vae")
    process, url = launch_server(models, tmp_path / "data", server_env)
    try:
        yield url, process.pid
    finally:
        stop_server(process)


class WorkerKilled(BaseException):
    """Not an Exception: what a dying worker thread raises (the batcher's per-batch error handling cannot catch it)."""


@register
class FaultyGAN(ConditionalGAN):
    """A GAN that fails on purpose: a batch holding label 3 raises (a failed forward pass), label 4 kills the
    worker."""

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is not None and bool((labels == 3).any()):
            raise RuntimeError("injected fault")
        if labels is not None and bool((labels == 4).any()):
            raise WorkerKilled("injected death")
        return super().generate(z, labels)


@pytest.fixture
def faulty_models_dir(models_dir: Path) -> Path:
    """`models_dir` plus `faulty-gan`: the tiny GAN's weights under the FaultyGAN architecture."""
    folder = models_dir / "faulty-gan"
    shutil.copytree(models_dir / "digits-gan", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "class_name": "FaultyGAN"}))
    return models_dir


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (skips with the reason where PostgreSQL is not installed)."""
    from tests.postgres import PostgresServer

    server = PostgresServer().start()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Each job-store backend: None (the embedded SQLite default), or a fresh, migrated PostgreSQL database."""
    if request.param == "sqlite":
        return None
    from app.engine.schema import create_engine, upgrade

    url = request.getfixturevalue("postgres").database()
    engine = create_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """An S3-compatible server (moto's standalone server) on 127.0.0.1 and a free port; yields its endpoint."""
    server_module = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency: pip install -e .[dev]")
    port = _free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_settings(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh bucket on the S3 server; returns the SYNTHGEN_* settings that put job results there."""
    import uuid

    import boto3

    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    bucket = f"results-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return {"SYNTHGEN_RESULTS_URL": f"s3://{bucket}/jobs", "SYNTHGEN_S3_ENDPOINT_URL": s3_server,
            **S3_CREDENTIALS}

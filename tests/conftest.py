"""Shared fixtures: tiny models trained on scikit-learn's 8×8 digits, and paths to the real data."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.training import TrainOptions, train

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "datasets" / "mnist"
TINY_GAN = {"g_channels": 8, "d_channels": 8, "latent_dim": 16, "embed_dim": 8}
TINY_VAE = {"base_channels": 8, "latent_dim": 8}


def train_tiny(arch: str, out: Path, epochs: int = 1, **kwargs) -> Path:
    hyperparameters = TINY_GAN if arch == "gan" else TINY_VAE
    train(TrainOptions(arch=arch, data="digits", out=out, epochs=epochs, device="cpu", progress=False,
                       hyperparameters=hyperparameters, lr=2e-4 if arch == "gan" else 1e-3, **kwargs))
    return out


@pytest.fixture(scope="session")
def tiny_gan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny("gan", tmp_path_factory.mktemp("models") / "digits-gan")


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny("vae", tmp_path_factory.mktemp("models") / "digits-vae", epochs=2)

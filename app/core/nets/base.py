"""What the generative networks share: the `SyntheticNet` interface and the size of their upsampling stack."""

from __future__ import annotations

import math

import torch

from app.core.checkpoint import Checkpointable


def upsampling_steps(height: int, width: int) -> int:
    """How many ×2 stages take a small base grid (≥ 2 pixels) to the image size: 1 for 8×8, 2 for 28×28."""
    return max(1, min(4, int(math.log2(max(min(height, width), 4) / 4))))


class SyntheticNet(Checkpointable):
    """A generative network: latents (+ labels) → images in [-1, 1]. Its `cfg` has `height`, `width`, `channels`,
    `num_classes` and `latent_dim`."""

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Latents `[N, latent_dim]` (+ labels `[N]`) → images `[N, C, H, W]` in [-1, 1]."""
        raise NotImplementedError

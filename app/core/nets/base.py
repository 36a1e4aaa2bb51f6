"""What the generative networks share: the `SyntheticNet` interface and the size of their upsampling stack."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from app.core.checkpoint import Checkpointable


def upsampling_steps(height: int, width: int) -> int:
    """How many ×2 stages take a small base grid (≥ 2 pixels) to the image size: 1 for 8×8, 2 for 28×28."""
    return max(1, min(4, int(math.log2(max(min(height, width), 4) / 4))))


@dataclass
class SyntheticConfig:
    """What every generative network's hyper-parameters hold: the image size, the classes (0: unconditional), the
    latent size, the number of ×2 upsampling stages (0: derived from the image size) and the spread of a default draw
    (`latent_scale`: every standard-normal draw is scaled by it before the prior and the generator; 1 during training,
    then chosen on the validation split by `synthgen tune`)."""

    height: int
    width: int
    channels: int
    num_classes: int
    latent_dim: int = 64
    n_up: int = 0
    latent_scale: float = 1.0
    SIZES: ClassVar[tuple[str, ...]] = ("latent_dim",)  # fields that size a layer: at least 1

    def __post_init__(self) -> None:
        for name in self.SIZES:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not self.n_up:
            self.n_up = upsampling_steps(self.height, self.width)
        if not 0 < self.latent_scale <= 4:
            raise ValueError(f"latent_scale must be in (0, 4], not {self.latent_scale}")


class SyntheticNet(Checkpointable):
    """A generative network: latents (+ labels) → images in [-1, 1]; its `cfg` is a `SyntheticConfig`."""

    cfg: SyntheticConfig

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Latents `[N, latent_dim]` (+ labels `[N]`) → images `[N, C, H, W]` in [-1, 1]."""
        raise NotImplementedError

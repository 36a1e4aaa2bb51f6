"""A convolutional class-conditional VAE; the label enters the encoder as one-hot planes, the decoder beside z."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from app.core.checkpoint import register
from app.core.nets.base import SyntheticConfig, SyntheticNet


@dataclass
class VaeConfig(SyntheticConfig):
    """Hyper-parameters of a (conditional) VAE; `num_classes == 0` makes it unconditional."""

    latent_dim: int = 16
    base_channels: int = 32
    beta: float = 1.0

    @property
    def widths(self) -> list[int]:
        return [self.base_channels * 2**i for i in range(self.n_up + 1)]

    @property
    def base_size(self) -> tuple[int, int]:
        return math.ceil(self.height / 2**self.n_up), math.ceil(self.width / 2**self.n_up)


class Encoder(nn.Module):
    """Image (+ label) → (mu, logvar) of q(z | x, y)."""

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels + cfg.num_classes, widths[0], 3, 1, 1), nn.LeakyReLU(0.1)]
        for c_in, c_out in itertools.pairwise(widths):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1)]
        self.features = nn.Sequential(*layers)
        base_h, base_w = cfg.base_size
        self.pad = (0, base_w * 2**cfg.n_up - cfg.width, 0, base_h * 2**cfg.n_up - cfg.height)
        self.to_stats = nn.Linear(widths[-1] * base_h * base_w, 2 * cfg.latent_dim)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.num_classes:
            planes = F.one_hot(labels, self.cfg.num_classes).to(x.dtype)[:, :, None, None]
            x = torch.cat([x, planes.expand(-1, -1, x.shape[2], x.shape[3])], dim=1)
        h = self.features(F.pad(x, self.pad, value=-1.0)).flatten(1)
        mu, logvar = self.to_stats(h).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)


class Decoder(nn.Module):
    """z (+ label) → pixel logits; `torch.tanh(logits / 2)` is the image in [-1, 1]."""

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths[::-1]
        self.base_h, self.base_w = cfg.base_size
        self.project = nn.Sequential(
            nn.Linear(cfg.latent_dim + cfg.num_classes, widths[0] * self.base_h * self.base_w), nn.ReLU(inplace=True)
        )
        stages: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(widths):
            stages += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.stages = nn.Sequential(*stages)
        self.to_image = nn.Conv2d(widths[-1], cfg.channels, 3, 1, 1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.num_classes:  # integer labels, or soft labels [N, K] (e.g. to morph between classes)
            onehot = labels if labels.is_floating_point() else F.one_hot(labels, self.cfg.num_classes)
            z = torch.cat([z, onehot.to(z.dtype)], dim=1)
        x = self.project(z).view(len(z), -1, self.base_h, self.base_w)
        logits = self.to_image(self.stages(x))
        return logits[:, :, : self.cfg.height, : self.cfg.width]


@register
class ConditionalVAE(SyntheticNet):
    """Encoder + decoder with the reparameterisation trick; loss = reconstruction (Bernoulli) + β·KL. Serving loads
    both: reconstruct and inpaint need the encoder."""

    kind = "vae"
    config_class = VaeConfig
    weight_files: ClassVar[dict[str, str]] = {"decoder": "decoder.safetensors", "encoder": "encoder.safetensors"}

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x, labels)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents → images in [-1, 1]."""
        return torch.tanh(self.decoder(z, labels) / 2)

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.decode(z, labels)

    def reconstruct(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The decoded posterior mean of each image."""
        mu, _ = self.encode(x, labels)
        return self.decode(mu, labels)

    def interpolate(self, z0: torch.Tensor, z1: torch.Tensor, steps: int,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """Decode `steps` latents evenly spaced from z0 to z1 (each `[latent_dim]`); labels: `[steps]` or None."""
        t = torch.linspace(0, 1, steps, device=z0.device)[:, None]
        return self.decode((1 - t) * z0 + t * z1, labels)

    def loss(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Negative ELBO per image: Bernoulli reconstruction on pixels in [0, 1] plus β·KL(q(z|x,y) ‖ N(0, I))."""
        mu, logvar = self.encode(x, labels)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        logits = self.decoder(z, labels)
        recon = F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="sum") / len(x)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
        return {"loss": recon + self.cfg.beta * kl, "recon": recon, "kl": kl}

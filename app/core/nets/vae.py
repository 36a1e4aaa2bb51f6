"""A convolutional class-conditional VAE; the label enters the encoder as one-hot planes, the decoder beside z.

Samples come from a learned prior: per class, a Gaussian mixture fitted to the encoder's posterior means after
training ("ex-post density estimation", Ghosh et al. 2020). N(0, I) leaves the holes of the aggregate posterior in:
on MNIST a tenth of its samples were not recognisably their class.
"""

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

    SIZES: ClassVar[tuple[str, ...]] = ("latent_dim", "base_channels", "prior_components")
    latent_dim: int = 16
    base_channels: int = 32
    beta: float = 1.0
    prior_components: int = 10
    adversarial: float = 0.0  # VAE–GAN: weight of a discriminator's verdict on decoded images (a sharper decoder)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adversarial < 0:
            raise ValueError(f"adversarial must be ≥ 0, not {self.adversarial}")

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


class MixturePrior(nn.Module):
    """Per class, a Gaussian mixture over the latent space; maps a standard-normal draw z to a draw from it.

    The component is picked from z's direction by a high-frequency hash (so it is a pure function of z, independent
    in effect of z's position, and unchanged when z is scaled by a temperature), then z is scaled by the component's
    Cholesky factor and shifted by its mean. Unfitted, it is N(0, I) exactly."""

    def __init__(self, num_classes: int, components: int, latent_dim: int) -> None:
        super().__init__()
        k, m, d = max(num_classes, 1), max(components, 1), latent_dim
        self.register_buffer("cumulative_weights", torch.arange(1, m + 1).div(m).expand(k, m).clone())
        self.register_buffer("means", torch.zeros(k, m, d))
        self.register_buffer("scale_tril", torch.eye(d).expand(k, m, d, d).clone())
        self.register_buffer("hash_direction", torch.randn(d, generator=torch.Generator().manual_seed(0)))

    def set_mixture(self, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor) -> None:
        """Install fitted mixtures: weights `[K, M]`, means `[K, M, D]`, covariances `[K, M, D, D]`."""
        cumulative = weights.cumsum(1) / weights.sum(1, keepdim=True)
        cumulative[:, -1] = 1.0
        self.cumulative_weights.copy_(cumulative)
        self.means.copy_(means)
        self.scale_tril.copy_(torch.linalg.cholesky(covariances))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(z.device.type, enabled=False):
            z32 = z.float()
            # The hash in float64, row by row: in float32 a matrix product rounds differently for a pass of one or
            # two rows than for a larger one, and ×1000 turned that into a different component for ~1 % of draws.
            direction = self.hash_direction.double()
            u = torch.frac((F.normalize(z32.double(), dim=1) * direction).sum(1).abs() * 1000.0).float()
            rows = labels if labels is not None else torch.zeros(len(z), dtype=torch.long, device=z.device)
            cumulative = self.cumulative_weights[rows]
            component = torch.searchsorted(cumulative, u[:, None]).squeeze(1).clamp_max(cumulative.shape[1] - 1)
            mean, tril = self.means[rows, component], self.scale_tril[rows, component]
            return (mean + (tril @ z32[:, :, None]).squeeze(2)).to(z.dtype)


@register
class ConditionalVAE(SyntheticNet):
    """Encoder + decoder with the reparameterisation trick; loss = reconstruction (Bernoulli) + β·KL. Serving loads
    both: reconstruct and inpaint need the encoder."""

    kind = "vae"
    config_class = VaeConfig
    weight_files: ClassVar[dict[str, str]] = {"decoder": "decoder.safetensors", "encoder": "encoder.safetensors",
                                              "prior": "prior.safetensors"}

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.prior = MixturePrior(cfg.num_classes, cfg.prior_components, cfg.latent_dim)

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x, labels)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latents → images in [-1, 1]."""
        return torch.tanh(self.decoder(z, labels) / 2)

    def prior_latents(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Standard-normal draws → latents of the learned prior, at the model's `latent_scale`."""
        return self.prior(z * self.cfg.latent_scale, labels)

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Standard-normal draws → samples of the learned prior, decoded."""
        return self.decode(self.prior_latents(z, labels), labels)

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
        """Negative ELBO per image: Bernoulli reconstruction on pixels in [0, 1] plus β·KL(q(z|x,y) ‖ N(0, I)); and
        the reconstructions (`rebuilt`, in [-1, 1])."""
        mu, logvar = self.encode(x, labels)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        logits = self.decoder(z, labels)
        recon = F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="sum") / len(x)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
        return {"loss": recon + self.cfg.beta * kl, "recon": recon, "kl": kl, "rebuilt": torch.tanh(logits / 2)}

"""A class-conditional DCGAN: generator with label embedding, projection discriminator with a class head."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from app.core.checkpoint import register
from app.core.nets.base import SyntheticConfig, SyntheticNet
from app.core.nets.vae import MixturePrior


@dataclass
class GanConfig(SyntheticConfig):
    """Hyper-parameters of a (conditional) GAN; `num_classes == 0` makes it unconditional."""

    SIZES: ClassVar[tuple[str, ...]] = ("latent_dim", "g_channels", "d_channels", "embed_dim", "prior_components")
    g_channels: int = 32
    g_extra_convs: int = 0  # 3×3 conv layers after each ×2 generator stage: more depth for detail at each resolution
    d_channels: int = 32
    embed_dim: int = 32
    aux_classifier: bool = True  # a class head on the discriminator (trained on real images)
    class_weight: float = 1.0  # how hard that class head steers the generator
    spectral_norm: bool = False  # spectral norm instead of batch norm in the discriminator (Miyato et al., 2018)
    loss: str = "logistic"  # or "hinge"
    diff_augment: str = ""  # DiffAugment policies applied to every image the discriminator sees: "translation,cutout"
    real_augment: float = 0.0  # strength of random affine moves of the real images (1: ±10°, ±10 % scale and shift)
    reconstruction: float = 0.0  # VAE–GAN: weight of rebuilding every real image from an encoder's latent (+ KL)
    prior_components: int = 10  # with `reconstruction`: Gaussians per class in the prior fitted to those latents
    r1_gamma: float = 0.0  # R1 penalty (Mescheder et al., 2018): γ/2 · E‖∇D(real)‖², applied lazily
    mode_seeking: float = 0.1  # weight of the mode-seeking term (Mao et al., 2019; they use 1) against collapse
    minibatch_std: bool = False  # the discriminator sees each group's feature spread (Karras et al., 2018)
    class_norm: bool = False  # class-conditional gain and bias after each batch norm of the generator's stages

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in ("logistic", "hinge"):
            raise ValueError(f"loss must be logistic or hinge, not {self.loss!r}")
        if self.reconstruction < 0:
            raise ValueError(f"reconstruction must be ≥ 0, not {self.reconstruction}")
        if not 0 <= self.g_extra_convs <= 4:
            raise ValueError(f"g_extra_convs must be between 0 and 4, not {self.g_extra_convs}")
        if not 0.0 <= self.r1_gamma <= 1000.0:
            raise ValueError(f"r1_gamma must be between 0 and 1000, not {self.r1_gamma}")
        if not 0.0 <= self.mode_seeking <= 100.0:
            raise ValueError(f"mode_seeking must be between 0 and 100, not {self.mode_seeking}")
        if not 0.0 <= self.real_augment <= 1.0:
            raise ValueError(f"real_augment must be between 0 and 1, not {self.real_augment}")
        unknown = set(filter(None, self.diff_augment.split(","))) - {"translation", "cutout"}
        if unknown:
            raise ValueError(f"unknown diff_augment policies {sorted(unknown)}; use translation and/or cutout")


class Generator(nn.Module):
    """z (+ label) → image in [-1, 1]: linear to a small grid, `n_up` transposed-conv ×2 stages (each followed by
    `g_extra_convs` 3×3 convs), 3×3 conv, tanh."""

    def __init__(self, cfg: GanConfig) -> None:
        super().__init__()
        self.cfg = cfg
        scale = 2**cfg.n_up
        self.base_h, self.base_w = math.ceil(cfg.height / scale), math.ceil(cfg.width / scale)
        widths = [cfg.g_channels * 2 ** (cfg.n_up - i) for i in range(cfg.n_up + 1)]
        self.embed = nn.Embedding(cfg.num_classes, cfg.embed_dim) if cfg.num_classes else None
        in_dim = cfg.latent_dim + (cfg.embed_dim if cfg.num_classes else 0)
        self.project = nn.Sequential(
            nn.Linear(in_dim, widths[0] * self.base_h * self.base_w, bias=False),
            nn.BatchNorm1d(widths[0] * self.base_h * self.base_w),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(widths):
            stages += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            for _ in range(cfg.g_extra_convs):
                stages += [nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.stages = nn.Sequential(*stages)
        # Conditional batch norm (de Vries et al., 2017; as in SNGAN-projection and BigGAN): the label steers every
        # stage, not only the input. Zero-initialised, so training starts from the unconditional norm.
        norms = [m.num_features for m in stages if isinstance(m, nn.BatchNorm2d)]
        self.class_norms = nn.ModuleList(nn.Embedding(cfg.num_classes, 2 * c) for c in norms) \
            if cfg.class_norm and cfg.num_classes else None
        if self.class_norms is not None:
            for table in self.class_norms:
                nn.init.zeros_(table.weight)
        self.to_image = nn.Conv2d(widths[-1], cfg.channels, 3, 1, 1)
        # A VAE–GAN samples the latents real images were encoded to, not N(0, I) (see MixturePrior)
        self.prior = MixturePrior(cfg.num_classes, cfg.prior_components, cfg.latent_dim) if cfg.reconstruction else None

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        x = self.project(z).view(len(z), -1, self.base_h, self.base_w)
        if self.class_norms is None:
            x = self.stages(x)
        else:
            tables = iter(self.class_norms)
            for layer in self.stages:
                x = layer(x)
                if isinstance(layer, nn.BatchNorm2d):
                    gain, bias = next(tables)(labels)[:, :, None, None].chunk(2, dim=1)
                    x = x * (1 + gain) + bias
        x = torch.tanh(self.to_image(x))
        top, left = (x.shape[2] - self.cfg.height) // 2, (x.shape[3] - self.cfg.width) // 2
        return x[:, :, top : top + self.cfg.height, left : left + self.cfg.width]


class MinibatchStd(nn.Module):
    """Appends one channel: the mean standard deviation of the features across a group of up to `group` images, so
    the discriminator can tell a batch of near-identical fakes from a varied real batch (Karras et al., 2018)."""

    def __init__(self, group: int = 4) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        group = next(g for g in range(min(self.group, n), 0, -1) if n % g == 0)  # a divisor of n: every batch size
        spread = x.view(group, n // group, c, h, w).var(dim=0, unbiased=False).add(1e-8).sqrt().mean(dim=(1, 2, 3))
        return torch.cat([x, spread.view(1, -1, 1, 1).expand(group, -1, h, w).reshape(n, 1, h, w)], dim=1)


class Discriminator(nn.Module):
    """Image (+ label) → realness score: DCGAN convolutions, conditioning by projection (Miyato & Koyama, 2018)
    and, with `aux_classifier`, class logits from the same features (AC-GAN style)."""

    def __init__(self, cfg: GanConfig) -> None:
        super().__init__()
        norm = nn.utils.parametrizations.spectral_norm if cfg.spectral_norm else (lambda layer: layer)
        widths = [cfg.d_channels * 2**i for i in range(cfg.n_up + 1)]
        layers: list[nn.Module] = [norm(nn.Conv2d(cfg.channels, widths[0], 3, 1, 1)), nn.LeakyReLU(0.2)]
        for c_in, c_out in itertools.pairwise(widths):
            layers += [norm(nn.Conv2d(c_in, c_out, 4, 2, 1)),
                       nn.Identity() if cfg.spectral_norm else nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        if cfg.minibatch_std:
            layers.append(MinibatchStd())
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        channels = widths[-1] + int(cfg.minibatch_std)
        flat = channels * math.ceil(cfg.height / 2**cfg.n_up) * math.ceil(cfg.width / 2**cfg.n_up)
        self.score = norm(nn.Linear(flat, 1))
        self.embed = nn.Embedding(cfg.num_classes, flat) if cfg.num_classes else None
        has_classifier = cfg.aux_classifier and cfg.num_classes
        self.classify = nn.Linear(flat, cfg.num_classes) if has_classifier else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=0.01)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.score_and_logits(x, labels)[0]

    def score_and_logits(self, x: torch.Tensor, labels: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Realness score `[N]` and class logits `[N, K]` (None without `aux_classifier`)."""
        h = self.features(x)
        out = self.score(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(labels) * h).sum(dim=1)
        return out, (self.classify(h) if self.classify is not None else None)


@register
class ConditionalGAN(SyntheticNet):
    """The generator (what serving loads) and the discriminator (kept with the checkpoint for further training)."""

    kind = "gan"
    config_class = GanConfig
    weight_files: ClassVar[dict[str, str]] = {"generator": "generator.safetensors",
                                              "discriminator": "discriminator.safetensors"}
    serving_parts = ("generator",)

    def __init__(self, cfg: GanConfig) -> None:
        super().__init__(cfg)
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        z = z * self.cfg.latent_scale
        if self.generator.prior is not None:
            z = self.generator.prior(z, labels)
        return self.generator(z, labels)

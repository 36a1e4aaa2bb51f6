"""The small CNN classifier used as evaluator (feature space for metrics, filters) and for TSTR scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from app.core.checkpoint import Checkpointable, register


@dataclass
class ClassifierConfig:
    """Hyper-parameters of the evaluator CNN."""

    height: int
    width: int
    channels: int
    num_classes: int
    width_mult: int = 32
    feature_dim: int = 128


@register
class Classifier(Checkpointable):
    """Two conv blocks (each two 3×3 convs and a 2×2 max-pool), a feature layer and a linear head. Saved beside the
    generator it evaluates as `evaluator.json` + `evaluator.safetensors`."""

    kind = "classifier"
    config_class = ClassifierConfig
    config_file = "evaluator.json"
    weight_files: ClassVar[dict[str, str]] = {"": "evaluator.safetensors"}

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__(cfg)
        w = cfg.width_mult

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                    nn.Conv2d(c_out, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        self.conv = nn.Sequential(*block(cfg.channels, w), *block(w, 2 * w))
        flat = 2 * w * (cfg.height // 4) * (cfg.width // 4)
        self.embed = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(flat, cfg.feature_dim),
                                   nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(cfg.feature_dim, cfg.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations: the feature space of Fréchet distance, precision/recall and memorisation."""
        return self.embed(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

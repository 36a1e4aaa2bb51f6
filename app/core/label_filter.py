"""A model's own label filter: its evaluator CNN reads every sample, and a sample whose label it gives less than
`min_confidence` is drawn again, from a latent derived from the rejected one. A sample thus stays a pure function
of (model, seed, index), however requests are split and batched.

`synthgen tune --min-confidence P` turns the filter on when it lets a wider latent draw (more variety) keep its
labels and score better on the validation split; config.json then holds `"label_filter": {"min_confidence": P}`, and
the evaluator that `synthgen evaluate` wrote decides.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.images import to_model_range
from app.core.nets import Classifier
from app.errors import CheckpointError

MAX_TRIES = 8  # a sample that no try passes keeps the try its label fits best


@dataclass
class LabelFilter:
    """The evaluator, its temperature (fitted on the validation split) and the probability a label needs."""

    evaluator: Classifier
    min_confidence: float
    temperature: float = 1.0

    @torch.inference_mode()
    def confidence(self, images: np.ndarray, labels: torch.Tensor) -> np.ndarray:
        """The probability the evaluator gives each uint8 image's label, in float32 whatever autocast the caller
        runs under (half precision would move verdicts near the threshold); NaN reads as 0, a failed try."""
        device = next(self.evaluator.parameters()).device
        with torch.autocast(device.type, enabled=False):
            logits = self.evaluator(to_model_range(images).to(device).float()) / self.temperature
        probs = logits.softmax(dim=1)[torch.arange(len(images)), labels.to(device)].cpu().numpy()
        return np.nan_to_num(probs, nan=0.0)


def redraw(z: torch.Tensor, attempt: int) -> torch.Tensor:
    """Standard-normal latents seeded by each row's bytes and the attempt: a pure function of the rejected latent."""
    rows = z.detach().to("cpu", torch.float32).contiguous().numpy()
    out = torch.empty(rows.shape)
    gen = torch.Generator()
    for row in range(len(rows)):
        digest = hashlib.blake2b(rows[row].tobytes() + attempt.to_bytes(2, "little"), digest_size=8).digest()
        gen.manual_seed(int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF)
        torch.randn(rows.shape[1], generator=gen, out=out[row])
    return out.to(z.device)


def load_label_filter(folder: Path, config: dict[str, Any], num_classes: int, image_shape: tuple[int, int, int],
                      device: str | torch.device = "cpu") -> LabelFilter | None:
    """The filter config.json asks for, with the folder's evaluator on `device`; None when it asks for none."""
    spec = config.get("label_filter")
    if spec is None:
        return None
    path = folder / "config.json"
    confidence = spec.get("min_confidence") if isinstance(spec, dict) else None
    if set(spec if isinstance(spec, dict) else ()) != {"min_confidence"} or isinstance(confidence, bool) \
            or not isinstance(confidence, int | float) or not 0 < confidence <= 1:
        raise CheckpointError(f"{path}: label_filter must be {{\"min_confidence\": a number in (0, 1]}}, not {spec!r}")
    if not num_classes:
        raise CheckpointError(f"{path}: an unconditional model has no labels to filter; remove label_filter")
    if not (folder / Classifier.config_file).is_file():
        raise CheckpointError(f"{path}: label_filter needs the model's evaluator; run synthgen evaluate on it")
    evaluator, meta = Classifier.from_pretrained(folder)
    cfg = evaluator.cfg
    if (cfg.num_classes, cfg.height, cfg.width, cfg.channels) != (num_classes, *image_shape):
        raise CheckpointError(f"{folder / Classifier.config_file}: the evaluator reads {cfg.num_classes} classes of "
                              f"{cfg.height}×{cfg.width}×{cfg.channels} images, the model makes {num_classes} of "
                              f"{'×'.join(map(str, image_shape))}; run synthgen evaluate again")
    return LabelFilter(evaluator.to(device), float(confidence), float(meta.get("temperature", 1.0)))

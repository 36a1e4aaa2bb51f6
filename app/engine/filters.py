"""Quality and privacy filters by rejection sampling, with the model's evaluator CNN.

- `min_confidence`: keep a sample only if the evaluator gives its requested label at least this probability;
- `max_similarity`: drop a sample whose nearest training image (in evaluator features) is closer than the model's
  memorisation threshold (the 1st percentile of real-to-real nearest-neighbour distances).

Slot k of a request of `total` samples tries indices k, k + total, k + 2·total, … so every kept sample is still a
pure function of (model, seed, index) and its index is reported. A request that cannot be filled within
`max_rounds` tries per slot fails with a clear 422 instead of looping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from app.core.checkpoint import load_features
from app.core.images import to_model_range
from app.core.nets import Classifier
from app.errors import InvalidInputError


@dataclass(frozen=True)
class FilterSpec:
    """The filters a request asks for."""

    min_confidence: float | None = None
    max_similarity: bool = False

    @property
    def active(self) -> bool:
        return self.min_confidence is not None or self.max_similarity


JUDGE_CHUNK = 256
HOPELESS = 3.0  # stop once this many slots are expected to stay empty after the rounds left


@dataclass
class Judge:
    """The evaluator, the training features and the threshold of one model."""

    evaluator: Classifier
    train_features: torch.Tensor
    threshold: float
    temperature: float = 1.0  # fitted on the validation split: probabilities mean what they say

    def verdicts(self, images: np.ndarray, labels: np.ndarray, spec: FilterSpec) -> tuple[np.ndarray, np.ndarray]:
        """Per sample: (passes min_confidence, passes max_similarity), in chunks so that the distance matrix to the
        training features stays small whatever the number of candidates."""
        parts = [self._verdicts(images[i : i + JUDGE_CHUNK], labels[i : i + JUDGE_CHUNK], spec)
                 for i in range(0, len(images), JUDGE_CHUNK)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @torch.inference_mode()
    def _verdicts(self, images: np.ndarray, labels: np.ndarray, spec: FilterSpec) -> tuple[np.ndarray, np.ndarray]:
        x = to_model_range(images).to(self.train_features.device)
        features = self.evaluator.features(x)
        confident = np.ones(len(images), dtype=bool)
        novel = np.ones(len(images), dtype=bool)
        if spec.min_confidence is not None:
            probs = (self.evaluator.head(features) / self.temperature).softmax(dim=1).cpu().numpy()
            confident = probs[np.arange(len(labels)), labels] >= spec.min_confidence
        if spec.max_similarity:
            nearest = torch.cdist(features.float(), self.train_features).min(dim=1).values.cpu().numpy()
            novel = nearest >= self.threshold
        return confident, novel


def load_judge(folder: Path, device: torch.device) -> Judge | None:
    """The model's judge, or None when it was never evaluated (no evaluator shipped)."""
    if not (folder / "evaluator.safetensors").is_file() or not (folder / "train_features.safetensors").is_file():
        return None
    evaluator, meta = Classifier.from_pretrained(folder)
    if "memorisation_threshold" not in meta:  # written by tune for a label filter, before evaluate ran
        return None
    return Judge(evaluator.to(device), load_features(folder, device), float(meta["memorisation_threshold"]),
                 float(meta.get("temperature", 1.0)))


@dataclass
class FilterReport:
    rejected: dict[str, int] = field(default_factory=lambda: {"min_confidence": 0, "max_similarity": 0})


Generate = Callable[[list[int], list[int | None]], Awaitable[tuple[np.ndarray, np.ndarray]]]


async def fill(generate: Generate, judge: Judge | None, executor: Executor, spec: FilterSpec,
               slots: list[int], labels: list[int | None], total: int, max_rounds: int,
               report: FilterReport) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one accepted sample per slot; returns (images, labels, indices) in slot order."""
    if not spec.active:
        images, drawn = await generate(slots, labels)
        return images, drawn, np.array(slots, dtype=np.int64)
    if judge is None:
        raise InvalidInputError("this model has no evaluator, so min_confidence / max_similarity cannot be used; "
                                "run synthgen evaluate on it first")
    images: np.ndarray | None = None
    out_labels = np.zeros(len(slots), dtype=np.int64)
    out_indices = np.zeros(len(slots), dtype=np.int64)
    waiting = np.arange(len(slots))
    tried = rounds = 0
    for attempt in range(max_rounds):
        rounds = attempt + 1
        indices = [slots[i] + attempt * total for i in waiting]
        candidates, drawn = await generate(indices, [labels[i] for i in waiting])
        confident, novel = await asyncio.get_running_loop().run_in_executor(
            executor, judge.verdicts, candidates, drawn, spec)
        report.rejected["min_confidence"] += int((~confident).sum())
        report.rejected["max_similarity"] += int((confident & ~novel).sum())
        keep = confident & novel
        if images is None:
            images = np.zeros((len(slots), *candidates.shape[1:]), dtype=candidates.dtype)
        images[waiting[keep]] = candidates[keep]
        out_labels[waiting[keep]] = drawn[keep]
        out_indices[waiting[keep]] = np.array(indices)[keep]
        waiting = waiting[~keep]
        if len(waiting) == 0:
            return images, out_labels, out_indices
        tried += len(keep)
        accepted = len(slots) - len(waiting)
        # the acceptance rate so far predicts how many slots the rounds left cannot fill: stop early, not after
        # burning every round on a request that cannot succeed. Laplace-smoothed, so that a few rejected
        # candidates (no evidence yet) do not read as an acceptance of 0 while thousands of them do.
        acceptance = (accepted + 1) / (tried + 2)
        if len(waiting) * (1 - acceptance) ** (max_rounds - rounds) >= HOPELESS:
            break
    early = "; the acceptance so far says the rounds left would not fill them" if rounds < max_rounds else ""
    raise InvalidInputError(f"{len(waiting)} of {len(slots)} samples found no candidate passing the filters in "
                            f"{rounds} of at most {max_rounds} tries each (SYNTHGEN_FILTER_MAX_ROUNDS; {tried} "
                            f"candidates tried, rejected: {report.rejected}{early}); lower min_confidence or turn "
                            "off max_similarity")

"""What to generate, resolved once from a request (HTTP body or command line) and the limits: one label per index,
the seed, the latent scale and the filters. The same plan and the same manifest serve the CLI, /generate, streamed
exports, jobs and augmentation."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from app import __version__
from app.core.model import SyntheticModel
from app.core.sampling import MAX_SEED, resolve_label
from app.engine.filters import FilterSpec
from app.errors import InvalidInputError


@dataclass(frozen=True)
class SamplePlan:
    """Which label (None: drawn from the seed) each sample index 0..n-1 gets, as runs of (label, count) in index
    order (a million-sample plan stays a few bytes), the seed, truncation and filters."""

    runs: tuple[tuple[int | None, int], ...]
    seed: int
    truncation: float = 1.0
    filters: FilterSpec = field(default_factory=FilterSpec)

    def __len__(self) -> int:
        return sum(count for _, count in self.runs)

    def labels(self, start: int = 0, stop: int | None = None) -> list[int | None]:
        """The labels of indices start..stop-1."""
        stop = len(self) if stop is None else min(stop, len(self))
        out: list[int | None] = []
        first = 0
        for label, count in self.runs:
            lo, hi = max(start, first), min(stop, first + count)
            if lo < hi:
                out.extend([label] * (hi - lo))
            first += count
        return out

    def counts(self, class_names: list[str]) -> dict[str, int] | None:
        """Samples asked for per class name; None when labels are drawn."""
        if any(label is None for label, _ in self.runs):
            return None
        return {class_names[label]: count for label, count in self.runs if count}  # type: ignore[index]


def _class_counts(model: SyntheticModel, per_class: int | dict[str, int]) -> dict[int, int]:
    """Model label → count, in label order."""
    if isinstance(per_class, int):
        if not model.num_classes:
            raise InvalidInputError(f"{model.name} is unconditional; use n")
        if per_class < 1:
            raise InvalidInputError("per_class must be at least 1")
        return dict.fromkeys(range(model.num_classes), per_class)
    counts: dict[int, int] = {}
    for name, count in per_class.items():
        if count < 0:
            raise InvalidInputError(f"per_class[{name!r}] must not be negative")
        label = resolve_label(name, model.class_names)
        if label in counts:
            raise InvalidInputError(f"per_class names class {model.class_names[label]!r} twice (as {name!r} and "
                                    "before); give each class once")
        counts[label] = count
    return dict(sorted(counts.items()))


def plan_samples(model: SyntheticModel, max_samples: int, scope: str, *, per_class: int | dict[str, int] | None = None,
                 n: int | None = None, label: str | int | None = None, seed: int | None = None,
                 truncation: float = 1.0, filters: FilterSpec | None = None, allow_empty: bool = False) -> SamplePlan:
    """`per_class` (a count for every class, or counts by class name) or `n` samples (all of `label`, or drawn).
    The count is checked against `max_samples` (what `scope` allows) before any label is listed; no seed → a
    random one."""
    if (per_class is None) == (n is None):
        raise InvalidInputError("give exactly one of per_class (a count, or counts by class name) or n")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InvalidInputError(f"seed must be in 0..{MAX_SEED}, not {seed}")
    if not 0 < truncation <= 4:  # NaN too
        raise InvalidInputError(f"truncation must be in (0, 4], not {truncation}")
    if per_class is not None:
        if label is not None:
            raise InvalidInputError("label goes with n; with per_class, name the counts by class instead")
        counts = _class_counts(model, per_class)
    else:
        if n is None or n < 1:
            raise InvalidInputError("n must be at least 1")
        counts = {resolve_label(label, model.class_names) if label is not None else None: n}
    total = sum(counts.values())
    if total == 0 and not allow_empty:
        raise InvalidInputError("the dataset would be empty; ask for at least one sample")
    if total > max_samples:
        raise InvalidInputError(f"{total} samples is over the limit of {max_samples} for {scope}; ask for fewer "
                                "(several requests with different seeds give different samples)")
    seed = secrets.randbelow(MAX_SEED) if seed is None else seed
    return SamplePlan(tuple(counts.items()), seed, truncation, filters or FilterSpec())


def build_manifest(model: SyntheticModel, plan: SamplePlan, output: str, rejected: dict[str, int] | None = None,
                   **extra: Any) -> dict[str, Any]:
    """What an archive's manifest.json says: enough to regenerate it bit for bit (so no creation time), the filters
    and their rejections, and the model's quality card; `extra` for what an operation adds (augmentation)."""
    filters = plan.filters
    return {"model": model.name, "config_hash": model.config_hash, "seed": plan.seed, "truncation": plan.truncation,
            "format": output, "requested_counts": plan.counts(model.class_names), "code_version": __version__,
            "card": model.card, "filters": {"min_confidence": filters.min_confidence,
                                            "max_similarity": filters.max_similarity,
                                            "rejected": rejected} if filters.active else None, **extra}

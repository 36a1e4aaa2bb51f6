"""Dataset exports: a plan of labels per index, generated chunk by chunk through the micro-batcher and written as a
zip (ImageFolder), a tar (WebDataset) or an npz. The archive streams: memory stays flat whatever its size."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from app import __version__
from app.checkpoint import SyntheticModel, utc_now
from app.errors import InvalidInputError
from app.export import ImageFolderZip, WebDatasetTar, npz_bytes
from app.filters import FilterReport, FilterSpec, fill
from app.repository import ServedModel
from app.sampling import resolve_label
from app.service import sampler

MEDIA_TYPES = {"zip": "application/zip", "tar": "application/x-tar", "npz": "application/octet-stream"}


@dataclass
class DatasetPlan:
    """What an export generates: one label (or None: drawn) per index 0..n-1."""

    labels: list[int | None]
    seed: int
    truncation: float = 1.0

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self, class_names: list[str]) -> dict[str, int] | None:
        if any(label is None for label in self.labels):
            return None
        values, counts = np.unique(np.array(self.labels, dtype=np.int64), return_counts=True)
        return {class_names[v]: int(c) for v, c in zip(values, counts)}


def plan_dataset(model: SyntheticModel, seed: int, per_class: int | dict[str, int] | None = None,
                 n: int | None = None, label: str | int | None = None, truncation: float = 1.0,
                 max_samples: int = 1_000_000) -> DatasetPlan:
    """Labels per index: `per_class` (a count for every class, or counts by class name) or `n` (of `label`)."""
    if (per_class is None) == (n is None):
        raise InvalidInputError("give exactly one of per_class (a count, or counts by class name) or n")
    if per_class is not None:
        if label is not None:
            raise InvalidInputError("label goes with n; with per_class, name the counts by class instead")
        if not model.num_classes:
            raise InvalidInputError(f"{model.name} is unconditional; use n")
        counts = per_class if isinstance(per_class, dict) else dict.fromkeys(model.class_names, per_class)
        labels: list[int | None] = []
        for name, count in sorted(counts.items(), key=lambda item: resolve_label(item[0], model.class_names)):
            if count < 0:
                raise InvalidInputError(f"per_class[{name!r}] must not be negative")
            labels += [resolve_label(name, model.class_names)] * count
    else:
        fixed = resolve_label(label, model.class_names) if label is not None else None
        labels = [fixed] * int(n or 0)
    if not labels:
        raise InvalidInputError("the dataset would be empty; ask for at least one sample")
    if len(labels) > max_samples:
        raise InvalidInputError(f"{len(labels)} samples is over the export limit of {max_samples}; "
                                "split it into several exports with different seeds")
    return DatasetPlan(labels, seed, truncation)


def manifest_for(model: SyntheticModel, plan: DatasetPlan, output: str) -> dict[str, Any]:
    """Everything needed to regenerate the dataset bit for bit, plus the model's quality card."""
    return {"model": model.name, "config_hash": model.config_hash, "truncation": plan.truncation,
            "format": output, "requested_counts": plan.counts(model.class_names), "code_version": __version__,
            "created_at": utc_now(), "card": model.card}


async def stream_dataset(served: ServedModel, plan: DatasetPlan, output: str, chunk: int, timeout_s: float,
                         spec: FilterSpec | None = None, max_rounds: int = 20) -> AsyncIterator[bytes]:
    """The archive's bytes, chunk by chunk; the next chunk is generated while the last one is encoded. With
    filters, each slot keeps its first passing candidate and the manifest counts the rejections."""
    model, spec, report = served.model, spec or FilterSpec(), FilterReport()
    generate = sampler(served, plan.seed, plan.truncation, timeout_s, wait_when_full=True)

    def produce(start: int) -> asyncio.Future[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        stop = min(start + chunk, len(plan))
        return asyncio.ensure_future(fill(generate, served.judge, served.executor, spec, list(range(start, stop)),
                                          plan.labels[start:stop], len(plan), max_rounds, report))

    def manifest() -> dict[str, Any]:
        filters = {"min_confidence": spec.min_confidence, "max_similarity": spec.max_similarity,
                   "rejected": report.rejected} if spec.active else None
        return {**manifest_for(model, plan, output), "filters": filters}

    starts = list(range(0, len(plan), chunk))
    pending = produce(0)
    try:
        if output == "npz":  # npz cannot stream: collect (size-limited by the plan), then one write
            parts = [await pending] + [await produce(start) for start in starts[1:]]
            indices = np.concatenate([p[2] for p in parts]) if spec.active else None
            yield await asyncio.to_thread(npz_bytes, np.concatenate([p[0] for p in parts]),
                                          np.concatenate([p[1] for p in parts]), indices)
            return
        writer = (ImageFolderZip if output == "zip" else WebDatasetTar)(model.class_names, plan.seed)
        for position in range(len(starts)):
            images, labels, indices = await pending
            if position + 1 < len(starts):
                pending = produce(starts[position + 1])
            yield await asyncio.to_thread(writer.add, images, labels, indices.tolist())
        yield await asyncio.to_thread(writer.finish, manifest())
    finally:
        if not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)

"""Dataset exports: a plan of labels per index, generated chunk by chunk through the micro-batcher and written as a
zip (ImageFolder), a tar (WebDataset) or an npz. The archive streams: memory stays flat whatever its size."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from app import __version__
from app.batcher import MicroBatcher
from app.checkpoint import SyntheticModel, config_hash, utc_now
from app.errors import InvalidInputError, OverloadedError
from app.export import ImageFolderZip, WebDatasetTar, npz_bytes
from app.sampling import draw_latents, resolve_label

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
    return {"model": model.name, "config_hash": config_hash(model.folder), "truncation": plan.truncation,
            "format": output, "requested_counts": plan.counts(model.class_names), "code_version": __version__,
            "created_at": utc_now(), "card": model.card}


async def _generate_chunk(model: SyntheticModel, batcher: MicroBatcher, plan: DatasetPlan, start: int, stop: int,
                          timeout_s: float) -> tuple[np.ndarray, np.ndarray]:
    z, labels = await asyncio.to_thread(draw_latents, plan.seed, range(start, stop), model.latent_dim,
                                        model.num_classes, plan.labels[start:stop])
    delay = 0.05
    while True:  # an export waits for room in a full queue instead of failing half-way
        try:
            images = await batcher.submit(z, labels, plan.truncation, timeout_s)
            return images, labels.numpy()
        except OverloadedError:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def stream_dataset(model: SyntheticModel, batcher: MicroBatcher, plan: DatasetPlan, output: str,
                         chunk: int, timeout_s: float) -> AsyncIterator[bytes]:
    """The archive's bytes, chunk by chunk; the next chunk is generated while the last one is encoded."""
    manifest = manifest_for(model, plan, output)
    if output == "npz":
        parts = [await _generate_chunk(model, batcher, plan, s, min(s + chunk, len(plan)), timeout_s)
                 for s in range(0, len(plan), chunk)]
        images = np.concatenate([p[0] for p in parts])
        yield await asyncio.to_thread(npz_bytes, images, np.concatenate([p[1] for p in parts]))
        return
    writer = (ImageFolderZip if output == "zip" else WebDatasetTar)(model.class_names, plan.seed)
    starts = list(range(0, len(plan), chunk))
    pending = asyncio.ensure_future(_generate_chunk(model, batcher, plan, 0, min(chunk, len(plan)), timeout_s))
    try:
        for position, start in enumerate(starts):
            images, labels = await pending
            if position + 1 < len(starts):
                following = starts[position + 1]
                pending = asyncio.ensure_future(_generate_chunk(model, batcher, plan, following,
                                                                min(following + chunk, len(plan)), timeout_s))
            yield await asyncio.to_thread(writer.add, images, labels, range(start, start + len(images)))
        yield await asyncio.to_thread(writer.finish, manifest)
    finally:
        if not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)

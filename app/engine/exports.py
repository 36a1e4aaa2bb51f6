"""Dataset exports: a plan generated chunk by chunk through the micro-batcher and written as a zip (ImageFolder),
a tar (WebDataset) or an npz. The archive streams: memory stays flat whatever its size. Jobs write the same bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from app.engine.archives import ImageFolderZip, WebDatasetTar, npz_bytes
from app.engine.filters import FilterReport, fill
from app.engine.generation import sampler
from app.engine.plans import SamplePlan, build_manifest
from app.engine.repository import ServedModel
from app.settings import Settings

MEDIA_TYPES = {"zip": "application/zip", "tar": "application/x-tar", "npz": "application/octet-stream"}


def export_limit(settings: Settings, output: str) -> tuple[int, str]:
    """Most samples one export (streamed or a job) may hold, and a scope naming the setting: npz is built in memory,
    so it has its own limit."""
    if output == "npz":
        return settings.max_npz_samples, "one npz export (SYNTHGEN_MAX_NPZ_SAMPLES)"
    return settings.max_dataset_samples, f"one {output} export (SYNTHGEN_MAX_DATASET_SAMPLES)"


async def stream_export(served: ServedModel, plan: SamplePlan, output: str, settings: Settings
                        ) -> AsyncIterator[bytes]:
    """The archive's bytes, chunk by chunk (a forward pass each); the next chunk is generated while the last one is
    encoded. With filters, each slot keeps its first passing candidate and the manifest counts the rejections."""
    model, spec, report, chunk = served.model, plan.filters, FilterReport(), settings.max_batch_size
    generate = sampler(served, plan.seed, plan.truncation, settings.request_timeout_s, wait_when_full=True)

    def produce(start: int) -> asyncio.Future[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        stop = min(start + chunk, len(plan))
        return asyncio.ensure_future(fill(generate, served.judge, served.executor, spec, list(range(start, stop)),
                                          plan.labels(start, stop), len(plan), settings.filter_max_rounds, report))

    starts = list(range(0, len(plan), chunk))
    pending = produce(0)
    try:
        if output == "npz":  # npz cannot stream: collect (size-limited by the plan), then one write
            parts = [await pending] + [await produce(start) for start in starts[1:]]
            indices = np.concatenate([p[2] for p in parts]) if spec.active else None
            yield await served.on_cpu(npz_bytes, np.concatenate([p[0] for p in parts]),
                                          np.concatenate([p[1] for p in parts]), indices)
            return
        writer = (ImageFolderZip if output == "zip" else WebDatasetTar)(model.class_names, plan.seed)
        for position in range(len(starts)):
            images, labels, indices = await pending
            if position + 1 < len(starts):
                pending = produce(starts[position + 1])
            yield await served.on_cpu(writer.add, images, labels, indices.tolist())
        yield await served.on_cpu(writer.finish, build_manifest(model, plan, output, report.rejected))
    finally:
        if not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)

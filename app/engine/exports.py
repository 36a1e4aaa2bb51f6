"""Dataset exports: a plan generated chunk by chunk through the micro-batcher and written as a zip (ImageFolder),
WebDataset tar shards, Parquet or an npz. The archive streams: memory stays flat whatever its size. Jobs write the
same bytes."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from app.engine.archives import ImageFolderZip, WebDatasetShards, npz_bytes
from app.engine.filters import FilterReport, fill
from app.engine.generation import sampler
from app.engine.hub import ParquetExport
from app.engine.plans import SamplePlan, build_manifest
from app.engine.repository import ServedModel
from app.settings import Settings

MEDIA_TYPES = {"zip": "application/zip", "tar": "application/x-tar", "parquet": "application/vnd.apache.parquet",
               "npz": "application/octet-stream"}


def export_limit(settings: Settings, output: str) -> tuple[int, str]:
    """Most samples one export (streamed or a job) may hold, and a scope naming the setting: npz is built in memory,
    so it has its own limit."""
    if output == "npz":
        return settings.max_npz_samples, "one npz export (SYNTHGEN_MAX_NPZ_SAMPLES)"
    return settings.max_dataset_samples, f"one {output} export (SYNTHGEN_MAX_DATASET_SAMPLES)"


def export_name(model: str, seed: int) -> str:
    """What an export's files are named after: `<model>-seed<seed>`."""
    return f"{model}-seed{seed}"


class _OneFile:
    """A single-file archive writer (zip, Parquet) giving named pieces like `WebDatasetShards`."""

    def __init__(self, writer: ImageFolderZip | ParquetExport, name: str) -> None:
        self.writer, self.name = writer, name

    def add(self, *args: Any, **kwargs: Any) -> list[tuple[str, bytes]]:
        return [(self.name, self.writer.add(*args, **kwargs))]

    def finish(self, manifest: dict[str, Any]) -> list[tuple[str, bytes]]:
        return [(self.name, self.writer.finish(manifest))]


def _writer(output: str, served: ServedModel, plan: SamplePlan, shard_size: int | None, start: int
            ) -> WebDatasetShards | _OneFile:
    model, name = served.model, export_name(served.model.name, plan.seed)
    if output == "tar":
        size = shard_size or len(plan)
        return WebDatasetShards(model.class_names, plan.seed, model.name, name, size, start=start)
    writer = (ImageFolderZip if output == "zip" else ParquetExport)(model.class_names, plan.seed)
    return _OneFile(writer, f"{name}.{output}")


async def stream_export(served: ServedModel, plan: SamplePlan, output: str, settings: Settings,
                        shard_size: int | None = None, start: int = 0,
                        progress: Callable[[int], None] | None = None) -> AsyncIterator[tuple[str, bytes]]:
    """The export's files as `(file name, bytes)` pieces in order, chunk by chunk (a forward pass each); the next
    chunk is generated while the last one is encoded. A tar is one WebDataset shard, or with `shard_size` shards of
    that many samples and a `manifest.json` sidecar; `start` (a multiple of `shard_size`, or the end of the plan)
    resumes those shards at that sample. With filters, each slot keeps its first passing candidate and the manifest
    counts the rejections. `progress` is told the samples done after each chunk's pieces."""
    model, spec, report, chunk = served.model, plan.filters, FilterReport(), settings.max_batch_size
    generate = sampler(served, plan.seed, plan.truncation, settings.request_timeout_s, wait_when_full=True)

    def produce(start: int) -> asyncio.Future[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        stop = min(start + chunk, len(plan))
        return asyncio.ensure_future(fill(generate, served.judge, served.executor, spec, list(range(start, stop)),
                                          plan.labels(start, stop), len(plan), settings.filter_max_rounds, report))

    starts = list(range(start, len(plan), chunk))
    pending = produce(starts[0]) if starts else None
    try:
        if output == "npz":  # npz cannot stream: collect (size-limited by the plan), then one write
            parts = [await pending] + [await produce(first) for first in starts[1:]]  # type: ignore[misc]
            indices = np.concatenate([p[2] for p in parts]) if spec.active else None
            data = await served.on_cpu(npz_bytes, np.concatenate([p[0] for p in parts]),
                                       np.concatenate([p[1] for p in parts]), indices)
            yield f"{export_name(model.name, plan.seed)}.npz", data
            return
        writer = _writer(output, served, plan, shard_size, start)
        for position in range(len(starts)):
            images, labels, indices = await pending  # type: ignore[misc]
            if position + 1 < len(starts):
                pending = produce(starts[position + 1])
            pngs = await served.encode_pngs(images)
            add = functools.partial(writer.add, images, labels, indices.tolist(), pngs=pngs)
            for piece in await served.on_cpu(add):
                yield piece
            if progress is not None:
                progress(min(starts[position] + chunk, len(plan)))
        manifest = build_manifest(model, plan, output, report.rejected)
        for piece in await served.on_cpu(writer.finish, manifest if output != "tar" or shard_size else None):
            yield piece
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)

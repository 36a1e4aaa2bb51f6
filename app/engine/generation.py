"""Generation through the micro-batcher: latents per (seed, index), filters by rejection sampling, and the
`Samples` every operation returns. No HTTP here; results are uint8 images and labels."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from app.core.sampling import draw_latents
from app.engine.filters import FilterReport, fill
from app.engine.plans import SamplePlan
from app.engine.repository import ServedModel
from app.errors import OverloadedError, RequestTimeoutError
from app.settings import Settings


@dataclass
class Samples:
    """Generated (or reconstructed) images with their labels, ready to encode."""

    model: str
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray | None  # int64 [N], None for an unconditional model
    class_names: list[str]
    seed: int | None = None
    indices: np.ndarray | None = None  # the sample indices (not 0..n-1 once filters rejected candidates)
    rejected: dict[str, int] | None = None  # candidates each filter rejected, when filters were asked for
    columns: int | None = None  # grid layout for format=png (None: about square)


INLINE_SAMPLES = 64


def _out_of_time(timeout_s: float) -> RequestTimeoutError:
    return RequestTimeoutError(f"the request waited over {timeout_s:g} s (SYNTHGEN_REQUEST_TIMEOUT_S) for the model; "
                               "ask for fewer samples or looser filters, or retry later")


def sampler(served: ServedModel, seed: int, truncation: float, timeout_s: float, wait_when_full: bool = False):
    """(indices, labels) → (uint8 images, labels) through the micro-batcher. A request (the default) has one deadline,
    `timeout_s` from now, for all its calls (a filtered request makes one per round); with `wait_when_full` (exports),
    each call gets `timeout_s` and a full queue is waited out instead of answered with 503."""
    model = served.model
    request_deadline = None if wait_when_full else time.monotonic() + timeout_s

    async def generate(indices: list[int] | range, labels: list[int | None]) -> tuple[np.ndarray, np.ndarray]:
        args = (seed, indices, model.latent_dim, model.num_classes, labels)
        # ~5 µs a sample: a thread hop costs more than drawing a few latents on the event loop
        if len(indices) <= INLINE_SAMPLES:
            z, drawn = draw_latents(*args)
        else:
            z, drawn = await asyncio.to_thread(draw_latents, *args)
        delay, deadline = 0.05, time.monotonic() + timeout_s
        while True:
            wait_s = timeout_s if request_deadline is None else request_deadline - time.monotonic()
            if wait_s <= 0:
                raise _out_of_time(timeout_s)
            try:
                return await served.batcher.submit(z, drawn, truncation, wait_s), drawn.numpy()
            except RequestTimeoutError:
                if request_deadline is None:
                    raise
                raise _out_of_time(timeout_s) from None
            except OverloadedError:
                if not wait_when_full or time.monotonic() > deadline:  # never wait forever (an unloaded model)
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    return generate


async def generate_samples(served: ServedModel, plan: SamplePlan, settings: Settings) -> Samples:
    """The plan's samples at indices 0..n-1, or, with filters, the first candidate of each slot that passes them."""
    model, report, n = served.model, FilterReport(), len(plan)
    generate = sampler(served, plan.seed, plan.truncation, settings.request_timeout_s)
    images, labels, indices = await fill(generate, served.judge, served.executor, plan.filters, list(range(n)),
                                         plan.labels(), n, settings.filter_max_rounds, report)
    return Samples(model.name, images, labels if model.num_classes else None, model.class_names, plan.seed, indices,
                   report.rejected if plan.filters.active else None)

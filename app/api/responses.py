"""Encoding of samples as JSON (PNG base64 per sample), `.npz` bytes or one PNG grid, off the event loop."""

from __future__ import annotations

import asyncio
import base64
import math

from fastapi.responses import JSONResponse, Response

from app.api.schemas import OutputFormat, SamplePublic, SamplesPublic
from app.core.images import encode_png, image_grid
from app.engine.archives import npz_bytes
from app.engine.generation import INLINE_SAMPLES, Samples

# OpenAPI description of the three formats, for the routes' `responses=`.
SAMPLE_RESPONSES: dict[int | str, dict] = {
    200: {
        "model": SamplesPublic,
        "description": "format=json: samples with base64 PNGs; npz: arrays `images` and `labels`; png: one grid",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}}},
    },
}


def _json(samples: Samples) -> dict:
    items = []
    for position, image in enumerate(samples.images):
        label = int(samples.labels[position]) if samples.labels is not None else None
        index = int(samples.indices[position]) if samples.indices is not None else position
        items.append(SamplePublic(index=index, label=label,
                                  class_name=samples.class_names[label] if label is not None else None,
                                  png_base64=base64.b64encode(encode_png(image)).decode()).model_dump())
    return {"model": samples.model, "seed": samples.seed, "samples": items, "rejected": samples.rejected}


def _grid(samples: Samples) -> bytes:
    columns = samples.columns or max(1, math.ceil(math.sqrt(len(samples.images))))
    return encode_png(image_grid(samples.images, columns=columns, scale=2 if samples.images.shape[1] < 64 else 1))


async def _encode(samples: Samples, fn, *args):
    """Encode small answers on the event loop (a thread hop costs more than they do), large ones in a thread."""
    if len(samples.images) <= INLINE_SAMPLES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


async def samples_response(samples: Samples, output: OutputFormat) -> Response:
    headers = {"X-Seed": str(samples.seed)} if samples.seed is not None else {}
    if samples.rejected is not None:
        headers["X-Rejected"] = ",".join(f"{name}={count}" for name, count in samples.rejected.items())
    if output == "json":
        return JSONResponse(await _encode(samples, _json, samples), headers=headers)
    if output == "npz":
        labels = samples.labels if samples.labels is not None else [0] * len(samples.images)
        indices = samples.indices if samples.rejected is not None else None
        body = await _encode(samples, npz_bytes, samples.images, labels, indices)
        headers["Content-Disposition"] = f'attachment; filename="{samples.model}.npz"'
        return Response(body, media_type="application/octet-stream", headers=headers)
    return Response(await _encode(samples, _grid, samples), media_type="image/png", headers=headers)

"""Answers: samples as JSON (PNG base64 per sample), `.npz` bytes or one PNG grid (encoded off the event loop when
large), and files streamed from an open handle."""

from __future__ import annotations

import asyncio
import base64
import math
import re
from collections.abc import AsyncIterator
from typing import IO

from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.api.schemas import OutputFormat, SamplePublic, SamplesPublic
from app.core.images import image_grid
from app.core.png import encode_png
from app.engine.archives import npz_bytes
from app.engine.generation import INLINE_SAMPLES, Samples
from app.errors import RangeNotSatisfiableError

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


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The `[start, stop)` one `Range` header asks for (`bytes=START-`, `bytes=START-END` or the last N bytes,
    `bytes=-N`), or None to send the whole file: no header, or one this server ignores as RFC 9110 allows (another
    unit, several ranges, bad syntax). A range that starts past the end is refused (416)."""
    match = _RANGE.fullmatch((header or "").strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if size == 0:
        raise RangeNotSatisfiableError(f"cannot serve {header!r}: the file is empty", size)
    if not first:  # a suffix: the last N bytes
        if int(last) == 0:
            raise RangeNotSatisfiableError(f"cannot serve {header!r}: it asks for no bytes", size)
        return max(size - int(last), 0), size
    if last and int(last) < int(first):
        return None  # invalid, so ignored
    if int(first) >= size:
        raise RangeNotSatisfiableError(f"cannot serve {header!r} of a {size}-byte file; ask for 'bytes=START-', "
                                       "'bytes=START-END' or 'bytes=-N' within it", size)
    return int(first), min(size, int(last) + 1) if last else size


def open_file_response(handle: IO[bytes], size: int, media_type: str, filename: str, range_header: str | None,
                       head: bool = False) -> Response:
    """Stream an already opened file (whole, or the one range `byte_range` reads): once opened, deleting the file
    cannot truncate the answer. The handle is closed when the answer ends or the client goes away. With `head`,
    only the headers (size, ranges) for a HEAD request."""
    try:
        span = byte_range(range_header, size)
    except RangeNotSatisfiableError:
        handle.close()
        raise
    (start, stop), status = span or (0, size), 206 if span else 200
    headers = {"Content-Length": str(stop - start), "Accept-Ranges": "bytes",
               "Content-Disposition": f'attachment; filename="{filename}"'}
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    if head:
        handle.close()
        return Response(status_code=status, media_type=media_type, headers=headers)

    async def body() -> AsyncIterator[bytes]:
        try:
            await asyncio.to_thread(handle.seek, start)
            left = stop - start
            while left > 0:
                chunk = await asyncio.to_thread(handle.read, min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
        finally:
            handle.close()

    return StreamingResponse(body(), status_code=status, media_type=media_type, headers=headers)

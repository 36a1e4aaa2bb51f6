"""Helpers shared by the tests: decoding answers, encoding images, reading metrics, building zips."""

from __future__ import annotations

import asyncio
import io
import re
import struct
import time
import zipfile
import zlib

import httpx
import numpy as np
from PIL import Image


def npz_arrays(response: httpx.Response) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a 200 npz answer."""
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content), allow_pickle=False) as archive:
        return archive["images"], archive["labels"]


def metric_value(text: str, name: str, model: str) -> float:
    """A Prometheus sample `name{model="…"}` of /metrics (0 when absent)."""
    match = re.search(rf'^{name}\{{model="{model}"\}} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 `[H, W]` or `[H, W, 3]` → PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_metadata_bomb(kind: bytes = b"zTXt", size: int = 2_000_000, width: int = 8, height: int = 8) -> bytes:
    """A valid grey PNG with a zTXt or iCCP chunk that decompresses to `size` bytes (a few kB on the wire)."""
    keyword = b"Comment" if kind == b"zTXt" else b"profile"
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = b"".join(b"\x00" + bytes(width) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(kind, keyword + b"\x00\x00" + zlib.compress(b"A" * size, 9))
            + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_with_unnamed_member(members: dict[str, bytes]) -> bytes:
    """`members` plus one member whose name is "" (zipfile's writestr refuses that name as a str)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo(""), b"x")
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


async def wait_for_job(client: httpx.AsyncClient, job_id: str, states: tuple[str, ...] = ("succeeded", "failed"),
                       headers: dict[str, str] | None = None, timeout_s: float = 30.0) -> dict:
    """Poll a job until it is in one of `states` (at most `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
        if job["state"] in states:
            return job
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} stayed {job['state']}")

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


async def hang_up_mid_generation(app, batcher, method: str, path: str, query: bytes = b"", body: bytes = b"",
                                 headers: list[tuple[bytes, bytes]] = ()) -> list[dict]:  # type: ignore[no-untyped-def]
    """Drive one request through the ASGI `app` with a client that hangs up once `batcher` has run two forward
    passes for it; returns the messages the app sent."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        while batcher.stats.forward_passes < 2:
            await asyncio.sleep(0.001)
        return {"type": "http.disconnect"}

    messages: list[dict] = []

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": b"", "query_string": query, "root_path": "",
             "headers": [*headers, (b"host", b"test")], "client": ("127.0.0.1", 1), "server": ("test", 80),
             "state": {}}
    await app(scope, receive, send)
    return messages

"""PNG encoding, with numpy and Pillow only: the processes that encode exports import nothing else (no torch)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
    """uint8 `[H, W, C]` (C = 1 or 3) → PNG bytes (deterministic for the same pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_pngs(images: np.ndarray) -> list[bytes]:
    """`encode_png` of every image of a uint8 `[N, H, W, C]` batch."""
    return [encode_png(image) for image in images]

"""decode_image_folder bounds the bytes an upload decodes to, from the headers, before decoding any pixels."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from app.core.imagefolder import FolderLimits, decode_image_folder
from app.errors import DataError
from tests.helpers import png_bytes


def _truncated(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`×`height` grey pixels, with 10 bytes of pixel data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(10))) + chunk(b"IEND", b""))


def _grey(width: int, height: int) -> bytes:
    return png_bytes(np.full((height, width), 50, np.uint8))


def test_the_decoded_size_is_bounded_from_the_headers_before_decoding() -> None:
    entries = {"a": [(f"a/{i}.png", _truncated(100, 100)) for i in range(3)]}
    with pytest.raises(DataError, match=r"upload: the images decode to more than the limit of 20000 bytes .*"
                                        r"SYNTHGEN_MAX_TRAINING_DECODED_BYTES"):
        decode_image_folder(entries, "upload", FolderLimits(max_decoded_bytes=20_000))
    with pytest.raises(DataError, match="a/0.png: not a readable"):  # within the bound: decoded, and refused then
        decode_image_folder(entries, "upload", FolderLimits(max_decoded_bytes=30_000))


def test_colour_counts_three_bytes_a_pixel_and_the_bound_is_inclusive() -> None:
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 200
    entries = {"a": [("a/0.png", png_bytes(red)), ("a/1.png", png_bytes(red))]}
    folder = decode_image_folder(entries, "upload", FolderLimits(max_decoded_bytes=96))
    assert folder.images.shape == (2, 4, 4, 3) and folder.images.nbytes == 96
    with pytest.raises(DataError, match="more than the limit of 95 bytes"):
        decode_image_folder(entries, "upload", FolderLimits(max_decoded_bytes=95))


def test_convert_cannot_grow_small_images_past_the_bound() -> None:
    files = [("a/0.png", _grey(8, 8)), ("a/1.png", _grey(8, 8)), ("a/2.png", _grey(1, 1)), ("a/3.png", _grey(1, 2)),
             ("a/4.png", _grey(2, 1))]  # 133 bytes as sent, 5 × 8 × 8 = 320 once resized to the most common size
    folder = decode_image_folder({"a": files}, "upload", FolderLimits(max_decoded_bytes=320), convert=True)
    assert folder.images.shape == (5, 8, 8, 1) and (folder.images[:2] == 50).all()
    with pytest.raises(DataError, match="more than the limit of 200 bytes"):
        decode_image_folder({"a": files}, "upload", FolderLimits(max_decoded_bytes=200), convert=True)

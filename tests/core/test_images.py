"""Decoding uploaded images: every bad file is a DataError naming the file and the fix, never an internal error."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app.core.images import decode_image
from app.errors import DataError
from tests.helpers import png_bytes, png_metadata_bomb


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width`×`height`, with a few bytes of pixel data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(10)))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("kind", [b"zTXt", b"iCCP"])
def test_metadata_bombs_are_refused_naming_the_file(kind: bytes) -> None:
    with pytest.raises(DataError, match=r"^bomb\.png: a text or colour-profile .* chunk decompresses to more"):
        decode_image(png_metadata_bomb(kind), "bomb.png")


def test_images_over_the_limit_name_the_setting_not_pillows_limit() -> None:
    with pytest.raises(DataError, match=r"^big\.png: 300×300 pixels is over the limit of 1000 pixels "
                                        r"\(SYNTHGEN_MAX_TRAINING_PIXELS\)") as caught:
        decode_image(png_bytes(np.zeros((300, 300), np.uint8)), "big.png", 1000, "SYNTHGEN_MAX_TRAINING_PIXELS")
    with pytest.raises(DataError, match=r"^huge\.png: over the limit of 1000 pixels \(SYNTHGEN_MAX_IMAGE_PIXELS\)"):
        decode_image(_png_header(100_000, 100_000), "huge.png", 1000)  # Pillow refuses it itself, in open()
    assert "178956970" not in str(caught.value)


def test_unreadable_images_show_no_internals() -> None:
    with pytest.raises(DataError) as caught:
        decode_image(b"hello", "a.png")
    assert str(caught.value) == "a.png: not a readable PNG/JPEG image"


def test_an_animated_png_is_refused_not_read_as_its_first_frame() -> None:
    frames = [Image.fromarray(np.full((4, 4), value, np.uint8)) for value in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match="moving.png: an animated PNG of 2 frames"):
        decode_image(buffer.getvalue(), "moving.png")
    assert decode_image(png_bytes(np.zeros((4, 4), np.uint8)), "still.png").size == (4, 4)

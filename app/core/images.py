"""Pixels: uint8 ↔ the networks' [-1, 1] range, decoding uploaded images safely, and sample grids."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from app.errors import DataError, InvalidInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_IMAGE_PIXELS = 4096 * 4096
PIXEL_NORMALISATION = {"from_uint8": "x / 127.5 - 1", "range": [-1.0, 1.0], "layout": "NCHW"}


def shared_images(a: np.ndarray, b: np.ndarray) -> int:
    """How many images of `b` are pixel-identical to an image of `a` (uint8 `[N, H, W, C]`)."""
    seen = {image.tobytes() for image in a}
    return sum(image.tobytes() in seen for image in b)


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 `[N, H, W, C]` → float32 `[N, C, H, W]` in [-1, 1]."""
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:
        images = images.copy()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float `[N, C, H, W]` in [-1, 1] → uint8 `[N, H, W, C]`, rounding to the nearest level. Converted where the
    tensor is: from a GPU, a quarter of the float32 bytes cross to the host."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _too_big(max_pixels: int, setting: str) -> str:
    return f"over the limit of {max_pixels} pixels ({setting}); send a smaller image"


@contextmanager
def _reading(name: str, max_pixels: int, setting: str) -> Iterator[None]:
    """Pillow's errors while reading `name` → a DataError naming the file, without Pillow's internals."""
    try:
        yield
    except Image.DecompressionBombError as exc:  # Pillow refused it in open(), before our check saw the size
        raise DataError(f"{name}: {_too_big(max_pixels, setting)}") from exc
    except UnidentifiedImageError as exc:  # its message shows the buffer's repr, not the file
        raise DataError(f"{name}: not a readable PNG/JPEG image") from exc
    except ValueError as exc:
        if "MAX_TEXT_CHUNK" in str(exc):  # a zTXt/iTXt/iCCP chunk decompressing past Pillow's bound
            raise DataError(f"{name}: a text or colour-profile (zTXt, iTXt or iCCP) chunk decompresses to more "
                            "than 1 MB; re-save the image without that metadata") from exc
        raise DataError(f"{name}: not a readable PNG/JPEG image ({exc})") from exc
    except (OSError, SyntaxError) as exc:
        raise DataError(f"{name}: not a readable PNG/JPEG image ({exc})") from exc


def open_image(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS,
               setting: str = "SYNTHGEN_MAX_IMAGE_PIXELS") -> Image.Image:
    """Open PNG/JPEG bytes and check their header (size, format) without decoding the pixels; `setting` names the
    limit `max_pixels` comes from in the message."""
    with _reading(name, max_pixels, setting):
        image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
        raise DataError(f"{name}: {width}×{height} pixels is {_too_big(max_pixels, setting)}")
    if image.format not in ("PNG", "JPEG"):
        raise DataError(f"{name}: {image.format} images are not supported; use PNG or JPEG")
    if getattr(image, "is_animated", False):  # only the first frame would be read
        raise DataError(f"{name}: an animated PNG of {image.n_frames} frames; send each frame as an image of its own")
    return image


def decode_image(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS,
                 setting: str = "SYNTHGEN_MAX_IMAGE_PIXELS") -> Image.Image:
    """Decode PNG/JPEG bytes, refusing corrupt files and decompression bombs before the pixels are read."""
    image = open_image(data, name, max_pixels, setting)
    with _reading(name, max_pixels, setting):
        image.load()
    return image


def decode_to_shape(data: bytes, name: str, shape: tuple[int, int, int], owner: str, convert: bool,
                    max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """PNG/JPEG bytes → uint8 `[H, W, C]` of `shape` (what `owner`, a model, works on); resized only when
    `convert`, else a size mismatch is refused."""
    image = to_8_bit(decode_image(data, name, max_pixels))
    height, width, channels = shape
    mode = "L" if channels == 1 else "RGB"
    if image.size != (width, height) or image.mode != mode:
        if not convert and image.size != (width, height):
            raise InvalidInputError(f"{name}: {image.size[0]}×{image.size[1]} pixels, but {owner} works on "
                                    f"{width}×{height}; resize it or pass convert=true")
        image = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grey scaled to 8 bits; Pillow's own conversion would clip it to 0/255."""
    if image.mode.startswith("I"):
        scaled = np.rint(np.asarray(image, dtype=np.float64) / 257.0)
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")
    return image


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 2, scale: int = 1) -> np.ndarray:
    """uint8 `[N, H, W, C]` → one uint8 `[H', W', C]` grid, `columns` wide (default: about square)."""
    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    grid = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid

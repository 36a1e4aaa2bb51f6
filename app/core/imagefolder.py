"""An ImageFolder upload (class folder → image files) decoded into one array, or refused naming the file and the
fix: unreadable files, mixed sizes, colour among greyscale, classes with too few images, too many images.
`convert` normalises instead: every image to the most common size and colour mode."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from app.core.images import MAX_IMAGE_PIXELS, decode_image, open_image, to_8_bit
from app.errors import DataError


@dataclass
class FolderLimits:
    """What a training upload may hold."""

    max_pixels: int = MAX_IMAGE_PIXELS  # per image
    pixels_setting: str = "SYNTHGEN_MAX_IMAGE_PIXELS"  # named in the message when an image is over max_pixels
    max_decoded_bytes: int | None = None  # width × height × channels summed over the images; None: no bound
    max_images: int = 1_000_000
    min_per_class: int = 1


@dataclass
class DecodedFolder:
    """uint8 images `[N, H, W, C]`, int64 labels indexing `class_names` (the folder names, sorted), and what
    `convert` changed."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    conversions: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(self.class_names)}


def _is_grey_mode(mode: str) -> bool:
    return mode in ("1", "L", "LA") or mode.startswith("I")


def _is_colour(image: Image.Image) -> bool:
    """Colour in fact: an RGB file whose three channels are equal is greyscale."""
    if _is_grey_mode(image.mode):
        return False
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any())


def _check_decoded_bytes(decoded_bytes: int, limit: int, source: str) -> None:
    if decoded_bytes > limit:
        raise DataError(f"{source}: the images decode to more than the limit of {limit} bytes (width × height × "
                        "channels, summed; SYNTHGEN_MAX_TRAINING_DECODED_BYTES); send fewer or smaller images")


def decode_image_folder(entries: dict[str, list[tuple[str, bytes]]], source: str, limits: FolderLimits | None = None,
                        convert: bool = False) -> DecodedFolder:
    """Class folder → [(file name, PNG/JPEG bytes)] into one dataset; classes sorted by name."""
    limits = limits or FolderLimits()
    if "" in entries:
        raise DataError(f"{source}: images at the top level; put them in class folders <class_name>/<image>.png")
    if not entries:
        raise DataError(f"{source}: no class folders with images; expected <class_name>/<image>.png")
    total = sum(len(files) for files in entries.values())
    if total > limits.max_images:
        raise DataError(f"{source}: {total} images is over the limit of {limits.max_images}; send fewer")
    class_names = sorted(entries)
    for name in class_names:
        if len(entries[name]) < limits.min_per_class:
            raise DataError(f"{source}: class {name!r} has {len(entries[name])} image(s), fewer than the "
                            f"{limits.min_per_class} a class needs; add images to it or leave the folder out")
    files = [(file_name, data, label) for label, class_name in enumerate(class_names)
             for file_name, data in sorted(entries[class_name])]
    if limits.max_decoded_bytes is not None:  # from the headers, before any pixels are decoded
        decoded_bytes = 0
        for file_name, data, _ in files:
            image = open_image(data, file_name, limits.max_pixels, limits.pixels_setting)
            decoded_bytes += image.width * image.height * (1 if _is_grey_mode(image.mode) else 3)
            _check_decoded_bytes(decoded_bytes, limits.max_decoded_bytes, source)
    names = [file_name for file_name, _, _ in files]
    labels = np.array([label for _, _, label in files], dtype=np.int64)
    decoded = [
        to_8_bit(decode_image(data, file_name, limits.max_pixels, limits.pixels_setting))
        for file_name, data, _ in files]
    sizes = Counter(image.size for image in decoded)
    size = sizes.most_common(1)[0][0]
    colour = [_is_colour(image) for image in decoded]
    majority_colour = sum(colour) * 2 > len(colour)
    conversions = []
    if len(sizes) > 1:
        name, odd = next((name, image) for name, image in zip(names, decoded) if image.size != size)
        if not convert:
            raise DataError(f"{name}: {odd.size[0]}×{odd.size[1]} pixels, but {sizes[size]} of {len(decoded)} images "
                            f"are {size[0]}×{size[1]}; resize it, leave it out, or send convert=true to resize every "
                            "image to the most common size")
        conversions.append(f"{len(decoded) - sizes[size]} image(s) resized to {size[0]}×{size[1]}")
    if 0 < sum(colour) < len(colour):
        name = next(name for name, is_colour in zip(names, colour) if is_colour != majority_colour)
        what, most = ("colour", "greyscale") if not majority_colour else ("greyscale", "colour")
        minority = len(colour) - sum(colour) if majority_colour else sum(colour)
        if not convert:
            raise DataError(f"{name}: {what}, but {len(colour) - minority} of {len(colour)} images are {most} (one "
                            f"colour mode makes the whole model {what} then); convert or leave out the "
                            f"{minority} {what} image(s), or send convert=true to make every image {most}")
        conversions.append(f"{minority} {what} image(s) converted to {most}")
    mode, channels = ("RGB", 3) if majority_colour else ("L", 1)
    if limits.max_decoded_bytes is not None:  # resizing to the most common size may have grown small images
        _check_decoded_bytes(len(decoded) * size[0] * size[1] * channels, limits.max_decoded_bytes, source)
    images = np.empty((len(decoded), size[1], size[0], channels), dtype=np.uint8)
    decoded.reverse()  # popped in order, each image let go once copied: the list and the array are never both whole
    for i in range(len(images)):
        image = decoded.pop().convert(mode)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        images[i] = np.asarray(image, dtype=np.uint8).reshape(size[1], size[0], channels)
    return DecodedFolder(images, labels, class_names, conversions)

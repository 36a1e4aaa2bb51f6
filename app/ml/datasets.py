"""Image datasets from IDX files, ImageFolder directories or zips, `.npz` arrays and scikit-learn's digits.

A data SPEC names one of them: a path (`.npz`, `.zip`, an IDX images file, a directory of IDX files or of class
sub-folders) or the word `digits`; an optional `#START:STOP` suffix keeps that slice of the examples, and
`#START:STOP,START:STOP` the concatenation of several (e.g. `mnist#0:1000,2000:8000` leaves 1,000–1,999 out).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.imagefolder import FolderLimits, decode_image_folder
from app.core.images import MAX_IMAGE_PIXELS, shared_images, to_model_range
from app.core.safezip import ZipLimits, check_image_file, read_zip
from app.errors import DataError

_IDX_UBYTE = 0x08
_SLICES = re.compile(r"^(?P<path>.*)#(?P<slices>-?\d*:-?\d*(?:,-?\d*:-?\d*)*)$")


@dataclass
class ImageDataset:
    """Images as uint8 `[N, H, W, C]`, labels as int64 `[N]` indexing `class_names`."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8 [N, H, W, C], got {self.images.dtype} {list(self.images.shape)}")
        if self.labels.shape != (len(self.images),):
            raise DataError(f"{len(self.labels)} labels for {len(self.images)} images: the counts must match")
        if len(self.images) == 0:
            raise DataError("the dataset is empty")
        if self.images.shape[-1] not in (1, 3):  # what the networks and PNG encoding take: grey or RGB
            raise DataError(f"images must have 1 (grey) or 3 (RGB) channels, not {self.images.shape[-1]}")
        low, high = int(self.labels.min()), int(self.labels.max())
        if low < 0 or high >= max(len(self.class_names), 1):
            raise DataError(f"labels must lie in 0..{max(len(self.class_names), 1) - 1} (one per class name), "
                            f"got {low}..{high}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, channels)."""
        _, h, w, c = self.images.shape
        return h, w, c

    def subset(self, index: np.ndarray | slice) -> ImageDataset:
        return ImageDataset(self.images[index], self.labels[index], self.class_names)

    def fingerprint(self) -> str:
        """sha256 of the shapes, pixels, labels and class names: identifies the training data in a checkpoint."""
        digest = hashlib.sha256()
        digest.update(repr((self.images.shape, self.class_names)).encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(self.labels.astype("<i8").tobytes())
        return "sha256:" + digest.hexdigest()

    def split(self, val_fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """A seeded random (train, validation) split; the same seed always gives the same split."""
        n_val = round(len(self) * val_fraction)
        if not 0 < n_val < len(self):
            raise DataError(f"a validation fraction of {val_fraction} leaves no train or no validation examples")
        order = np.random.default_rng(seed).permutation(len(self))
        return self.subset(np.sort(order[n_val:])), self.subset(np.sort(order[:n_val]))

    def aligned_to(self, class_names: list[str]) -> ImageDataset:
        """The labels renumbered to `class_names`' order when this dataset names the same classes in another order
        (an ImageFolder's classes are sorted by name); unchanged when its names are only indices (IDX files)."""
        if self.class_names == class_names or self.class_names == [str(i) for i in range(len(self.class_names))]:
            return self
        if sorted(self.class_names) != sorted(class_names):
            raise DataError(f"the data's classes {self.class_names} are not the model's {class_names}")
        mapping = np.array([class_names.index(name) for name in self.class_names], dtype=np.int64)
        return ImageDataset(self.images, mapping[self.labels], list(class_names))

    def to_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as float32 `[N, C, H, W]` in [-1, 1] (the networks' pixel normalisation) and int64 labels."""
        return to_model_range(self.images), torch.from_numpy(self.labels.astype(np.int64))


def load_dataset(spec: str) -> ImageDataset:
    """Load the dataset a SPEC names (see the module docstring)."""
    match = _SLICES.match(spec)
    if not match:
        head, hash_sign, tail = spec.rpartition("#")
        if hash_sign and not Path(spec).exists() and (head == "digits" or Path(head).exists()):
            raise DataError(f"{spec!r}: the slice #{tail} is not START:STOP (integers, either may be left out; several "
                            "separated by commas, e.g. #0:1000,2000:)")
        return _load_whole(spec)
    dataset = _load_whole(match["path"])
    rows = np.arange(len(dataset))
    bounds = [part.split(":") for part in match["slices"].split(",")]
    index = np.concatenate([rows[slice(int(a) if a else None, int(b) if b else None)] for a, b in bounds])
    if len(index) == 0:
        raise DataError(f"the slice #{match['slices']} of {match['path']!r} is empty")
    return dataset.subset(index)


def load_training_data(spec: str, class_names: list[str], fingerprint: str | None) -> ImageDataset:
    """The data `spec` names as a model saw it in training (labels under the model's `class_names`: an IDX file
    names its classes by index), refused unless it is that data (pixels, labels and names): split differently, other
    data would put training images among the "validation" images that scores are measured on."""
    dataset = load_dataset(spec).aligned_to(class_names)
    if dataset.class_names != class_names and len(dataset.class_names) == len(class_names):
        dataset = ImageDataset(dataset.images, dataset.labels, list(class_names))
    if fingerprint is not None and dataset.fingerprint() != fingerprint:
        raise DataError(f"{spec!r} is not the data this model was trained on (its fingerprint differs from the one in "
                        "config.json's training_data); pass the training data SPEC recorded there")
    return dataset


def load_validation_data(spec: str, training: ImageDataset, fingerprint: str | None = None) -> ImageDataset:
    """Validation images given apart from the training data (`--val-data`), labelled as `training` is; refused when
    more than a few of them are training images (a validation set must be held out) or, given the `fingerprint`
    recorded in training, when they are not the images the model was validated on."""
    val = load_training_data(spec, training.class_names, None)
    if fingerprint is not None and val.fingerprint() != fingerprint:
        raise DataError(f"{spec!r} is not the validation data this model was trained with (its fingerprint differs "
                        "from config.json's training_data.val_fingerprint); pass the val_data SPEC recorded there")
    if val.shape != training.shape:
        raise DataError(f"the validation images are {val.shape[0]}x{val.shape[1]}x{val.shape[2]}, the training images "
                        f"{training.shape[0]}x{training.shape[1]}x{training.shape[2]}: they must match")
    overlap = shared_images(training.images, val.images)
    if overlap > len(val) // 100:  # a few duplicates happen in real data; more means the sets overlap
        raise DataError(f"{overlap} of the {len(val)} validation images are pixel-identical to training images; pass "
                        "images held out of --data (e.g. another slice: data#0:7000 and data#7000:8000)")
    return val


def split_as_trained(dataset: ImageDataset, training_data: dict[str, Any],
                     val_spec: str | None = None) -> tuple[ImageDataset, ImageDataset]:
    """The (train, validation) split a model was trained with, from config.json's `training_data`: all of `dataset`
    and its validation data when it was given apart (`val_spec` stands in for the recorded path, e.g. on another
    machine), else the seeded random split of `dataset`."""
    recorded = training_data.get("val_data")
    if recorded is None:
        if val_spec is not None:
            raise DataError("this model was validated on a random split of its training data, not on --val-data; "
                            "leave --val-data out")
        return dataset.split(training_data.get("val_fraction", 0.1), training_data.get("split_seed", 0))
    return dataset, load_validation_data(val_spec or recorded, dataset, training_data.get("val_fingerprint"))


def _load_whole(spec: str) -> ImageDataset:
    if spec == "digits":
        return load_sklearn_digits()
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{spec!r} is neither an existing path nor 'digits'")
    if path.is_dir():
        idx_images = sorted(path.glob("*idx3-ubyte*"))
        if len(idx_images) == 1:
            return load_idx_pair(idx_images[0])
        if len(idx_images) > 1:
            raise DataError(f"{path} holds several IDX image files; name one: {[p.name for p in idx_images]}")
        return load_image_folder(path)
    if path.suffix == ".npz":
        return load_npz(path)
    if path.suffix == ".zip":
        return load_image_zip(path)
    if "idx3-ubyte" in path.name:
        return load_idx_pair(path)
    if "idx1-ubyte" in path.name:
        raise DataError(f"{path}: an IDX labels file; give the images file (…-images-idx3-ubyte…): its labels are "
                        "read from the labels file beside it")
    raise DataError(f"{path}: unknown data format; use an .npz, a .zip, an IDX images file or an ImageFolder directory")


def load_sklearn_digits() -> ImageDataset:
    """scikit-learn's 8×8 digits (1,797 images), scaled from 0..16 to 0..255."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("the 'digits' data set needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return ImageDataset(images, bunch.target.astype(np.int64), [str(i) for i in range(10)])


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (MNIST's format), gzipped or not, of unsigned bytes."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read or decompress ({exc})") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != _IDX_UBYTE:
        raise DataError(f"{path}: IDX data type 0x{raw[2]:02x} is not supported; only unsigned bytes (0x08) are")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: truncated or padded IDX data: header says {dims} = {expected} bytes, "
                        f"file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_pair(images_path: Path) -> ImageDataset:
    """IDX images `[N, H, W]` with the labels file beside them (`idx3`→`idx1`, `images`→`labels` in the name)."""
    labels_name = images_path.name.replace("idx3", "idx1").replace("images", "labels").removesuffix(".gz")
    candidates = [images_path.with_name(labels_name), images_path.with_name(labels_name + ".gz")]
    labels_path = next((path for path in candidates if path.exists()), None)
    if labels_path is None:
        raise DataError(f"{images_path}: no labels file {labels_name}[.gz] beside it")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: IDX images must have 3 dimensions [N, H, W], got {images.ndim}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: IDX labels must have 1 dimension, got {labels.ndim}")
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    return ImageDataset(images[..., None].copy(), labels.astype(np.int64), [str(i) for i in range(n_classes)])


def load_npz(path: Path) -> ImageDataset:
    """An `.npz` with `images` (uint8 [N,H,W] or [N,H,W,C]), `labels` and optionally `class_names`."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz without pickled objects ({exc})") from exc
    missing = {"images", "labels"} - arrays.keys()
    if missing:
        raise DataError(f"{path}: missing arrays {sorted(missing)}; an .npz needs 'images' and 'labels'")
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(f"{path}: 'images' must be uint8 [N,H,W] or [N,H,W,C], got {images.dtype} {list(images.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be integers, got {labels.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if "class_names" in arrays:
        class_names = [str(name) for name in arrays["class_names"].tolist()]
    else:
        class_names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    return ImageDataset(np.ascontiguousarray(images), labels.astype(np.int64), class_names)


def images_to_dataset(entries: dict[str, list[tuple[str, bytes]]], source: str,
                      max_pixels: int = MAX_IMAGE_PIXELS) -> ImageDataset:
    """Class folder → [(name, PNG/JPEG bytes)] into one dataset (classes sorted; one size; one colour mode)."""
    folder = decode_image_folder(entries, source, FolderLimits(max_pixels=max_pixels))
    return ImageDataset(folder.images, folder.labels, folder.class_names)


def load_image_folder(root: Path) -> ImageDataset:
    """ImageFolder layout: `root/<class_name>/<image>`; files at the top level (labels.csv …) are ignored."""
    entries: dict[str, list[tuple[str, bytes]]] = {}
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = entries.setdefault(class_dir.name, [])
        for file in sorted(class_dir.iterdir()):
            if file.name.startswith("."):
                continue
            if file.is_symlink() or not file.is_file():
                raise DataError(f"{file}: class folders may hold only plain image files")
            check_image_file(str(file))
            files.append((str(file), file.read_bytes()))
    return images_to_dataset(entries, str(root))


def load_image_zip(path: Path, limits: ZipLimits | None = None) -> ImageDataset:
    """ImageFolder layout inside a zip (optionally under one top folder), read with bounded decompression."""
    entries, _ = read_zip(path, limits)
    return images_to_dataset(entries, str(path), (limits or ZipLimits()).max_pixels)

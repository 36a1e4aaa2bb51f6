"""Writing generated samples to disk: `.npz` arrays, a PNG grid, or ImageFolder PNGs in a directory or a zip.

The ImageFolder layout is `<class_name>/<8-digit index>.png` with `labels.csv`
(file_name,label,class_name,seed,index) and `manifest.json`; the same inputs always give the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import InvalidInputError
from app.plots import encode_png, image_grid

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # a fixed timestamp keeps zips byte-identical between runs
LABELS_HEADER = ["file_name", "label", "class_name", "seed", "index"]


def npz_bytes(images: np.ndarray, labels: np.ndarray | list[int]) -> bytes:
    """`images` as uint8 [N,H,W] (one channel) or [N,H,W,C], `labels` as int64 [N], in an uncompressed .npz."""
    buffer = io.BytesIO()
    np.savez(buffer, images=images[..., 0] if images.shape[-1] == 1 else images,
             labels=np.asarray(labels, dtype=np.int64))
    return buffer.getvalue()


def sample_file_name(class_name: str, index: int) -> str:
    return f"{class_name}/{index:08d}.png"


def image_folder_files(images: np.ndarray, labels: np.ndarray, class_names: list[str], seed: int,
                       manifest: dict[str, Any], start_index: int = 0) -> list[tuple[str, bytes]]:
    """(path, bytes) for every file of the ImageFolder layout, PNGs first, then labels.csv and manifest.json."""
    files, rows = [], []
    for offset, (image, label) in enumerate(zip(images, labels)):
        index = start_index + offset
        name = sample_file_name(class_names[label] if class_names else "samples", index)
        files.append((name, encode_png(image)))
        rows.append([name, int(label), class_names[label] if class_names else "", seed, index])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(LABELS_HEADER)
    writer.writerows(rows)
    counts = Counter(class_names[label] if class_names else "samples" for label in labels.tolist())
    manifest = {**manifest, "seed": seed, "count": len(images), "counts": dict(sorted(counts.items()))}
    files.append(("labels.csv", text.getvalue().encode()))
    files.append(("manifest.json", (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode()))
    return files


def write_output(path: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str], seed: int,
                 manifest: dict[str, Any]) -> None:
    """Write samples to `path`: `.npz`, `.zip`, a `.png` grid (a row per class when balanced), or a directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        counts = np.bincount(labels)
        balanced = len(class_names) > 1 and len(set(counts.tolist())) == 1 and np.all(np.diff(labels) >= 0)
        path.write_bytes(encode_png(image_grid(images, columns=int(counts[0]) if balanced else None, scale=2)))
        return
    if path.suffix == ".npz":
        path.write_bytes(npz_bytes(images, labels))
        return
    files = image_folder_files(images, labels, class_names, seed, manifest)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in files:
                archive.writestr(zipfile.ZipInfo(name, date_time=_ZIP_EPOCH), data)
        return
    if path.suffix:
        raise InvalidInputError(f"--out {path}: use a .npz, .zip or .png file, or a directory without a suffix")
    if path.exists() and any(path.iterdir()):
        raise InvalidInputError(f"--out {path}: the directory is not empty; choose a new one")
    for name, data in files:
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

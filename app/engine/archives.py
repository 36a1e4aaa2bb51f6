"""Writing generated samples to disk: `.npz` arrays, a PNG grid, or ImageFolder PNGs in a directory or a zip.

The ImageFolder layout is `<class_name>/<8-digit index>.png` with `labels.csv` (file_name,label,class_name,seed,index),
the same rows as `metadata.parquet` with the Hugging Face features, a dataset card `README.md` and `manifest.json`.
WebDataset tars come as shards. The same inputs always give the same bytes.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import struct
import zipfile
import zlib
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npformat

from app.core.images import image_grid
from app.core.png import encode_png, encode_pngs
from app.engine.hub import MetadataParquet, ParquetExport, dataset_card
from app.engine.sink import ByteSink
from app.errors import InvalidInputError
from app.settings import Settings

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # a fixed timestamp keeps zips byte-identical between runs
LABELS_HEADER = ["file_name", "label", "class_name", "seed", "index"]
ZIP32_BYTES = 0xFFFF_0000  # members beyond this need zip64, which zipfile writes


def npz_bytes(images: np.ndarray, labels: np.ndarray | list[int], indices: np.ndarray | None = None) -> bytes:
    """`images` as uint8 [N,H,W] (one channel) or [N,H,W,C], `labels` as int64 [N] (and the sample `indices`
    when they are not 0..N-1), in an uncompressed .npz (what `np.savez` writes, read by `np.load`)."""
    arrays = {"images": images[..., 0] if images.shape[-1] == 1 else images,
              "labels": np.asarray(labels, dtype=np.int64)}
    if indices is not None:
        arrays["indices"] = np.asarray(indices, dtype=np.int64)
    return _stored_zip({f"{name}.npy": _npy(array) for name, array in arrays.items()})


def _npy(array: np.ndarray) -> bytes:
    return _npy_header(array.dtype, array.shape) + np.ascontiguousarray(array).tobytes()


@functools.lru_cache(maxsize=256)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy header of a C-ordered array (numpy writes it in Python: costly on every small answer)."""
    header = io.BytesIO()
    npformat.write_array_header_1_0(header, {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False,
                                             "shape": shape})
    return header.getvalue()


def _stored_zip(members: dict[str, bytes]) -> bytes:
    """A zip of uncompressed members, written directly: `zipfile` costs more than a small answer's arrays (this is
    on every /generate answer)."""
    if sum(len(data) for data in members.values()) >= ZIP32_BYTES:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in members.items():
                archive.writestr(zipfile.ZipInfo(name, date_time=_ZIP_EPOCH), data)
        return buffer.getvalue()
    dos_time, dos_date = 0, (_ZIP_EPOCH[0] - 1980) << 9 | _ZIP_EPOCH[1] << 5 | _ZIP_EPOCH[2]
    parts, directory, offset = [], [], 0
    for name, data in members.items():
        encoded, crc = name.encode(), zlib.crc32(data)
        fields = (0, 0, dos_time, dos_date, crc, len(data), len(data), len(encoded))
        local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, *fields, 0) + encoded
        directory.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, *fields, 0, 0, 0, 0, 0, offset)
                         + encoded)
        parts += [local, data]
        offset += len(local) + len(data)
    central = b"".join(directory)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), offset, 0)
    return b"".join([*parts, central, end])


def csv_cell(value: object) -> object:
    """A cell that spreadsheets will not run as a formula: text starting with = + - @ (or a tab or carriage
    return) gets a leading apostrophe (OWASP's advice for CSV injection)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def sample_file_name(class_name: str, index: int) -> str:
    return f"{class_name}/{index:08d}.png"


class ImageFolderZip:
    """Writes the ImageFolder layout into a zip as a stream: add samples batch by batch and `take()` the bytes
    written so far, so an archive of any size needs only one batch in memory. With `sources`, files are named
    `<class>/<source>-<index>.png` and labels.csv gets a `source` column (original, augmented, synthetic)."""

    SOURCES = ("original", "augmented", "synthetic")

    def __init__(self, class_names: list[str], seed: int, sources: bool = False) -> None:
        self.class_names, self.seed, self.sources = class_names, seed, sources
        self._sink = ByteSink()
        self._zip = zipfile.ZipFile(self._sink, "w", compression=zipfile.ZIP_STORED)  # type: ignore[arg-type]
        # 17 bytes a sample, for labels.csv at the end; metadata.parquet is written as samples come
        self._labels, self._indices, self._source = array("q"), array("q"), array("b")
        self._metadata = MetadataParquet(class_names, seed, sources)

    def _class(self, label: int) -> str:
        return self.class_names[label] if self.class_names else "samples"

    def _name(self, label: int, index: int, source: int) -> str:
        if not self.sources:
            return sample_file_name(self._class(label), index)
        return f"{self._class(label)}/{self.SOURCES[source]}-{index:08d}.png"

    def _write(self, name: str, data: bytes) -> None:
        info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
        info.external_attr = 0o644 << 16
        self._zip.writestr(info, data)

    def add(self, images: np.ndarray, labels: np.ndarray, indices: list[int] | range,
            source: str = "synthetic", pngs: list[bytes] | None = None) -> bytes:
        """Add PNGs for these samples (`pngs`: already encoded); returns the archive bytes produced."""
        code = self.SOURCES.index(source)
        for png, label, index in zip(pngs or encode_pngs(images), labels.tolist(), indices):
            name = self._name(label, index, code)
            self._write(name, png)
            self._metadata.add(name, int(label), int(index), source if self.sources else None)
            self._labels.append(int(label))
            self._indices.append(int(index))
            self._source.append(code)
        return self._sink.take()

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self._class(label) for label in self._labels).items()))

    def finish(self, manifest: dict[str, Any]) -> bytes:
        """Write labels.csv, metadata.parquet, README.md and manifest.json and close the archive; returns the last
        bytes."""
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(LABELS_HEADER + (["source"] if self.sources else []))
        for label, index, code in zip(self._labels, self._indices, self._source):
            row = [self._name(label, index, code), label, self.class_names[label] if self.class_names else "",
                   self.seed, index]
            writer.writerow([csv_cell(cell) for cell in row + ([self.SOURCES[code]] if self.sources else [])])
        manifest = {**manifest, "seed": self.seed, "count": len(self._labels), "counts": self.counts()}
        self._write("labels.csv", text.getvalue().encode())
        self._write("metadata.parquet", self._metadata.finish())
        self._write("README.md", dataset_card(manifest, self.class_names, self.sources).encode())
        self._write("manifest.json", (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode())
        self._zip.close()
        return self._sink.take()


TAR_BLOCK, TAR_RECORD = 512, 20 * 512
_USTAR_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")


def tar_member(name: str, data: bytes) -> bytes:
    """One file as `tarfile` writes it in the USTAR format with mode 644, owner 0 and time 0: a 512-byte header, the
    data, zeros to the next block. Written directly: `tarfile` costs more than the small PNGs it would store."""
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"tar member name over 100 bytes: {name!r}")
    header = bytearray(_USTAR_HEADER.pack(encoded, b"0000644\0", b"0000000\0", b"0000000\0",
                                          b"%011o\0" % len(data), b"00000000000\0", b" " * 8, b"0", b"",
                                          b"ustar\x0000", b"", b"", b"", b"", b""))
    header[148:156] = b"%06o\0 " % sum(header)  # the checksum: every byte, its own field read as spaces
    return bytes(header) + data + bytes(-len(data) % TAR_BLOCK)


class WebDatasetShards:
    """Samples as WebDataset shards: `<prefix>-000000.tar`, … of at most `shard_size` samples each, every sample
    `<key>.png`, `<key>.cls` (the label) and `<key>.json` (label, class name, model, seed, index), keys being 8-digit
    indices. Nothing else goes into a shard, so `wds.WebDataset(urls)` reads every member as part of a sample; the
    manifest is a sidecar file. `add` and `finish` return `(file name, bytes)` pieces in order."""

    def __init__(self, class_names: list[str], seed: int, model: str, prefix: str, shard_size: int,
                 start: int = 0) -> None:
        """`start` > 0 resumes at that sample (a multiple of `shard_size`, or the end of the dataset): the shards
        before it were written by an earlier run."""
        self.class_names, self.seed, self.model = class_names, seed, model
        self.prefix, self.shard_size = prefix, shard_size
        self._sink = ByteSink()
        self._written: int | None = None  # bytes of the open shard; None: no shard open
        self._shard, self._in_shard, self._count = -(-start // shard_size) - 1, 0, start

    @property
    def shard_name(self) -> str:
        return f"{self.prefix}-{self._shard:06d}.tar"

    def _close_shard(self) -> list[tuple[str, bytes]]:
        if self._written is None:
            return []
        end = 2 * TAR_BLOCK  # two zero blocks, then zeros to a whole record, as tar (and tarfile) end an archive
        self._sink.write(bytes(end + -(self._written + end) % TAR_RECORD))
        self._written = None
        return [(self.shard_name, self._sink.take())]

    def _write(self, name: str, data: bytes) -> None:
        member = tar_member(name, data)
        self._sink.write(member)
        self._written = (self._written or 0) + len(member)

    def add(self, images: np.ndarray, labels: np.ndarray, indices: list[int] | range,
            pngs: list[bytes] | None = None) -> list[tuple[str, bytes]]:
        pieces: list[tuple[str, bytes]] = []
        for png, label, index in zip(pngs or encode_pngs(images), labels.tolist(), indices):
            if self._written is None or self._in_shard == self.shard_size:
                pieces += self._close_shard()
                self._shard, self._in_shard, self._written = self._shard + 1, 0, 0
            key = f"{index:08d}"
            self._write(f"{key}.png", png)
            self._write(f"{key}.cls", str(label).encode())
            self._write(f"{key}.json", json.dumps({
                "label": label, "class_name": self.class_names[label] if self.class_names else None,
                "model": self.model, "seed": self.seed, "index": index}, sort_keys=True).encode())
            self._in_shard += 1
            self._count += 1
        if self._written is not None:
            pieces.append((self.shard_name, self._sink.take()))
        return pieces

    def finish(self, manifest: dict[str, Any] | None) -> list[tuple[str, bytes]]:
        """Close the last shard; with a manifest, add it as `manifest.json` (with the shards' names)."""
        pieces = self._close_shard()
        if manifest is not None:
            shards = [f"{self.prefix}-{shard:06d}.tar" for shard in range(self._shard + 1)]
            text = json.dumps({**manifest, "seed": self.seed, "count": self._count, "shards": shards},
                              sort_keys=True, indent=2) + "\n"
            pieces.append(("manifest.json", text.encode()))
        return pieces


OUTPUT_SUFFIXES = (".npz", ".zip", ".tar", ".parquet", ".png")


def check_output_dir(path: Path, out: Path | None = None) -> None:
    """`path` is, or can be made, a writable directory: the nearest part of it that exists is one. Errors name
    `--out out` (default: `path`)."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise InvalidInputError(f"--out {out or path}: {part} is a file, not a directory; choose another path")
            if not os.access(part, os.W_OK | os.X_OK):
                raise InvalidInputError(f"--out {out or path}: {part} is not writable; choose another path")
            return


def check_output(path: Path) -> None:
    """Refuse an `--out` that `write_output` could not write, before any sample is generated."""
    if path.suffix not in ("", *OUTPUT_SUFFIXES):
        raise InvalidInputError(f"--out {path}: use a .npz, .zip, .tar, .parquet or .png file, or a directory "
                                "without a suffix")
    if not path.suffix:
        if path.exists() and not path.is_dir():
            raise InvalidInputError(f"--out {path}: is a file; a path without a suffix names a directory to create")
        if path.is_dir() and any(path.iterdir()):
            raise InvalidInputError(f"--out {path}: the directory is not empty; choose a new one")
        check_output_dir(path)
        return
    if path.is_dir():
        raise InvalidInputError(f"--out {path}: is a directory; name a {path.suffix} file")
    check_output_dir(path.parent, path)


def write_output(path: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str], seed: int,
                 manifest: dict[str, Any]) -> None:
    """Write samples to `path`: `.npz`, `.zip` (ImageFolder), `.tar` (one WebDataset shard), `.parquet`, a `.png`
    grid (a row per class when balanced), or an ImageFolder directory."""
    check_output(path)
    try:
        _write_output(path, images, labels, class_names, seed, manifest)
    except OSError as exc:  # what `check_output` cannot foresee: a full disk, a file system that refuses new files
        raise InvalidInputError(f"--out {path}: cannot write it: {exc.strerror or exc}") from exc


def _write_output(path: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str], seed: int,
                  manifest: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        counts = np.bincount(labels)
        balanced = len(class_names) > 1 and len(set(counts.tolist())) == 1 and np.all(np.diff(labels) >= 0)
        path.write_bytes(encode_png(image_grid(images, columns=int(counts[0]) if balanced else None, scale=2)))
        return
    if path.suffix == ".npz":
        path.write_bytes(npz_bytes(images, labels))
        return
    if path.suffix == ".tar":
        shards = WebDatasetShards(class_names, seed, manifest["model"], path.stem, max(len(images), 1))
        path.write_bytes(b"".join(data for _, data in shards.add(images, labels, range(len(images)))
                                  + shards.finish(None)))
        return
    if path.suffix == ".parquet":  # a row group per forward pass of the server's default size, as its exports
        table, rows = ParquetExport(class_names, seed), Settings.model_fields["max_batch_size"].default
        path.write_bytes(b"".join(table.add(images[start : start + rows], labels[start : start + rows],
                                            range(start, min(start + rows, len(images))))
                                  for start in range(0, len(images), rows)) + table.finish(manifest))
        return
    archive = ImageFolderZip(class_names, seed)
    data = archive.add(images, labels, range(len(images))) + archive.finish(manifest)
    if path.suffix == ".zip":
        path.write_bytes(data)
        return
    with zipfile.ZipFile(io.BytesIO(data)) as written:
        for name in written.namelist():
            target = path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(written.read(name))

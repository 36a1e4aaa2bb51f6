"""Reading zips from outside safely: no unsafe paths, links, encrypted or nested archives, and decompression counted
while reading (never trusting headers) against limits on bytes, members, ratio and image pixels."""

from __future__ import annotations

import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from app.core.images import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS
from app.errors import DataError

MAX_ZIP_BYTES = 2 * 1024**3


def check_image_file(name: str) -> None:
    if not name.lower().endswith(IMAGE_SUFFIXES):
        raise DataError(f"{name}: not an image; class folders may hold only {', '.join(IMAGE_SUFFIXES)} files")


@dataclass
class ZipLimits:
    """Bounds for reading a zip from outside: decompressed bytes (counted while reading, never trusting headers),
    compression ratio per member, member count and image pixels."""

    max_bytes: int = MAX_ZIP_BYTES
    max_files: int = 200_000
    max_ratio: float = 250.0
    max_pixels: int = MAX_IMAGE_PIXELS
    max_member_bytes: int = 64 * 1024**2


_ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar")


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int, limits: ZipLimits, source: str) -> bytes:
    chunks, size = [], 0
    with archive.open(info) as member:
        while chunk := member.read(1 << 16):
            size += len(chunk)
            chunks.append(chunk)
            if size > info.file_size:
                raise DataError(f"{source}: {info.filename!r} decompresses to more than its header declares")
            if size > budget:
                raise DataError(f"{source}: the archive decompresses to more than the limit of {limits.max_bytes} "
                                "bytes (SYNTHGEN_MAX_DECOMPRESSED_BYTES)")
            if size > limits.max_member_bytes:
                raise DataError(f"{source}: {info.filename!r} decompresses to more than the limit of "
                                f"{limits.max_member_bytes} bytes per member (SYNTHGEN_MAX_MEMBER_BYTES)")
            # every member, whatever its size: many small bombs are a bomb too (a 4 KiB allowance for tiny files)
            if size > 4096 and size > limits.max_ratio * max(info.compress_size, 1):
                raise DataError(f"{source}: {info.filename!r} is compressed over {limits.max_ratio:g}:1; "
                                "zip bombs are refused")
    return b"".join(chunks)


def read_zip(source: str | Path | IO[bytes], limits: ZipLimits | None = None, name: str | None = None
             ) -> tuple[dict[str, list[tuple[str, bytes]]], dict[str, bytes]]:
    """Read an uploaded or local zip safely: (image members by class folder, other top-level files by name).

    Accepts `<class>/<image>` and `<top>/<class>/<image>`, or a flat folder of images (they come back under the
    class ""). Refuses unsafe paths, links, encrypted or nested archives, non-image files in class folders, more
    members or bytes than the limits, and suspicious compression ratios.
    """
    limits = limits or ZipLimits()
    label = name or str(source)
    try:
        archive = zipfile.ZipFile(source)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise DataError(f"{label}: not a readable zip ({exc})") from exc
    entries: dict[str, list[tuple[str, bytes]]] = {}
    extras: dict[str, bytes] = {}
    with archive:
        members = archive.infolist()
        if len(members) > limits.max_files:
            raise DataError(f"{label}: {len(members)} members is over the limit of {limits.max_files}")
        kept, seen = [], set()
        for info in members:
            if not info.filename:
                raise DataError(f"{label}: a member has an empty name; re-create the zip with a standard tool "
                                "(zip -r, or your file manager's compress)")
            if info.filename in seen:  # unzip tools keep one copy or the other: which image is meant is unclear
                raise DataError(f"{label}: {info.filename!r} is in the zip twice; keep one copy")
            seen.add(info.filename)
            parts = PurePosixPath(info.filename).parts
            if not parts:  # ".", "./": the archive's root itself, like the hidden entries skipped below
                continue
            if (info.filename.startswith(("/", "\\")) or ".." in parts or "\\" in info.filename
                    or (parts and ":" in parts[0])):
                raise DataError(f"{label}: unsafe member name {info.filename!r} (absolute or with '..')")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DataError(f"{label}: member {info.filename!r} is a symbolic link; links are not allowed")
            if info.flag_bits & 0x1:
                raise DataError(f"{label}: member {info.filename!r} is encrypted; upload an unencrypted zip")
            if any(part.startswith(".") or part == "__MACOSX" for part in parts):
                continue
            if not info.is_dir() and info.filename.lower().endswith(_ARCHIVE_SUFFIXES):
                raise DataError(f"{label}: member {info.filename!r} is an archive; nested archives are not accepted")
            kept.append((info, parts))
        depths = {len(parts) for info, parts in kept if parts[-1].lower().endswith(IMAGE_SUFFIXES)}
        # One folder around everything is a wrapper (not a class) when the images sit below class folders in it,
        # or beside a labels.csv in it. Decided over files only: `zip -r` lists the folder `top/` itself first.
        firsts = {parts[0] for _, parts in kept}
        files = [parts for info, parts in kept if not info.is_dir()]
        wrapped = len(firsts) == 1 and bool(files) and all(len(parts) > 1 for parts in files)
        flat_csv = any(len(parts) == 2 and parts[1] == "labels.csv" for _, parts in kept)
        top = 1 if wrapped and depths and (min(depths) >= 3 or flat_csv) else 0
        budget = limits.max_bytes
        for info, parts in kept:
            parts = parts[top:]
            if info.is_dir():
                if len(parts) == 1:
                    entries.setdefault(parts[0], [])
                continue
            if len(parts) == 1 and not parts[0].lower().endswith(IMAGE_SUFFIXES):
                extras[parts[0]] = _read_member(archive, info, budget, limits, label)
                budget -= len(extras[parts[0]])
                continue
            if len(parts) > 2:
                raise DataError(f"{label}: {info.filename!r} is nested too deep; use <class>/<image>")
            check_image_file(info.filename)
            data = _read_member(archive, info, budget, limits, label)
            budget -= len(data)
            entries.setdefault(parts[0] if len(parts) == 2 else "", []).append((f"{label}:{info.filename}", data))
    return entries, extras

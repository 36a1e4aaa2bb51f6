"""read_zip on zips as ordinary tools write them (directory entries first) and on odd member names."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from app.core.safezip import read_zip
from app.errors import DataError
from tests.helpers import png_bytes

PNG = png_bytes(np.zeros((4, 4), np.uint8))


def _zip(names: list[str]) -> io.BytesIO:
    """Members by name; a name ending in '/' is a directory entry, as `zip -r` writes them."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in names:
            archive.writestr(zipfile.ZipInfo(name), b"" if name.endswith("/") or name in ("", ".") else PNG)
    buffer.seek(0)
    return buffer


def _counts(entries: dict[str, list[tuple[str, bytes]]]) -> dict[str, int]:
    return {name: len(files) for name, files in entries.items()}


def test_a_wrapped_folder_made_by_make_archive_reads_as_its_classes(tmp_path: Path) -> None:
    for class_name in ("cat", "dog"):
        (tmp_path / "top" / class_name).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "top" / class_name / f"{i}.png").write_bytes(PNG)
    archive = shutil.make_archive(str(tmp_path / "upload"), "zip", tmp_path, "top")
    assert zipfile.ZipFile(archive).namelist()[0] == "top/"
    entries, extras = read_zip(archive, name="upload")
    assert _counts(entries) == {"cat": 2, "dog": 2} and extras == {}


def test_a_wrapped_flat_folder_with_labels_csv_and_directory_entries() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("top/"), b"")
        archive.writestr("top/a.png", PNG)
        archive.writestr("top/labels.csv", b"file_name,class_name\na.png,1\n")
    entries, extras = read_zip(io.BytesIO(buffer.getvalue()), name="upload")
    assert _counts(entries) == {"": 1} and list(extras) == ["labels.csv"]


def test_an_unwrapped_class_with_its_directory_entry_stays_a_class() -> None:
    entries, _ = read_zip(_zip(["3/", "3/a.png", "3/b.png"]), name="upload")
    assert _counts(entries) == {"3": 2}


@pytest.mark.parametrize("root", [".", "./"])
def test_root_entries_are_skipped(root: str) -> None:
    entries, _ = read_zip(_zip([root, "1/a.png"]), name="upload")
    assert _counts(entries) == {"1": 1}


def test_a_member_without_a_name_is_refused() -> None:
    with pytest.raises(DataError, match="upload: a member has an empty name"):
        read_zip(_zip(["", "1/a.png"]), name="upload")


def test_a_member_twice_is_refused() -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):  # zipfile writes it, with a warning
        upload = _zip(["1/a.png", "1/b.png", "1/a.png"])
    with pytest.raises(DataError, match="upload: '1/a.png' is in the zip twice; keep one copy"):
        read_zip(upload, name="upload")

"""The .npz writer: what np.savez would write, readable by np.load and zip tools, small answers and large."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from app.engine import archives


@pytest.mark.parametrize("zip32_bytes", [archives.ZIP32_BYTES, 0], ids=["direct", "zipfile fallback"])
@pytest.mark.parametrize("shape", [(1, 28, 28, 1), (5, 8, 8, 3), (0, 28, 28, 1)])
def test_npz_bytes_round_trip(shape: tuple[int, ...], zip32_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archives, "ZIP32_BYTES", zip32_bytes)
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    labels, indices = np.arange(shape[0]) % 10, np.arange(shape[0]) * 7
    data = archives.npz_bytes(images, labels, indices)
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        assert sorted(arrays.files) == ["images", "indices", "labels"]
        np.testing.assert_array_equal(arrays["images"], images[..., 0] if shape[-1] == 1 else images)
        assert arrays["labels"].dtype == np.int64
        np.testing.assert_array_equal(arrays["labels"], labels)
        np.testing.assert_array_equal(arrays["indices"], indices)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None  # every member's CRC checks out
        assert [(i.filename, i.compress_type, i.date_time) for i in archive.infolist()] == [
            (f"{name}.npy", zipfile.ZIP_STORED, (1980, 1, 1, 0, 0, 0)) for name in ("images", "labels", "indices")]
    assert archives.npz_bytes(images, labels, indices) == data


def test_npz_bytes_without_indices_has_two_arrays() -> None:
    with np.load(io.BytesIO(archives.npz_bytes(np.zeros((2, 4, 4, 1), np.uint8), [1, 2])), allow_pickle=False) as f:
        assert sorted(f.files) == ["images", "labels"]
        assert f["images"].shape == (2, 4, 4)


def test_npz_bytes_of_a_fortran_ordered_array_reads_back_the_same() -> None:
    images = np.asfortranarray(np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8))
    with np.load(io.BytesIO(archives.npz_bytes(images, [0] * 5)), allow_pickle=False) as arrays:
        np.testing.assert_array_equal(arrays["images"], images)

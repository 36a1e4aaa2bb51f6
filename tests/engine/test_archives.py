"""The .npz writer: what np.savez would write, readable by np.load and zip tools, small answers and large."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest

from app.core.png import encode_png
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


def test_webdataset_shards_are_what_tarfile_writes() -> None:
    """The shards are written without `tarfile`, byte for byte as it writes them (USTAR, mode 644, owner 0, time 0)."""
    images = np.random.default_rng(2).integers(0, 256, (7, 8, 8, 1), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2])
    shards = archives.WebDatasetShards([str(i) for i in range(10)], 11, "m", "part", shard_size=3)
    pieces = shards.add(images[:4], labels[:4], range(4)) + shards.add(images[4:], labels[4:], range(4, 7))
    written: dict[str, bytes] = {}
    for name, data in pieces + shards.finish(None):
        written[name] = written.get(name, b"") + data
    assert list(written) == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]
    for shard, data in enumerate(written.values()):
        expected = io.BytesIO()
        with tarfile.open(fileobj=expected, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(3 * shard, min(3 * shard + 3, 7)):
                label = int(labels[index])
                meta = {"class_name": str(label), "index": index, "label": label, "model": "m", "seed": 11}
                for suffix, member in (("png", encode_png(images[index])), ("cls", str(label).encode()),
                                       ("json", json.dumps(meta, sort_keys=True).encode())):
                    info = tarfile.TarInfo(f"{index:08d}.{suffix}")
                    info.size, info.mode, info.mtime = len(member), 0o644, 0
                    tar.addfile(info, io.BytesIO(member))
        assert data == expected.getvalue()

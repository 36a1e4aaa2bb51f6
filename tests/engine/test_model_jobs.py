"""Uploaded training datasets kept as .npz: the same images give the same id, load back unchanged, count against
the key's quota and go once no training has used them for the TTL; a trained name takes versions from its key only."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from app.core.checkpoint import write_json
from app.core.imagefolder import DecodedFolder
from app.engine.jobstore import JobStore
from app.engine.model_jobs import (
    DATASET_ID_LENGTH,
    check_model_name,
    load_dataset_file,
    remove_unused_datasets,
    save_dataset,
    use_dataset,
)
from app.errors import ConflictError, QuotaExceededError
from app.settings import Settings


def test_a_saved_dataset_loads_back_under_its_content_hash(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    folder = DecodedFolder(images, np.array([0, 1, 0, 1, 1]), ["a", "b"])
    settings = Settings(data_dir=tmp_path, models_dir=tmp_path / "models", device="cpu")
    dataset_id, path, written = save_dataset(settings, "key", folder)
    expected = hashlib.sha256(repr((images.shape, ["a", "b"])).encode() + images.tobytes()
                              + folder.labels.astype("<i8").tobytes()).hexdigest()[:DATASET_ID_LENGTH]
    assert (dataset_id, written) == (expected, True) and save_dataset(settings, "key", folder) == (dataset_id, path,
                                                                                                   False)
    assert use_dataset(settings, "key", dataset_id) == path
    loaded = load_dataset_file(path)
    assert np.array_equal(loaded.images, images) and loaded.labels.tolist() == [0, 1, 0, 1, 1]
    assert loaded.class_names == ["a", "b"]


def test_stored_datasets_count_against_the_quota_and_go_once_unused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, models_dir=tmp_path / "models", device="cpu",
                        datasets_quota_bytes_per_key=2300)
    folders = [DecodedFolder(np.full((4, 8, 8, 1), value, np.uint8), np.array([0, 0, 1, 1]), ["a", "b"])
               for value in range(3)]
    store = JobStore(tmp_path)
    kept, _, _ = save_dataset(settings, "key", folders[0])  # 288 bytes of images and labels, 1,060 on disk
    _, unused_path, _ = save_dataset(settings, "key", folders[1])
    with pytest.raises(QuotaExceededError, match="SYNTHGEN_DATASETS_QUOTA_BYTES_PER_KEY"):
        save_dataset(settings, "key", folders[2])
    save_dataset(settings, "other", folders[2])  # another key's quota
    store.create("m", {"dataset_file": f"datasets/key/{kept}.npz", "val_dataset_file": None}, 1, "model", "key",
                 kind="training")
    half_written = unused_path.with_suffix(".x.tmp")
    half_written.write_bytes(b"x")
    assert remove_unused_datasets(settings, store, 3600) == 0  # unused, but only just
    old = time.time() - 7200
    for path in (tmp_path / "datasets").rglob("*"):
        os.utime(path, (old, old))
    assert remove_unused_datasets(settings, store, 3600) == 3  # the unused one, the other key's, the half-written
    assert _names(tmp_path) == [f"{kept}.npz"]
    store.close()


def _names(root: Path) -> list[str]:
    return sorted(path.name for path in (root / "datasets").rglob("*") if path.is_file())


def test_a_trained_model_takes_new_versions_only_from_its_key(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, models_dir=tmp_path / "models", device="cpu")
    for name, trained_by in (("mine", "key"), ("shared", "")):
        (tmp_path / "models" / name / "1").mkdir(parents=True)
        write_json(tmp_path / "models" / name / "1" / "config.json", {"trained_by": trained_by})
    check_model_name(settings, tmp_path / "repository", "mine", "key")
    check_model_name(settings, tmp_path / "repository", "new", "key")
    with pytest.raises(ConflictError, match="'mine' belongs to another API key"):
        check_model_name(settings, tmp_path / "repository", "mine", "other")
    with pytest.raises(ConflictError, match="'shared' belongs to no key \\(it was trained while the server had no API"):
        check_model_name(settings, tmp_path / "repository", "shared", "key")
    check_model_name(settings, tmp_path / "repository", "shared", "")  # still open: the same no-key owner

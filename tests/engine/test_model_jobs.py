"""Uploaded training datasets kept as .npz: the same images give the same id, and load back unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from app.core.imagefolder import DecodedFolder
from app.engine.model_jobs import DATASET_ID_LENGTH, dataset_path, load_dataset_file, save_dataset
from app.settings import Settings


def test_a_saved_dataset_loads_back_under_its_content_hash(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    folder = DecodedFolder(images, np.array([0, 1, 0, 1, 1]), ["a", "b"])
    settings = Settings(data_dir=tmp_path, models_dir=tmp_path / "models", device="cpu")
    dataset_id = save_dataset(settings, "key", folder)
    expected = hashlib.sha256(repr((images.shape, ["a", "b"])).encode() + images.tobytes()
                              + folder.labels.astype("<i8").tobytes()).hexdigest()[:DATASET_ID_LENGTH]
    assert dataset_id == expected and save_dataset(settings, "key", folder) == dataset_id
    loaded = load_dataset_file(dataset_path(settings, "key", dataset_id))
    assert np.array_equal(loaded.images, images) and loaded.labels.tolist() == [0, 1, 0, 1, 1]
    assert loaded.class_names == ["a", "b"]

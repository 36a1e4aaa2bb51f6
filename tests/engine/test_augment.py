"""Classical augmentations: seeded, shape-preserving; a flat upload's labels.csv read or refused by row."""

from __future__ import annotations

import numpy as np
import pytest

from app.engine.augment import AugmentSpec, _flat_labels, augment_image
from app.errors import DataError


def test_augment_image_is_seeded_and_keeps_shape() -> None:
    image = np.zeros((28, 28, 1), np.uint8)
    image[10:18, 12:16] = 255
    spec = AugmentSpec(flip=0.5, rotation=20, translate=0.1, scale=0.1, brightness=0.2, contrast=0.2, noise=0.05)
    first = augment_image(image, np.random.default_rng([1, 2]), spec)
    assert first.shape == image.shape and first.dtype == np.uint8
    assert np.array_equal(first, augment_image(image, np.random.default_rng([1, 2]), spec))
    assert not np.array_equal(first, image)
    assert np.array_equal(augment_image(image, np.random.default_rng(0), AugmentSpec()), image)


FLAT = [("upload:a.png", b""), ("upload:b.png", b"")]


def test_flat_labels_by_class_name_or_label() -> None:
    assert _flat_labels({"labels.csv": b"file_name,class_name\na.png,1\nsub/b.png,2\n"}, FLAT) == \
        {"a.png": "1", "b.png": "2"}
    assert _flat_labels({"labels.csv": b"label,file_name\n3,a.png\n4,b.png\n4,b.png\n"}, FLAT) == \
        {"a.png": "3", "b.png": "4"}  # a repeated row that agrees is harmless


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        (b"class_name,file_name\n1,a.png\n7\n", "labels.csv row 3: no file_name; every row needs a file_name and a"),
        (b"file_name,class_name\na.png\n", "labels.csv row 2: no class_name"),
        (b"file_name,label\na.png,1\nb.png,\n", "labels.csv row 3: no label"),
        (b"file_name,class_name\n", "labels.csv has a header but no rows"),
        (b"name,class\na.png,1\n", "needs a header with file_name and class_name"),
        (b"", "needs a header with file_name and class_name"),
        (b"file_name,class_name\n\xff,1\n", "not readable UTF-8 CSV"),
        (b"file_name,label\na.png,3\nb.png,nope\nb.png,8\n", "labels.csv rows 3 and 4 give 'b.png' two labels "
         r"\('nope' and '8'\); keep one row per image"),
        (b"file_name,label\na.png,3\n../c.png,3\nb.png,8\n", "labels.csv row 3 names 'c.png', which is not an image "
         r"of the upload \(1 such row"),
    ],
)
def test_bad_labels_csv_is_refused_naming_the_row(csv: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        _flat_labels({"labels.csv": csv}, FLAT)

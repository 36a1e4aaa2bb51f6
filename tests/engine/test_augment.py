"""Classical augmentations: seeded, shape-preserving."""

from __future__ import annotations

import numpy as np

from app.engine.augment import AugmentSpec, augment_image


def test_augment_image_is_seeded_and_keeps_shape() -> None:
    image = np.zeros((28, 28, 1), np.uint8)
    image[10:18, 12:16] = 255
    spec = AugmentSpec(flip=0.5, rotation=20, translate=0.1, scale=0.1, brightness=0.2, contrast=0.2, noise=0.05)
    first = augment_image(image, np.random.default_rng([1, 2]), spec)
    assert first.shape == image.shape and first.dtype == np.uint8
    assert np.array_equal(first, augment_image(image, np.random.default_rng([1, 2]), spec))
    assert not np.array_equal(first, image)
    assert np.array_equal(augment_image(image, np.random.default_rng(0), AugmentSpec()), image)

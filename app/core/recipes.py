"""Training settings chosen from the size of a user's dataset (a few hundred to tens of thousands of images), so a
small dataset neither collapses nor is memorised and a large one is not trained for needlessly long."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GAN_STEPS = 3000  # optimizer steps a GAN gets, whatever the data size (fewer images: more epochs)
VAE_STEPS = 2000
SMALL = 2000  # fewer training images than this: small-data settings
MIN_EPOCHS, MAX_EPOCHS = 10, 400


@dataclass(frozen=True)
class Recipe:
    """What `synthgen train` is given: epochs, batch size, validation fraction, hyper-parameters and learning
    rate, with the reasons (`notes`) a user sees."""

    arch: str
    epochs: int
    batch_size: int
    val_fraction: float
    lr: float
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def choose_recipe(arch: str, n_images: int) -> Recipe:
    """Settings for `arch` (gan or vae) trained on `n_images`."""
    val_fraction = 0.1 if n_images >= 5000 else 0.2  # a small dataset needs a larger share to judge it at all
    n_train = n_images - round(n_images * val_fraction)
    small = n_train < SMALL
    batch_size = 32 if small else 64
    steps_per_epoch = max(1, n_train // batch_size)
    target = GAN_STEPS if arch == "gan" else VAE_STEPS
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(target / steps_per_epoch)))
    notes = []
    if arch == "gan":
        hyperparameters: dict[str, Any] = {"class_weight": 0.2}
        if small:
            # DiffAugment: the discriminator sees every image, real or generated, randomly shifted and cut out, so
            # it cannot memorise a few hundred images (and the generator is not taught to copy them)
            hyperparameters["diff_augment"] = "translation,cutout"
            notes.append("small dataset: DiffAugment (translation, cutout) on everything the discriminator sees")
        return Recipe(arch, epochs, batch_size, val_fraction, 2e-4, hyperparameters, notes)
    # the VAE's learned prior already fits fewer mixture components to a class with few images
    return Recipe(arch, epochs, batch_size, val_fraction, 1e-3, {}, notes)


def validation_warnings(n_val: int, classes: int) -> list[str]:
    """What makes the validation split too small to judge a model by."""
    per_class = n_val / max(classes, 1)
    if per_class >= 20:
        return []
    return [f"the validation split holds {n_val} images ({per_class:.0f} per class): too few to judge the model "
            "closely (figures on it move by several points between runs); more images, or a larger validation "
            "fraction, give firmer figures"]

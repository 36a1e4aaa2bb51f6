"""Training settings chosen from the size of a user's dataset (a few hundred to tens of thousands of images), so a
small dataset neither collapses nor is memorised and a large one is not trained for needlessly long."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.core.checkpoint import checked_hyperparameters
from app.core.nets import ConditionalGAN, ConditionalVAE, GanConfig, VaeConfig
from app.errors import CheckpointError, InvalidInputError

GAN_STEPS = 3000  # optimizer steps a GAN gets, whatever the data size (fewer images: more epochs)
VAE_STEPS = 2000
SMALL = 2000  # fewer training images than this: small-data settings
MIN_EPOCHS, MAX_EPOCHS = 10, 400
MAX_MODEL_PARAMETERS = 5_000_000  # float32 weights of at most 20 MB, the size of a model folder
NOT_TRAINING_FIELDS = {"height", "width", "channels", "num_classes", "latent_scale"}  # set by the data, or tuned after


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


def check_hyperparameters(arch: str, values: dict[str, Any], height: int, width: int, channels: int,
                          classes: int) -> None:
    """Refuse hyper-parameters of `arch` (gan or vae) that are unknown, out of range, of the wrong type, size a layer
    below 1 or make a model over `MAX_MODEL_PARAMETERS`, before anything is allocated (API trainings and `synthgen
    train` alike)."""
    config_class = GanConfig if arch == "gan" else VaeConfig
    allowed = {f.name for f in dataclasses.fields(config_class)} - NOT_TRAINING_FIELDS
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise InvalidInputError(f"unknown {arch} hyper-parameter(s) {unknown}; allowed: {sorted(allowed)}")
    for name, value in values.items():
        if isinstance(value, int | float) and not 0 <= value <= 100_000:
            raise InvalidInputError(f"hyper-parameter {name} = {value} is out of range (0 to 100000)")
    try:
        checked_hyperparameters(config_class, values, Path("hyperparameters"))
        config = config_class(height=height, width=width, channels=channels, num_classes=classes, **values)
        with torch.device("meta"):  # counts the parameters without allocating them
            net = (ConditionalGAN if arch == "gan" else ConditionalVAE)(config)
    except (CheckpointError, TypeError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(f"bad {arch} hyper-parameters: {exc}") from exc
    parameters = sum(p.numel() for p in net.parameters())
    if parameters > MAX_MODEL_PARAMETERS:
        raise InvalidInputError(f"these {arch} hyper-parameters make {parameters:,} parameters, over the "
                                f"{MAX_MODEL_PARAMETERS:,} a model may have; use fewer channels or a smaller latent")

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.nets import Classifier
from app.ml.datasets import load_dataset
from app.ml.evaluation import (
    evaluate,
    frechet_distance,
    memorisation_rate,
    memorisation_threshold,
    precision_recall,
    predict,
    sliced_wasserstein,
    train_classifier,
)


@pytest.fixture(scope="module")
def digits_features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    digits = load_dataset("digits")
    train, val = digits.split(0.5)
    classifier = train_classifier(train.images, train.labels, 10, epochs=3)
    noise = np.random.default_rng(0).integers(0, 256, val.images.shape, dtype=np.uint8)
    features = [predict(classifier, images)[1] for images in (train.images, val.images, noise)]
    return *features, noise


def test_frechet_distance_real_vs_real_is_small(digits_features) -> None:
    train, val, noise, _ = digits_features
    assert abs(frechet_distance(train, train)) < 1e-3
    assert frechet_distance(train, val) * 20 < frechet_distance(train, noise)


def test_precision_recall(digits_features) -> None:
    train, val, noise, _ = digits_features
    precision, recall = precision_recall(train, val)
    assert precision > 0.8 and recall > 0.8
    precision, recall = precision_recall(train, noise)
    assert precision < 0.1 and recall < 0.1


def test_memorisation_flags_copies_only(digits_features) -> None:
    train, val, _, _ = digits_features
    threshold = memorisation_threshold(train)
    assert memorisation_rate(train, train[:100], threshold) == 1.0
    assert memorisation_rate(train, val, threshold) < 0.1


def test_sliced_wasserstein() -> None:
    digits = load_dataset("digits")
    a, b = digits.split(0.5)
    noise = np.random.default_rng(0).integers(0, 256, b.images.shape, dtype=np.uint8)
    assert sliced_wasserstein(a.images, a.images) == 0
    assert sliced_wasserstein(a.images, b.images) * 5 < sliced_wasserstein(a.images, noise)


def test_evaluate_writes_card_and_evaluator(tiny_vae: Path, tmp_path: Path) -> None:
    card = evaluate(tiny_vae, "digits", test_spec="digits#0:200", per_class=20, device="cpu", progress=False,
                    classifier_epochs=2)
    saved = json.loads((tiny_vae / "card.json").read_text())
    assert saved == card
    metrics = card["metrics"]
    for key in ("frechet_distance", "precision", "recall", "memorisation_rate", "sliced_wasserstein",
                "tstr_accuracy", "real_accuracy", "augmented_accuracy", "augmentation_gain"):
        assert np.isfinite(metrics[key]), key
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["tstr_accuracy"] <= 1
    assert card["evaluation"]["n_synthetic"] == 200 and card["evaluation"]["data_matches_training"]
    assert card["test_metrics"]["n"] == 200
    assert card["training"]["epochs_done"] == 2  # the training summary is kept
    evaluator = Classifier.from_pretrained(tiny_vae)[0]
    assert evaluator(torch.zeros(2, 1, 8, 8)).shape == (2, 10)

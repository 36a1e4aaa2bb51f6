import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.nets import Classifier, ClassifierConfig
from app.errors import DataError
from app.ml.datasets import load_dataset, load_training_data, split_as_trained
from app.ml.evaluation import (
    density_coverage,
    evaluate,
    expected_calibration_error,
    frechet_distance,
    manifold_metrics,
    memorisation_rate,
    memorisation_threshold,
    precision_recall,
    predict,
    sliced_wasserstein,
    temperature,
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


def test_the_classifier_trains_on_fewer_images_than_a_batch() -> None:
    digits = load_dataset("digits")
    images, labels = digits.images[:100], digits.labels[:100]
    trained = train_classifier(images, labels, 10, epochs=30, seed=0)
    torch.manual_seed(0)  # the initial weights train_classifier drew for seed 0
    untrained = Classifier(ClassifierConfig(*images.shape[1:], 10))
    assert not all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), untrained.state_dict().values()))
    assert float((predict(trained, images)[0].argmax(1).numpy() == labels).mean()) > 0.5  # it learned, not noise


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


def test_density_and_coverage(digits_features) -> None:
    train, val, noise, _ = digits_features
    density, coverage = density_coverage(train, val)
    assert 0.6 < density < 1.6 and coverage > 0.8  # held-out real digits: as dense as real data, covering it
    density, coverage = density_coverage(train, noise)
    assert density < 0.05 and coverage < 0.05
    density, coverage = density_coverage(train, train[:10].repeat(50, 1))  # a few modes, many copies
    assert coverage < 0.1


def test_temperature_scaling_calibrates_an_overconfident_model() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(3, (4000,), generator=gen)
    logits = torch.randn(4000, 3, generator=gen)
    logits[torch.arange(4000), labels] += 1.0  # informative, then made 5× too confident
    overconfident = logits * 5
    t = temperature(overconfident, labels)
    assert 3 < t < 7
    before = expected_calibration_error(overconfident.softmax(1), labels)
    after = expected_calibration_error((overconfident / t).softmax(1), labels)
    assert after < 0.03 < before


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
    assert metrics["density"] >= 0 and 0 <= metrics["coverage"] <= 1
    assert set(card["per_class"]) == {str(i) for i in range(10)}
    assert {"tstr_recall", "frechet_distance", "label_agreement"} <= set(card["per_class"]["3"])
    assert 0 <= card["privacy"]["dcr_share_closer_to_train"] <= 1 and card["privacy"]["identical_to_training"] == 0
    calibration = card["calibration"]  # a temperature that does not calibrate the held-out half better is not kept
    assert calibration["temperature"] in (1.0, calibration["fitted_temperature"])
    assert calibration["ece_after"] <= calibration["ece_before"]
    steps = card["evaluation"]["classifier_steps"]  # arms compared at matched steps
    assert steps["tstr"] == steps["real"] and steps["real_matched"] == steps["augmented"] > steps["real"]
    assert np.isclose(metrics["augmentation_gain"], metrics["augmented_accuracy"] - metrics["real_matched_accuracy"],
                      atol=2e-6)
    assert metrics["frechet_distance_at_val_n"] > 0 and metrics["sliced_wasserstein_at_val_n"] > 0
    evaluator = Classifier.from_pretrained(tiny_vae)[0]
    assert evaluator(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_a_model_with_a_label_filter_is_evaluated_through_the_evaluator_it_ships(tiny_gan: Path,
                                                                                 tmp_path: Path) -> None:
    import shutil

    from app.core.checkpoint import read_json, write_json
    from app.core.model import load_model
    from app.core.sampling import per_class_labels, sample

    folder = shutil.copytree(tiny_gan, tmp_path / "model")
    write_json(folder / "config.json", {**read_json(folder / "config.json"), "label_filter": {"min_confidence": 0.5}})
    card = evaluate(folder, "digits", per_class=20, device="cpu", progress=False, classifier_epochs=1)
    assert card["evaluation"]["label_filter"] == {"min_confidence": 0.5}
    model = load_model(folder)  # the filter now has its evaluator: the one the card was measured through
    unfiltered = load_model(folder, label_filter=False)
    labels = per_class_labels(10, 20)
    filtered_agreement = (predict(model.label_filter.evaluator, sample(model, 0, labels)[0])[0].argmax(1).numpy()
                          == np.array(labels)).mean()
    plain_agreement = (predict(model.label_filter.evaluator, sample(unfiltered, 0, labels)[0])[0].argmax(1).numpy()
                       == np.array(labels)).mean()
    assert filtered_agreement > plain_agreement
    # the card's agreement is read by a classifier of another seed: the filter's own would pass what it kept
    training = model.config["training_data"]
    train_set, _ = split_as_trained(load_training_data("digits", model.class_names, training.get("fingerprint")),
                                    training, None)
    reader = train_classifier(train_set.images, train_set.labels, 10, 1, seed=1, device="cpu")
    read = (predict(reader, sample(model, 0, labels)[0])[0].argmax(1).numpy() == np.array(labels)).mean()
    assert card["metrics"]["label_agreement"] == pytest.approx(read, abs=1e-6)
    assert card["evaluation"]["label_agreement_by"].startswith("a classifier of seed 1")


def test_manifold_metrics_see_every_class_of_class_ordered_samples() -> None:
    # 10 classes of 1,000 rows each: samples in class order (as they are drawn), the real rows shuffled (as a random
    # split leaves them); a prefix of 5,000 samples holds classes 0-4 only and halves a perfect generator's recall
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 8, generator=gen) * 10
    real, fake = (centres.repeat_interleave(1000, 0) + torch.randn(10_000, 8, generator=gen) for _ in range(2))
    real = real[torch.randperm(len(real), generator=gen)]
    assert precision_recall(real[:5000], fake[:5000])[1] < 0.6  # the prefix this replaces
    figures = manifold_metrics(real, fake, seed=0)
    assert figures["n"] == 5000 and figures["recall"] > 0.8 and figures["coverage"] > 0.9, figures


def test_scores_refuse_data_other_than_the_training_data() -> None:
    digits = load_dataset("digits")
    named = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    trained_on = type(digits)(digits.images, digits.labels, named).fingerprint()  # trained with --class-names
    assert load_training_data("digits", named, trained_on).class_names == named  # renamed to the model's names
    with pytest.raises(DataError, match="not the data this model was trained on"):
        load_training_data("digits#0:1000", named, trained_on)


def test_the_classifier_refuses_an_empty_dataset() -> None:
    with pytest.raises(DataError, match="no images"):  # it looped forever
        train_classifier(np.zeros((0, 8, 8, 1), np.uint8), np.zeros(0, np.int64), 10)

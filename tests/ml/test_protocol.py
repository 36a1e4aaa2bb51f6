"""The TSTR protocol: a fixed CNN, several seeds, matched steps; and the latent scale chosen with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import main
from app.core.model import load_model
from app.core.sampling import per_class_labels, sample
from app.ml.datasets import load_dataset
from app.ml.protocol import Figure, choose_scale, nearest_one_within_standard_error, tstr_report, tune_latent_scale
from tests.conftest import TINY_GAN


def test_tstr_report_ranks_good_and_useless_training_data() -> None:
    digits = load_dataset("digits")
    train, test = digits.split(0.3)
    shuffled = np.random.default_rng(0).permutation(train.labels)  # "synthetic" data whose labels mean nothing
    report = tstr_report((train.images, train.labels), (train.images, shuffled), (test.images, test.labels), 10,
                         seeds=[0, 1], synthetic_at_real_size=(train.images, train.labels))
    assert report["real"]["mean"] > 0.6 and len(report["real"]["scores"]) == 2
    assert report["tstr"]["mean"] < 0.3 and report["tstr_to_real_ratio"]["mean"] < 0.4
    # "synthetic" data identical to the real set, image for image, trains the same CNN: the same scores
    assert report["tstr_at_real_size"] == report["real"] and report["tstr_at_real_size_to_real_ratio"]["mean"] == 1
    assert report["protocol"]["matched_steps"] == 4 * -(-2 * len(train) // 128)
    assert report["protocol"]["cnn_threads"] == torch.get_num_threads()  # a seed repeats only at the same count
    for arm in ("real_matched_steps", "real_augmented_matched_steps", "real_plus_synthetic_matched_steps"):
        assert 0 <= report[arm]["mean"] <= 1 and report[arm]["std"] >= 0


@pytest.mark.parametrize("fixture", ["tiny_gan", "tiny_vae"])
def test_tuned_latent_scale_is_the_default_spread(fixture: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    folder = shutil.copytree(request.getfixturevalue(fixture), tmp_path / "model")
    labels = per_class_labels(10, 2)
    before = sample(load_model(folder), 0, labels, truncation=0.5)[0]
    sampling = tune_latent_scale(folder, "digits", scales=(0.5,), per_class=2, seeds=(0,))
    tuned = load_model(folder)
    assert sampling["latent_scale"] == 0.5 and tuned.net.cfg.latent_scale == 0.5 and sampling["label_filter"] is None
    np.testing.assert_array_equal(sample(tuned, 0, labels)[0], before)  # scale 0.5 by default = truncation 0.5 before
    assert json.loads((folder / "card.json").read_text())["sampling"]["validation_tstr"]["0.5"]["scores"]


def test_tune_picks_the_best_validation_score(tiny_gan: Path, tmp_path: Path, capsys) -> None:
    folder = shutil.copytree(tiny_gan, tmp_path / "model")
    assert main(["tune", "--model", str(folder), "--data", "digits", "--scales", "1,0.01", "--per-class", "20",
                 "--seeds", "0", "--min-label-agreement", "0", "--min-confidence", "0.5"]) == 0
    card = json.loads((folder / "card.json").read_text())["sampling"]
    scores = {(float(arm.split()[0]), arm.endswith("filtered")): figure["mean"]
              for arm, figure in card["validation_tstr"].items()}
    assert len(scores) == 4  # each scale drawn as is and through the label filter
    # one seed: no margin; a tie goes to the unfiltered arm, then to the scale nearest 1
    best = max(scores, key=lambda arm: (scores[arm], -arm[1], -abs(arm[0] - 1)))
    assert (card["latent_scale"], card["label_filter"] is not None) == best
    assert card["n_val"] == round(len(load_dataset("digits")) * 0.1)
    assert f"chosen: {card['latent_scale']}" in capsys.readouterr().out
    tuned = load_model(folder)  # with the filter chosen, tune left the evaluator it filtered with
    assert tuned.net.cfg.latent_scale == card["latent_scale"]
    assert (tuned.label_filter is not None) == best[1]


def test_tune_filters_through_the_evaluator_the_folder_ships(tiny_gan: Path, tmp_path: Path) -> None:
    import torch

    from app.core.nets import Classifier, ClassifierConfig

    folder = shutil.copytree(tiny_gan, tmp_path / "model")
    torch.manual_seed(0)
    Classifier(ClassifierConfig(8, 8, 1, 10)).eval().save_pretrained(folder, temperature=0.25)
    before = (folder / "evaluator.safetensors").read_bytes()
    sampling = tune_latent_scale(folder, "digits", scales=(1.0,), per_class=2, seeds=(0,), min_confidence=0.5)
    assert sampling["filter_temperature"] == 0.25 and set(sampling["validation_tstr"]) == {"1.0", "1.0 filtered"}
    assert (folder / "evaluator.safetensors").read_bytes() == before  # the filter that ships is the one tuned


def test_tune_without_the_filter_says_it_turned_the_models_filter_off(tiny_gan: Path, tmp_path: Path,
                                                                       capsys) -> None:
    import torch

    from app.core.checkpoint import read_json, write_json
    from app.core.nets import Classifier, ClassifierConfig

    folder = shutil.copytree(tiny_gan, tmp_path / "model")
    torch.manual_seed(0)
    Classifier(ClassifierConfig(8, 8, 1, 10)).eval().save_pretrained(folder, temperature=1.0)
    write_json(folder / "config.json", {**read_json(folder / "config.json"), "label_filter": {"min_confidence": 0.5}})
    assert main(["tune", "--model", str(folder), "--data", "digits", "--scales", "1", "--per-class", "2",
                 "--seeds", "0"]) == 0
    assert "label_filter" not in read_json(folder / "config.json")
    assert "the label filter this model had ({'min_confidence': 0.5}) is off now" in capsys.readouterr().err


def test_tune_falls_back_to_the_best_labelled_scale_when_none_reaches_the_floor(tiny_gan: Path, tmp_path: Path,
                                                                                capsys) -> None:
    folder = shutil.copytree(tiny_gan, tmp_path / "model")  # one epoch: its samples are rarely what their label says
    assert main(["tune", "--model", str(folder), "--data", "digits", "--scales", "1,2,3", "--per-class", "20",
                 "--seeds", "0"]) == 0
    card = json.loads((folder / "card.json").read_text())["sampling"]
    agreement = {float(scale): value for scale, value in card["label_agreement"].items()}
    assert card["real_val_accuracy"] > 0.8
    assert card["label_agreement_floor"] == pytest.approx(0.95 * card["real_val_accuracy"], abs=1e-3)
    assert max(agreement.values()) < card["label_agreement_floor"] and card["floor_met"] is False
    assert card["latent_scale"] == max(agreement, key=lambda scale: (agreement[scale], -abs(scale - 1)))
    output = capsys.readouterr()
    assert "no scale reached label agreement" in output.err and "label agreement" in output.out


def test_scales_that_mislabel_are_not_chosen_however_high_their_tstr() -> None:
    a, b, c = (1.0, False), (1.5, False), (2.0, False)
    figures = {a: Figure([0.90, 0.90]), b: Figure([0.93, 0.93]), c: Figure([0.96, 0.96])}
    assert choose_scale(figures, {a: 0.99, b: 0.97, c: 0.90}, floor=0.95) == (b, True)
    assert choose_scale(figures, {a: 0.99, b: 0.97, c: 0.96}, floor=0.95) == (c, True)
    assert choose_scale(figures, {a: 0.99, b: 0.97, c: 0.96}, floor=0) == (c, True)
    assert choose_scale(figures, {a: 0.80, b: 0.85, c: 0.70}, floor=0.95) == (b, False)
    # the filtered draw at 2.0 keeps its labels: it wins when it scores best, and an unfiltered tie wins over it
    figures[2.0, True] = Figure([0.97, 0.97])
    assert choose_scale(figures, {a: 0.99, b: 0.97, c: 0.90, (2.0, True): 0.99}, floor=0.95) == ((2.0, True), True)
    figures[2.0, True] = Figure([0.93, 0.93])
    assert choose_scale(figures, {a: 0.99, b: 0.97, c: 0.90, (2.0, True): 0.99}, floor=0.95) == (b, True)


@pytest.mark.parametrize(("args", "message"), [(["--scales", "0,1"], "every scale must be in (0, 4]"),
                                             (["--scales", "1,x"], "comma-separated"),
                                             (["--per-class", "0"], "--per-class must be at least 1"),
                                             (["--min-label-agreement", "1.5"], "--min-label-agreement must be in"),
                                             (["--min-confidence", "-1"], "--min-confidence must be in")])
def test_tune_refuses_bad_arguments(tiny_gan: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    folder = shutil.copytree(tiny_gan, tmp_path / "model")
    assert main(["tune", "--model", str(folder), "--data", "digits", *args]) == 2
    assert message in capsys.readouterr().err
    assert json.loads((folder / "config.json").read_text())["hyperparameters"]["latent_scale"] == 1.0


def test_the_chosen_scale_is_the_one_nearest_1_within_a_standard_error_of_the_best() -> None:
    figures = {(1.0, False): Figure([0.90, 0.90]), (1.5, False): Figure([0.93, 0.91]),
               (2.5, False): Figure([0.95, 0.91]), (3.0, False): Figure([0.9, 0.9])}
    assert nearest_one_within_standard_error(figures) == (1.5, False)  # best 0.93, one standard error 0.02
    figures[2.5, False] = Figure([0.95, 0.95])
    assert nearest_one_within_standard_error(figures) == (2.5, False)  # no spread, no margin
    tie = {(0.8, False): Figure([0.9]), (1.2, False): Figure([0.9])}
    assert nearest_one_within_standard_error(tie) == (0.8, False)  # a tie in distance


@pytest.mark.parametrize(("args", "message"), [
    (["tune", "--data", "digits#0:1000"], "not the data this model was trained on"),
    (["protocol", "--data", "digits#0:1000", "--test-data", "digits#1000:1200"], "not the data this model was trained"),
    (["protocol", "--data", "digits", "--test-data", "digits#0:200"], "200 of the 200 test images are pixel-identical"),
])
def test_scores_are_refused_on_data_that_would_flatter(tiny_gan: Path, tmp_path: Path, capsys, args: list[str],
                                                       message: str) -> None:
    # other data split "as in training" puts training images among the validation images; test images that the
    # model trained on are no test
    folder = shutil.copytree(tiny_gan, tmp_path / "model")
    assert main([args[0], "--model", str(folder), *args[1:], "--seeds", "0"]) == 2
    assert message in capsys.readouterr().err


def test_the_protocol_also_scores_a_synthetic_set_as_large_as_the_real_one(tiny_gan: Path, tmp_path: Path,
                                                                            capsys) -> None:
    folder = shutil.copytree(tiny_gan, tmp_path / "model")
    digits = load_dataset("digits#0:300")
    test = tmp_path / "test.npz"  # real-like test images the model never saw: digits moved one pixel to the right
    np.savez(test, images=np.roll(digits.images, 1, axis=2), labels=digits.labels)
    assert main(["protocol", "--model", str(folder), "--data", "digits", "--test-data", str(test),
                 "--per-class", "5", "--seeds", "0"]) == 0
    protocol = json.loads((folder / "card.json").read_text())["protocol"]
    n_real = protocol["protocol"]["n_real"]
    assert protocol["protocol"]["n_synthetic"] == 50
    assert abs(protocol["protocol"]["per_class_at_real_size"] * 10 - n_real) <= 5
    assert 0 <= protocol["tstr_at_real_size"]["mean"] <= 1 and "tstr_at_real_size" in capsys.readouterr().out


def test_a_model_validated_on_data_given_apart_is_tuned_and_scored_on_that_data(tmp_path: Path, capsys) -> None:
    # e.g. a block of other writers' digits: all of --data trains, and tune, evaluate and protocol remake that split
    folder = tmp_path / "model"
    val = "digits#1200:1500"
    assert main(["train", "--arch", "gan", "--data", "digits#0:1200", "--val-data", val, "--out", str(folder),
                 "--epochs", "1", "--quiet", "--hparams", json.dumps(TINY_GAN)]) == 0
    recorded = json.loads((folder / "config.json").read_text())["training_data"]
    assert recorded["val_data"] == val and recorded["n_train"] == 1200 and recorded["n_val"] == 300
    assert recorded["val_fingerprint"] == load_dataset(val).fingerprint() and "val_fraction" not in recorded
    assert main(["tune", "--model", str(folder), "--data", "digits#0:1200", "--scales", "1", "--per-class", "5",
                 "--seeds", "0"]) == 0
    assert json.loads((folder / "card.json").read_text())["sampling"]["n_val"] == 300
    capsys.readouterr()
    # the validation block is no test data; other validation images are not the ones the model was selected on
    assert main(["protocol", "--model", str(folder), "--data", "digits#0:1200", "--test-data", val,
                 "--per-class", "5", "--seeds", "0"]) == 2
    assert "300 of the 300 test images are pixel-identical" in capsys.readouterr().err
    assert main(["tune", "--model", str(folder), "--data", "digits#0:1200", "--val-data", "digits#1200:1400",
                 "--seeds", "0"]) == 2
    assert "not the validation data this model was trained with" in capsys.readouterr().err
    assert main(["protocol", "--model", str(folder), "--data", "digits#0:1200", "--val-data", val, "--test-data",
                 "digits#1500:1797", "--per-class", "5", "--seeds", "0"]) == 0  # the recorded path, passed again
    assert json.loads((folder / "card.json").read_text())["protocol"]["protocol"]["n_real"] == 1200
    assert main(["evaluate", "--model", str(folder), "--data", "digits#0:1200", "--per-class", "5", "--quiet"]) == 0
    evaluation = json.loads((folder / "card.json").read_text())["evaluation"]
    assert (evaluation["n_real_train"], evaluation["n_real_val"]) == (1200, 300)


def test_validation_data_must_be_held_out_and_match_the_split(tiny_gan: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--arch", "gan", "--data", "digits#0:1200", "--val-data", "digits#1000:1300", "--out",
                 str(tmp_path / "overlap"), "--epochs", "1", "--quiet"]) == 2
    assert "200 of the 300 validation images are pixel-identical to training images" in capsys.readouterr().err
    assert not (tmp_path / "overlap").exists()
    folder = shutil.copytree(tiny_gan, tmp_path / "model")  # validated on a random split of its data
    assert main(["tune", "--model", str(folder), "--data", "digits", "--val-data", "digits#0:100", "--seeds", "0"]) == 2
    assert "leave --val-data out" in capsys.readouterr().err

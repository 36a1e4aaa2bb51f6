import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.core.nets import ConditionalVAE, GanConfig, VaeConfig
from app.errors import DataError, InvalidInputError
from app.ml.training import (
    R1_INTERVAL,
    GanTrainer,
    TrainOptions,
    VaeTrainer,
    decay_factor,
    diff_augment,
    fit_prior,
    random_affine,
    train,
)
from tests.conftest import TINY_GAN, TINY_VAE, train_tiny


def test_vae_training_lowers_the_loss_and_logs(tiny_vae: Path) -> None:
    rows = list(csv.DictReader((tiny_vae / "losses.csv").open()))
    assert len(rows) == 2
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[1]["val_loss"]) < float(rows[0]["val_loss"])
    for name in ("loss.png", "samples/epoch_001.png", "samples/epoch_002.png"):
        assert (tiny_vae / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = json.loads((tiny_vae / "card.json").read_text())
    assert card["training"]["epochs_done"] == 2
    prior = load_file(tiny_vae / "prior.safetensors")
    weights = prior["cumulative_weights"]
    assert weights.shape == (10, 10) and torch.allclose(weights[:, -1], torch.ones(10))
    assert prior["means"].abs().sum() > 0  # fitted to the training images, not the N(0, I) it starts as


def test_diff_augment_moves_and_blanks_pixels() -> None:
    torch.manual_seed(0)
    x = torch.full((64, 1, 16, 16), -1.0)
    x[:, :, 8, 8] = 1.0
    moved = diff_augment(x, "translation")
    assert (moved == 1.0).flatten(1).sum(1).eq(1).all()  # one bright pixel each, somewhere within 2 pixels
    positions = (moved[:, 0] == 1.0).nonzero()[:, 1:]
    assert positions.sub(8).abs().max() <= 2 and len({tuple(p) for p in positions.tolist()}) > 5
    blanked = diff_augment(torch.ones(8, 1, 16, 16), "cutout")
    assert (blanked == -1.0).flatten(1).sum(1).eq(64).all()
    with pytest.raises(InvalidInputError, match="unknown diff_augment policy"):
        diff_augment(x, "color")



def test_prior_fits_classes_with_one_image_or_none() -> None:
    vae = ConditionalVAE(VaeConfig(8, 8, 1, num_classes=3))
    fit_prior(vae.encoder, vae.prior, torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 1]), seed=0)
    assert torch.equal(vae.prior.cumulative_weights[2], torch.ones(10))  # no image: the unfitted N(0, I) component
    images = vae.generate(torch.randn(6, 16), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert images.shape == (6, 1, 8, 8) and torch.isfinite(images).all()

def test_real_augment_moves_digits_and_keeps_the_background() -> None:
    x = -torch.ones(16, 1, 28, 28)
    x[:, :, 8:20, 12:16] = 1
    moved = random_affine(x, 1.0)
    assert moved.shape == x.shape and moved[:, :, 0, 0].eq(-1).all()  # corners stay background, not mid-grey
    assert not torch.allclose(moved, x) and torch.equal(random_affine(x, 0.0), x)


@pytest.mark.parametrize(("hparams", "message"), [({"loss": "wgan"}, "logistic or hinge"),
                                                   ({"diff_augment": "color"}, "diff_augment"),
                                                   ({"real_augment": 1.5}, "real_augment"),
                                                   ({"reconstruction": -1}, "reconstruction"),
                                                   ({"r1_gamma": -0.1}, "r1_gamma"),
                                                   ({"latent_scale": 1.5}, "synthgen tune")])
def test_bad_gan_training_options_are_refused_up_front(tmp_path: Path, hparams: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        train(TrainOptions(arch="gan", data="digits", out=tmp_path / "bad", device="cpu", progress=False,
                           hyperparameters=hparams))


def test_gan_training_learns(tiny_gan: Path) -> None:
    rows = list(csv.DictReader((tiny_gan / "losses.csv").open()))
    assert {"train_d_loss", "train_d_class", "train_g_loss", "val_d_loss"} <= rows[0].keys()
    assert float(rows[0]["train_d_class"]) < math.log(10)  # the class head beats guessing among 10 digits


def test_same_seed_same_weights_and_resume_matches(tmp_path: Path) -> None:
    straight = train_tiny("gan", tmp_path / "straight", epochs=2)
    again = train_tiny("gan", tmp_path / "again", epochs=2)
    first = train_tiny("gan", tmp_path / "resumed", epochs=1)
    resumed = train_tiny("gan", first, epochs=2, resume=True)
    reference = load_file(str(straight / "generator.safetensors"))
    for other in (again, resumed):
        weights = load_file(str(other / "generator.safetensors"))
        assert all((weights[k] == v).all() for k, v in reference.items())
    assert json.loads((resumed / "card.json").read_text())["training"]["epochs_done"] == 2


def test_lr_decay_falls_to_zero_over_its_last_epochs_and_resumes_on_schedule(tmp_path: Path) -> None:
    assert [decay_factor(step, 10, 4) for step in (0, 6, 7, 9)] == [1.0, 1.0, 0.75, 0.25]
    assert decay_factor(9, 10, 0) == 1.0
    constant = train_tiny("gan", tmp_path / "constant", epochs=2)
    straight = train_tiny("gan", tmp_path / "straight", epochs=2, lr_decay_epochs=1)
    # a run stopped after epoch 1 (still at the full rate) and resumed decays as the straight run did
    resumed = train_tiny("gan", train_tiny("gan", tmp_path / "resumed", epochs=1), epochs=2, resume=True,
                         lr_decay_epochs=1)
    reference = load_file(str(straight / "generator.safetensors"))
    assert all(torch.equal(load_file(str(resumed / "generator.safetensors"))[k], v) for k, v in reference.items())
    assert not all(torch.equal(load_file(str(constant / "generator.safetensors"))[k], v) for k, v in reference.items())
    assert json.loads((straight / "card.json").read_text())["training"]["lr_decay_epochs"] == 1
    with pytest.raises(InvalidInputError, match="--lr-decay-epochs must be between 0 and --epochs"):
        train_tiny("gan", tmp_path / "bad", epochs=2, lr_decay_epochs=3)


def test_the_discriminator_can_learn_at_its_own_rate(tmp_path: Path) -> None:
    """--d-lr (two time-scale updates): only the discriminator's optimizer takes it; the card records it."""
    def rates(trainer: GanTrainer | VaeTrainer) -> dict[str, float]:
        return {name: opt.param_groups[0]["lr"] for name, opt in trainer.optimizers.items()}

    gan = GanConfig(8, 8, 1, num_classes=2, g_channels=8, d_channels=8, n_up=1, reconstruction=1.0)
    assert rates(GanTrainer(gan, torch.device("cpu"), lr=1e-4, d_lr=4e-4)) == {
        "opt_g": 1e-4, "opt_d": 4e-4, "opt_e": 1e-4}
    assert rates(GanTrainer(gan, torch.device("cpu"), lr=1e-4))["opt_d"] == 1e-4
    vae = VaeConfig(8, 8, 1, num_classes=2, adversarial=1.0)
    assert rates(VaeTrainer(vae, torch.device("cpu"), lr=1e-3, d_lr=1e-4)) == {"opt": 1e-3, "opt_d": 1e-4}
    out = train_tiny("gan", tmp_path / "ttur", d_lr=4e-4)
    assert json.loads((out / "card.json").read_text())["training"]["d_lr"] == 4e-4
    with pytest.raises(InvalidInputError, match="--d-lr must be greater than 0"):
        train_tiny("gan", tmp_path / "bad", d_lr=0.0)


def test_mode_seeking_is_a_hyperparameter_that_weighs_on_the_generator() -> None:
    def first_g_loss(mode_seeking: float) -> float:
        torch.manual_seed(0)
        trainer = GanTrainer(GanConfig(8, 8, 1, num_classes=2, g_channels=8, d_channels=8, n_up=1,
                                       mode_seeking=mode_seeking), torch.device("cpu"), lr=2e-4)
        torch.manual_seed(1)
        return trainer.step(torch.rand(32, 1, 8, 8) * 2 - 1, torch.arange(32) % 2)["g_loss"]

    assert first_g_loss(1.0) > first_g_loss(0.1) > first_g_loss(0.0)
    with pytest.raises(ValueError, match="mode_seeking must be between 0 and 100"):
        GanConfig(8, 8, 1, num_classes=2, mode_seeking=-1.0)


def test_a_resumed_run_validates_as_it_started(tmp_path: Path) -> None:
    """--val-data need not be given again (a random split instead would train on 10 % fewer images)."""
    def run(out: Path, epochs: int, **kwargs: object) -> Path:
        train(TrainOptions(arch="gan", data="digits#0:1400", out=out, epochs=epochs, device="cpu", progress=False,
                           hyperparameters=TINY_GAN, **kwargs))
        return out

    straight = run(tmp_path / "straight", 2, val_data="digits#1400:1797")
    resumed = run(run(tmp_path / "resumed", 1, val_data="digits#1400:1797"), 2, resume=True, val_fraction=0.3)
    reference = load_file(str(straight / "generator.safetensors"))
    assert all(torch.equal(load_file(str(resumed / "generator.safetensors"))[k], v) for k, v in reference.items())
    training = json.loads((resumed / "config.json").read_text())["training_data"]
    assert training["val_data"] == "digits#1400:1797" and training["n_train"] == 1400 and "val_fraction" not in training
    with pytest.raises(DataError, match="not the validation data this model was trained with"):
        run(resumed, 3, resume=True, val_data="digits#1500:1797")
    with pytest.raises(DataError, match="leave --val-data out"):
        run(run(tmp_path / "random", 1), 2, resume=True, val_data="digits#1400:1797")


def test_r1_penalty_smooths_the_discriminator_on_real_images() -> None:
    def real_gradient(r1_gamma: float) -> float:
        torch.manual_seed(0)
        trainer = GanTrainer(GanConfig(8, 8, 1, num_classes=2, g_channels=8, d_channels=8, n_up=1,
                                       r1_gamma=r1_gamma), torch.device("cpu"), lr=2e-3)
        x, y = torch.rand(32, 1, 8, 8) * 2 - 1, torch.arange(32) % 2
        for _ in range(R1_INTERVAL * 4):
            trainer.step(x, y)
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(trainer.discriminator(x, y).sum(), x)
        return grad.pow(2).flatten(1).sum(1).mean().item()

    assert real_gradient(10.0) < real_gradient(0.0) / 2


def test_vae_gan_learns_to_rebuild_real_images_and_resumes_exactly(tmp_path: Path) -> None:
    hparams = {**TINY_GAN, "reconstruction": 10.0}
    straight = train_tiny("gan", tmp_path / "straight", epochs=2, hyperparameters=hparams)
    rows = list(csv.DictReader((straight / "losses.csv").open()))
    assert float(rows[1]["train_rebuild"]) < float(rows[0]["train_rebuild"])
    first = train_tiny("gan", tmp_path / "resumed", epochs=1, hyperparameters=hparams)
    resumed = train_tiny("gan", first, epochs=2, resume=True, hyperparameters=hparams)
    reference = load_file(str(straight / "generator.safetensors"))
    assert all(torch.equal(load_file(str(resumed / "generator.safetensors"))[k], v) for k, v in reference.items())
    assert not (straight / "encoder.safetensors").exists()  # the encoder only trains; serving never loads it
    prior_means = load_file(str(straight / "generator.safetensors"))["prior.means"]
    assert prior_means.shape == (10, 10, 16) and prior_means.abs().sum() > 0  # fitted to the encoder's latents


def test_adversarial_vae_trains_a_discriminator_beside_it_and_resumes_exactly(tmp_path: Path) -> None:
    hparams = {**TINY_VAE, "adversarial": 1.0}
    straight = train_tiny("vae", tmp_path / "straight", epochs=2, hyperparameters=hparams)
    rows = list(csv.DictReader((straight / "losses.csv").open()))
    assert {"train_d_loss", "train_fool", "train_recon"} <= rows[0].keys()
    assert float(rows[1]["train_recon"]) < float(rows[0]["train_recon"])
    first = train_tiny("vae", tmp_path / "resumed", epochs=1, hyperparameters=hparams)
    resumed = train_tiny("vae", first, epochs=2, resume=True, hyperparameters=hparams)
    reference = load_file(str(straight / "decoder.safetensors"))
    assert all(torch.equal(load_file(str(resumed / "decoder.safetensors"))[k], v) for k, v in reference.items())
    assert not (straight / "discriminator.safetensors").exists()  # only training needs it
    with pytest.raises(InvalidInputError, match="adversarial = -1.0 is out of range"):
        train_tiny("vae", tmp_path / "bad", hyperparameters={"adversarial": -1.0})


def test_refuses_to_overwrite_or_resume_nothing(tiny_gan: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="already holds a model"):
        train_tiny("gan", tiny_gan)
    with pytest.raises(InvalidInputError, match="--resume"):
        train_tiny("gan", tmp_path / "new", resume=True)

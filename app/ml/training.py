"""Training of the GAN and the VAE: one loop, two trainers, checkpoints that resume where they stopped."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from sklearn.mixture import GaussianMixture
from torch import nn
from tqdm import tqdm

from app.core.checkpoint import read_json, utc_now, write_json
from app.core.device import resolve_device
from app.core.images import PIXEL_NORMALISATION, image_grid, to_uint8
from app.core.model import CLASS_NAME_RULE, bad_class_name
from app.core.nets import ConditionalGAN, ConditionalVAE, GanConfig, VaeConfig
from app.core.nets.gan import Discriminator
from app.core.nets.vae import Encoder, MixturePrior
from app.core.recipes import NOT_TRAINING_FIELDS, check_hyperparameters, validation_warnings
from app.core.sampling import draw_latents, per_class_labels
from app.engine.archives import check_output_dir
from app.errors import CheckpointError, InvalidInputError
from app.ml.card import update_card
from app.ml.datasets import ImageDataset, load_dataset, load_validation_data, split_as_trained
from app.ml.plots import labelled_grid, loss_plot

STATE_FILE = "training_state.safetensors"  # everything --resume needs, in one file replaced atomically
PROGRESS_FILE = "progress.json"
PROGRESS_EVERY_S = 1.0
R1_INTERVAL = 16  # GAN steps between R1 penalties
NETS = {"gan": ConditionalGAN, "vae": ConditionalVAE}


@dataclass
class TrainOptions:
    """What `synthgen train` takes."""

    arch: str
    data: str
    out: Path
    epochs: int = 30
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    batch_size: int = 64
    val_fraction: float = 0.1
    val_data: str | None = None  # validation images given apart (e.g. other writers); replaces val_fraction
    lr: float = 2e-4
    d_lr: float | None = None  # the discriminator's rate (TTUR); None: `lr` for a GAN, 2e-4 for a VAE's critic
    lr_decay_epochs: int = 0  # the last this many epochs bring every learning rate linearly down to zero
    checkpoint_every: int = 1
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    class_names: list[str] | None = None  # names for the dataset's labels 0..K-1 (IDX files carry none)
    tensorboard_dir: Path | None = None  # TensorBoard event files (losses, sample grids) go here


def decay_factor(step: int, total_steps: int, decay_steps: int) -> float:
    """Learning-rate multiplier at `step`: 1, then over the last `decay_steps` of `total_steps` linearly towards 0."""
    left = total_steps - step
    return 1.0 if left > decay_steps else left / decay_steps


def _set_lr_factor(trainer: Trainer, factor: float) -> None:
    for optimizer in trainer.optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{index}.{key}": torch.as_tensor(value).cpu().contiguous()
            for index, state in optimizer.state_dict()["state"].items() for key, value in state.items()}


def _load_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def diff_augment(x: torch.Tensor, policies: str) -> torch.Tensor:
    """DiffAugment (Zhao et al., 2020): differentiable augmentations applied alike to real and generated images, so
    a discriminator trained on few images cannot memorise them. Policies: `translation` (shift by up to 1/8 of the
    size, background filled in), `cutout` (blank a random square of half the size)."""
    n, _, h, w = x.shape
    for policy in filter(None, policies.split(",")):
        if policy == "translation":
            dy, dx = max(1, h // 8), max(1, w // 8)
            padded = F.pad(x, (dx, dx, dy, dy), value=-1.0)
            shift_y = torch.randint(0, 2 * dy + 1, (n, 1, 1), device=x.device)
            shift_x = torch.randint(0, 2 * dx + 1, (n, 1, 1), device=x.device)
            rows = (torch.arange(h, device=x.device)[None, :, None] + shift_y).expand(n, h, w)
            cols = (torch.arange(w, device=x.device)[None, None, :] + shift_x).expand(n, h, w)
            flat = padded.flatten(2)
            index = (rows * (w + 2 * dx) + cols).flatten(1)[:, None, :].expand(-1, x.shape[1], -1)
            x = flat.gather(2, index).view_as(x)
        elif policy == "cutout":
            size_y, size_x = h // 2, w // 2
            top = torch.randint(0, h - size_y + 1, (n, 1, 1), device=x.device)
            left = torch.randint(0, w - size_x + 1, (n, 1, 1), device=x.device)
            ys, xs = torch.arange(h, device=x.device)[None, :, None], torch.arange(w, device=x.device)[None, None, :]
            inside = (ys >= top) & (ys < top + size_y) & (xs >= left) & (xs < left + size_x)
            x = x.masked_fill(inside[:, None], -1.0)
        else:
            raise InvalidInputError(f"unknown diff_augment policy {policy!r}; use translation and/or cutout")
    return x


def random_affine(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Real images moved at random (rotation ±10°, scale and shift ±10 %, times `strength`), the background kept:
    the generator then learns the variety classical augmentation would add, rather than the training images alone."""
    n = len(x)
    angle = (torch.rand(n, device=x.device) * 2 - 1) * math.radians(10) * strength
    scale = 1 + (torch.rand(n, device=x.device) * 2 - 1) * 0.1 * strength
    shift = (torch.rand(n, 2, device=x.device) * 2 - 1) * 0.2 * strength  # grid units: 2 = the whole image
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, padding_mode="zeros", align_corners=False) - 1  # outside: background (-1)


class GanTrainer:
    """Logistic or hinge loss, optionally DiffAugment, optionally a class head on the discriminator (trained on
    real images) that also steers the generator, a mode-seeking term against collapse within a class, and an EMA
    generator for sampling."""

    def __init__(self, hparams: GanConfig, device: torch.device, lr: float, d_lr: float | None = None,
                 ema_decay: float = 0.999, betas: tuple[float, float] = (0.5, 0.999)) -> None:
        self.hparams, self.device, self.ema_decay = hparams, device, ema_decay
        # The checkpoint holds the EMA generator (what serving samples from) and the discriminator.
        self.net = ConditionalGAN(hparams).to(device)
        self.generator = copy.deepcopy(self.net.generator)  # the generator the optimizer trains
        self.discriminator = self.net.discriminator
        self.ema = self.net.generator.eval().requires_grad_(False)
        self.optimizers = {
            "opt_g": torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas),
            "opt_d": torch.optim.Adam(self.discriminator.parameters(), lr=lr if d_lr is None else d_lr, betas=betas),
        }
        self.encoder: Encoder | None = None
        if hparams.reconstruction:  # VAE–GAN (Larsen et al., 2016): q(z | x, y) for the generator to decode
            encoder_config = VaeConfig(hparams.height, hparams.width, hparams.channels, hparams.num_classes,
                                       latent_dim=hparams.latent_dim, base_channels=hparams.d_channels)
            self.encoder = Encoder(encoder_config).to(device)
            self.optimizers["opt_e"] = torch.optim.Adam(self.encoder.parameters(), lr=lr, betas=betas)

    def _steps_done(self) -> int:
        """Generator updates so far (kept in the optimizer's state, so a resumed run counts on)."""
        state = self.optimizers["opt_g"].state
        return int(next(iter(state.values()))["step"]) if state else 0

    def _labels(self, n: int) -> torch.Tensor | None:
        return torch.randint(self.hparams.num_classes, (n,), device=self.device) if self.hparams.num_classes else None

    def _d_loss(self, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
        if self.hparams.loss == "hinge":
            return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.hparams.diff_augment) if self.hparams.diff_augment else x

    def step(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, float]:
        if self.hparams.real_augment:
            x = random_affine(x, self.hparams.real_augment)
        n = len(x)
        half = self._labels(n // 2)
        fake_y = None if half is None else torch.cat([half, half, half[: n % 2]])  # pairs share a label
        z = torch.randn(n, self.hparams.latent_dim, device=self.device)
        fake = self.generator(z, fake_y)
        real_in = self._augment(x)
        penalise = self.hparams.r1_gamma > 0 and self._steps_done() % R1_INTERVAL == 0
        if penalise:
            real_in = real_in.detach().requires_grad_(True)
        d_real, class_real = self.discriminator.score_and_logits(real_in, y)
        d_fake = self.discriminator(self._augment(fake.detach()), fake_y)
        d_loss = self._d_loss(d_real, d_fake)
        # The class head learns from real images only, then teaches the generator.
        d_class = F.cross_entropy(class_real, y) if class_real is not None else torch.zeros((), device=self.device)
        d_total = d_loss + d_class
        if penalise:  # lazy regularisation (StyleGAN2): every R1_INTERVAL steps, weighted by the interval
            (grad,) = torch.autograd.grad(d_real.sum(), real_in, create_graph=True)
            d_total = d_total + self.hparams.r1_gamma / 2 * grad.pow(2).flatten(1).sum(1).mean() * R1_INTERVAL
        self.optimizers["opt_d"].zero_grad(set_to_none=True)
        d_total.backward()
        self.optimizers["opt_d"].step()
        d_gen, class_gen = self.discriminator.score_and_logits(self._augment(fake), fake_y)
        g_loss = -d_gen.mean() if self.hparams.loss == "hinge" else F.softplus(-d_gen).mean()
        if class_gen is not None:
            g_loss = g_loss + self.hparams.class_weight * F.cross_entropy(class_gen, fake_y)
        if self.hparams.mode_seeking:
            # Mode seeking (Mao et al., 2019): two latents with one label must not map to one image.
            k = n // 2
            spread = (fake[:k] - fake[k : 2 * k]).abs().mean() / (z[:k] - z[k : 2 * k]).abs().mean()
            g_loss = g_loss + self.hparams.mode_seeking / (spread + 1e-5)
        losses = {}
        if self.encoder is not None:
            # Every real image must come back from its own latent, so no part of the data is left uncovered; the
            # KL keeps those latents where N(0, I) draws fall.
            mu, logvar = self.encoder(x, y)
            rebuilt = self.generator(mu + torch.randn_like(mu) * torch.exp(0.5 * logvar), y)
            rebuild = (rebuilt - x).abs().mean()
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x[0].numel() / n
            g_loss = g_loss + self.hparams.reconstruction * (rebuild + kl)
            losses = {"rebuild": rebuild.item(), "kl": kl.item()}
            self.optimizers["opt_e"].zero_grad(set_to_none=True)
        self.optimizers["opt_g"].zero_grad(set_to_none=True)
        g_loss.backward()
        self.optimizers["opt_g"].step()
        if self.encoder is not None:
            self.optimizers["opt_e"].step()
        steps = float(self._steps_done())
        decay = min(self.ema_decay, (1 + steps) / (10 + steps))  # warm-up: early weights are not averaged in
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.generator.parameters()):
                p_ema.lerp_(p, 1 - decay)
        return {"d_loss": d_loss.item(), "d_class": d_class.item(), "g_loss": g_loss.item(),
                "d_real": d_real.mean().item(), **losses}

    @torch.no_grad()
    def validate(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, float]:
        self.discriminator.eval()
        d_real = self.discriminator(x, y)
        fake_y = self._labels(len(x))
        d_fake = self.discriminator(
            self.net.generate(torch.randn(len(x), self.hparams.latent_dim, device=self.device), fake_y), fake_y)
        self.discriminator.train()
        return {"d_loss": self._d_loss(d_real, d_fake).item(), "d_real": d_real.mean().item()}

    def finish_epoch(self, seed: int, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Before checkpointing: the prior fitted to the encoder's posteriors (VAE–GAN), then the EMA generator's
        batch-norm statistics from its own activations."""
        if self.encoder is not None and self.hparams.prior_components:
            fit_prior(self.encoder, self.ema.prior, x, y, seed)
        self.refresh_ema_statistics(seed)

    @torch.no_grad()
    def refresh_ema_statistics(self, seed: int, batches: int = 16, batch_size: int = 256) -> None:
        """Recompute the EMA generator's batch-norm statistics from its own activations ("standing statistics")."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        norms = [m for m in self.ema.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        self.ema.train()
        for _ in range(batches):
            z = torch.randn(batch_size, self.hparams.latent_dim, device=self.device, generator=gen)
            y = (torch.randint(self.hparams.num_classes, (batch_size,), device=self.device, generator=gen)
                 if self.hparams.num_classes else None)
            self.net.generate(z, y)
        for m in norms:
            m.momentum = 0.1
        self.ema.eval()

    def sample(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.net.generate(z.to(self.device), None if y is None else y.to(self.device))

    def private(self) -> dict[str, nn.Module]:
        return {"generator_raw": self.generator, **({"encoder": self.encoder} if self.encoder is not None else {})}


class VaeTrainer:
    """Negative ELBO with Adam; with `adversarial`, also a discriminator that judges reconstructions and samples of
    the learned prior against real images (VAE–GAN), so the decoder is pushed away from blur."""

    def __init__(self, hparams: VaeConfig, device: torch.device, lr: float, d_lr: float | None = None) -> None:
        self.hparams, self.device = hparams, device
        self.net = self.vae = ConditionalVAE(hparams).to(device)
        self.optimizers = {"opt": torch.optim.Adam(self.vae.parameters(), lr=lr)}
        self.discriminator: Discriminator | None = None
        if hparams.adversarial:
            critic = GanConfig(hparams.height, hparams.width, hparams.channels, hparams.num_classes,
                               d_channels=hparams.base_channels, aux_classifier=False)
            self.discriminator = Discriminator(critic).to(device)
            self.optimizers["opt_d"] = torch.optim.Adam(self.discriminator.parameters(),
                                                        lr=2e-4 if d_lr is None else d_lr, betas=(0.5, 0.999))

    def step(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, float]:
        losses = self.vae.loss(x, y)
        rebuilt = losses.pop("rebuilt")
        loss = losses["loss"]
        if self.discriminator is not None:
            fake = self.vae.generate(torch.randn(len(x), self.hparams.latent_dim, device=self.device), y)
            judge = self.discriminator
            d_loss = F.softplus(-judge(x, y)).mean() + 0.5 * (F.softplus(judge(fake.detach(), y)).mean()
                                                              + F.softplus(judge(rebuilt.detach(), y)).mean())
            self.optimizers["opt_d"].zero_grad(set_to_none=True)
            d_loss.backward()
            self.optimizers["opt_d"].step()
            fool = 0.5 * (F.softplus(-judge(fake, y)).mean() + F.softplus(-judge(rebuilt, y)).mean())
            loss = loss + self.hparams.adversarial * fool
            losses.update(d_loss=d_loss, fool=fool)
        self.optimizers["opt"].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers["opt"].step()
        return {k: v.item() for k, v in losses.items()}

    @torch.no_grad()
    def validate(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, float]:
        self.vae.eval()
        losses = {k: v.item() for k, v in self.vae.loss(x, y).items() if k != "rebuilt"}
        self.vae.train()
        return losses

    def finish_epoch(self, seed: int, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Before checkpointing: fit the learned prior to the training images' posteriors."""
        if self.hparams.prior_components:
            fit_prior(self.vae.encoder, self.vae.prior, x, y, seed)

    def sample(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        self.vae.eval()
        with torch.no_grad():
            images = self.vae.generate(z.to(self.device), None if y is None else y.to(self.device))
        self.vae.train()
        return images

    def private(self) -> dict[str, nn.Module]:
        return {"discriminator": self.discriminator} if self.discriminator is not None else {}


Trainer = GanTrainer | VaeTrainer


@torch.no_grad()
def fit_prior(encoder: nn.Module, prior: MixturePrior, x: torch.Tensor, y: torch.Tensor | None, seed: int,
              chunk: int = 1000) -> None:
    """Fit `prior`'s per-class Gaussian mixtures to the posterior means `encoder` gives images `x` (labels `y`); each
    component's covariance adds the mean posterior variance, so samples keep the encoder's spread. A class with few
    images gets fewer components (at least 10 images each)."""
    was_training = encoder.training
    encoder.eval()
    labels = y if y is not None else torch.zeros(len(x), dtype=torch.long, device=x.device)
    stats = [encoder(x[i : i + chunk], None if y is None else y[i : i + chunk]) for i in range(0, len(x), chunk)]
    encoder.train(was_training)
    mu = torch.cat([m for m, _ in stats]).double().cpu().numpy()
    variance = torch.cat([v for _, v in stats]).double().exp().cpu().numpy()
    classes, m, d = prior.means.shape
    weights, means = torch.zeros(classes, m, dtype=torch.float64), torch.zeros(classes, m, d, dtype=torch.float64)
    covariances = torch.eye(d, dtype=torch.float64).repeat(classes, m, 1, 1)
    for label in range(classes):
        rows = (labels == label).cpu().numpy()
        if not rows.any():
            weights[label, 0] = 1.0
            continue
        spread = np.diag(variance[rows].mean(0))
        if rows.sum() < 2:  # one image: a Gaussian around its posterior
            weights[label, 0], means[label, 0] = 1.0, torch.from_numpy(mu[rows][0])
            covariances[label, 0] = torch.from_numpy(spread + 1e-3 * np.eye(d))
            continue
        used = max(1, min(m, int(rows.sum()) // 10))
        mixture = GaussianMixture(used, covariance_type="full", reg_covar=1e-3, random_state=seed).fit(mu[rows])
        weights[label, :used] = torch.from_numpy(mixture.weights_)
        means[label, :used] = torch.from_numpy(mixture.means_)
        covariances[label, :used] = torch.from_numpy(mixture.covariances_ + spread)
    prior.set_mixture(weights.float(), means.float(), covariances.float())


def make_trainer(arch: str, dataset: ImageDataset, options: TrainOptions, device: torch.device) -> Trainer:
    height, width, channels = dataset.shape
    common = {"height": height, "width": width, "channels": channels, "num_classes": len(dataset.class_names)}
    if arch not in NETS:
        raise InvalidInputError(f"unknown architecture {arch!r}; use gan or vae")
    if "latent_scale" in options.hyperparameters:  # training draws from N(0, I); the spread is tuned afterwards
        raise InvalidInputError("latent_scale is not a training option: train at 1, then choose it with synthgen tune")
    check_hyperparameters(arch, options.hyperparameters, height, width, channels, len(dataset.class_names))
    try:
        if arch == "gan":
            return GanTrainer(GanConfig(**common, **options.hyperparameters), device, options.lr, options.d_lr)
        return VaeTrainer(VaeConfig(**common, **options.hyperparameters), device, options.lr, options.d_lr)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"bad hyper-parameter for {arch}: {exc}") from exc


def _save(trainer: Trainer, out: Path, metadata: dict[str, Any], epoch: int, history: dict[str, list[float]],
          shuffle: torch.Generator, elapsed: float) -> None:
    """The model folder, then everything `--resume` needs (weights, optimizers, random states, history) in one file
    written aside and renamed: a run killed at any moment resumes from the last complete epoch."""
    trainer.net.save_pretrained(out, **metadata)
    state = {f"net.{k}": v.detach().cpu().contiguous() for k, v in trainer.net.state_dict().items()}
    state.update({f"{role}.{k}": v.detach().cpu().contiguous()
                  for role, module in trainer.private().items() for k, v in module.state_dict().items()})
    for prefix, optimizer in trainer.optimizers.items():
        state.update(_optimizer_tensors(prefix, optimizer))
    state["rng.torch"] = torch.get_rng_state()
    state["rng.shuffle"] = shuffle.get_state()
    meta = {"epochs_done": str(epoch), "elapsed_seconds": repr(elapsed), "history": json.dumps(history)}
    tmp = out / (STATE_FILE + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(out / STATE_FILE)
    last = {k: v[-1] for k, v in history.items()}
    update_card(out, training={**metadata["training"], "epochs_done": epoch, "seconds": round(elapsed, 1),
                               "final_losses": last})


def _resumed_hyperparameters(options: TrainOptions, dataset: ImageDataset) -> dict[str, Any]:
    """The hyper-parameters the run in `options.out` was started with (a resumed run must build the same networks):
    the data must have the shape and classes it had, and hyper-parameters given again must agree."""
    path = Path(options.out) / "config.json"
    config = read_json(path)
    held, wanted = config.get("class_name"), NETS[options.arch].__name__ if options.arch in NETS else options.arch
    if held != wanted:
        raise CheckpointError(f"{options.out} holds a {held}, not a {wanted}; resume with the --arch it was trained "
                              "with")
    saved = config.get("hyperparameters")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: no hyperparameters to resume with")
    height, width, channels = dataset.shape
    data = {"height": height, "width": width, "channels": channels, "num_classes": len(dataset.class_names)}
    changed = [f"{key} {saved.get(key)} (this data: {value})" for key, value in data.items() if saved.get(key) != value]
    if changed:
        raise CheckpointError(f"{options.out} was trained on data with {', '.join(changed)}; resume with its --data")
    kept = {key: value for key, value in saved.items() if key not in NOT_TRAINING_FIELDS}
    clash = [f"{key}={value!r} (the run has {kept[key]!r})" if key in kept else f"{key}={value!r}"
             for key, value in options.hyperparameters.items() if key not in kept or kept[key] != value]
    if clash:
        raise InvalidInputError(f"--resume continues {options.out} with the hyper-parameters it was started with; "
                                f"--hparams differs: {', '.join(clash)}; leave --hparams out or start a new --out")
    return kept


def _resumed_split(options: TrainOptions, dataset: ImageDataset) -> tuple[ImageDataset, ImageDataset, TrainOptions]:
    """(train, validation, options) of the run in `options.out`: a resumed run validates as it started, on its
    --val-data (given again only where it moved: the images must be the recorded ones) or its random split."""
    recorded = read_json(Path(options.out) / "config.json").get("training_data", {})
    train_set, val_set = split_as_trained(dataset, recorded, options.val_data)
    options = dataclasses.replace(options, val_data=options.val_data or recorded.get("val_data"),
                                  val_fraction=recorded.get("val_fraction", options.val_fraction))
    return train_set, val_set, options


def _restore(trainer: Trainer, out: Path, shuffle: torch.Generator) -> tuple[int, dict[str, list[float]], float]:
    try:
        with safe_open(str(out / STATE_FILE), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not iterable)
            meta = handle.metadata() or {}
        epochs_done, elapsed, history = int(meta["epochs_done"]), float(meta["elapsed_seconds"]), json.loads(
            meta["history"])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{out / STATE_FILE}: cannot resume from it ({exc})") from exc
    try:
        trainer.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")}, strict=True)
        for role, module in trainer.private().items():
            module.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(role + ".")})
        for prefix, optimizer in trainer.optimizers.items():
            _load_optimizer(prefix, optimizer, state)
        torch.set_rng_state(state["rng.torch"])
        shuffle.set_state(state["rng.shuffle"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{out / STATE_FILE}: does not match the networks being resumed: {exc}") from exc
    return epochs_done, history, elapsed


def _write_logs(out: Path, history: dict[str, list[float]], epoch: int, trainer: Trainer,
                grid_latents: tuple[torch.Tensor, torch.Tensor | None], row_names: list[str], board: Any) -> None:
    names = sorted(history)
    with open(out / "losses.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", *names])
        for row in range(len(history[names[0]])):
            writer.writerow([row + 1, *(f"{history[name][row]:.6g}" for name in names)])
    (out / "loss.png").write_bytes(loss_plot({k: v for k, v in history.items() if "loss" in k}, f"{out.name} losses"))
    images = to_uint8(trainer.sample(*grid_latents))
    (out / "samples").mkdir(exist_ok=True)
    (out / "samples" / f"epoch_{epoch:03d}.png").write_bytes(labelled_grid(images, row_names, scale=2))
    if board is not None:
        for name in names:
            board.add_scalar(name.replace("_", "/", 1), history[name][-1], epoch)
        grid = image_grid(images, columns=len(images) // len(row_names))
        board.add_image("samples", grid, epoch, dataformats="HWC")
        board.flush()


def _tensorboard(folder: Path | None) -> Any:
    if folder is None:
        return None
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    return SummaryWriter(str(folder))


def _validation_record(options: TrainOptions, val_set: ImageDataset) -> dict[str, Any]:
    """How the validation split was made, in config.json's training_data, so that tune, evaluate and protocol remake
    it (app.ml.datasets.split_as_trained)."""
    if options.val_data is not None:
        return {"val_data": options.val_data, "val_fingerprint": val_set.fingerprint()}
    return {"val_fraction": options.val_fraction, "split_seed": 0}


def train(options: TrainOptions) -> dict[str, Any]:
    """Train a model into `options.out`; returns the training summary written to its card."""
    if options.epochs < 1 or options.batch_size < 2:
        raise InvalidInputError("--epochs must be ≥ 1 and --batch-size ≥ 2")
    if not options.lr > 0:
        raise InvalidInputError(f"--lr must be greater than 0, not {options.lr}")
    if options.d_lr is not None and not options.d_lr > 0:
        raise InvalidInputError(f"--d-lr must be greater than 0, not {options.d_lr}")
    if not 0 <= options.lr_decay_epochs <= options.epochs:
        raise InvalidInputError(f"--lr-decay-epochs must be between 0 and --epochs ({options.epochs}), not "
                                f"{options.lr_decay_epochs}")
    out = Path(options.out)
    check_output_dir(out)
    if (out / "config.json").exists() and not options.resume:
        raise InvalidInputError(f"{out} already holds a model; pass --resume to continue it or choose another --out")
    if options.resume and not (out / STATE_FILE).exists():
        raise InvalidInputError(f"--resume: {out} holds no {STATE_FILE} to continue from")
    device = resolve_device(options.device)
    dataset = load_dataset(options.data)
    if options.class_names is not None:
        if len(options.class_names) != len(dataset.class_names):
            raise InvalidInputError(f"--class-names names {len(options.class_names)} classes; the data has "
                                    f"{len(dataset.class_names)}")
        dataset = ImageDataset(dataset.images, dataset.labels, list(options.class_names))
    bad = bad_class_name(dataset.class_names)
    if bad is not None:
        raise InvalidInputError(f"class name {dataset.class_names[bad]!r} (label {bad}): class names must be "
                                f"{CLASS_NAME_RULE}; rename it (--class-names)")
    if options.resume:
        options = dataclasses.replace(options, hyperparameters=_resumed_hyperparameters(options, dataset))
        train_set, val_set, options = _resumed_split(options, dataset)
    elif options.val_data is not None:
        train_set, val_set = dataset, load_validation_data(options.val_data, dataset)
    else:
        train_set, val_set = dataset.split(options.val_fraction)
    missing = [name for label, name in enumerate(dataset.class_names) if not (train_set.labels == label).any()]
    if missing:
        raise InvalidInputError(f"--data has no training images of {len(missing)} of its {len(dataset.class_names)} "
                                f"classes ({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}); a "
                                "conditional model cannot learn a class it never sees: give images of every class")
    torch.manual_seed(options.seed)
    trainer = make_trainer(options.arch, dataset, options, device)
    shuffle = torch.Generator().manual_seed(options.seed)
    epoch, history, elapsed = (_restore(trainer, out, shuffle) if options.resume else (0, {}, 0.0))

    x_train, y_train = (t.to(device) for t in train_set.to_tensors())
    x_val, y_val = (t.to(device) for t in val_set.to_tensors())
    conditional = trainer.hparams.num_classes > 0
    rows = trainer.hparams.num_classes or 10
    labels = per_class_labels(rows, 10) if conditional else [None] * 100
    z, y = draw_latents(options.seed, range(len(labels)), trainer.hparams.latent_dim, trainer.hparams.num_classes,
                        labels)
    grid_latents = (z, y if conditional else None)
    row_names = dataset.class_names if conditional else [""] * rows
    hparams = trainer.hparams
    warnings = validation_warnings(len(val_set), max(len(dataset.class_names), 1))
    if options.progress:
        for warning in warnings:
            tqdm.write(f"warning: {warning}")
    metadata = {  # config.json beside the format's own fields (see Checkpointable.save_pretrained)
        "class_names": dataset.class_names, "latent_dim": hparams.latent_dim,
        "pixel_normalisation": PIXEL_NORMALISATION,
        "image": {"height": hparams.height, "width": hparams.width, "channels": hparams.channels},
        "training_data": {"spec": options.data, "fingerprint": dataset.fingerprint(), "n_train": len(train_set),
                          "n_val": len(val_set), **_validation_record(options, val_set)},
        "training": {"arch": options.arch, "epochs": options.epochs, "seed": options.seed,
                     "batch_size": options.batch_size, "lr": options.lr, "d_lr": options.d_lr,
                     "lr_decay_epochs": options.lr_decay_epochs, "device": str(device),
                     "warnings": warnings},
        "created_at": utc_now()}
    steps = max(1, len(train_set) // options.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    board = _tensorboard(options.tensorboard_dir)
    bar = tqdm(total=options.epochs * steps, initial=epoch * steps, disable=not options.progress, unit="step",
               desc="training")
    session_started, session_steps = time.perf_counter(), 0

    def report(step: int, losses: dict[str, float]) -> None:
        done = epoch * steps + step
        rate = session_steps / max(time.perf_counter() - session_started, 1e-9)
        write_json(out / PROGRESS_FILE, {  # what a training job reports while it runs
            "epoch": epoch, "epochs": options.epochs, "step": step, "steps_per_epoch": steps, "losses": losses,
            "elapsed_seconds": round(elapsed + time.perf_counter() - started, 1), "warnings": warnings,
            "eta_seconds": round((options.epochs * steps - done) / rate, 1) if session_steps else None})

    try:
        while epoch < options.epochs:
            started = time.perf_counter()
            reported = started
            order = torch.randperm(len(train_set), generator=shuffle).to(device)
            totals: dict[str, float] = {}
            for step in range(steps):
                batch = order[step * options.batch_size : (step + 1) * options.batch_size]
                _set_lr_factor(trainer, decay_factor(epoch * steps + step, options.epochs * steps,
                                                     options.lr_decay_epochs * steps))
                losses = trainer.step(x_train[batch], y_train[batch] if conditional else None)
                for key, value in losses.items():
                    totals[key] = totals.get(key, 0.0) + value
                session_steps += 1
                bar.update()
                averages = {k: v / (step + 1) for k, v in totals.items()}
                bar.set_postfix({"epoch": f"{epoch + 1}/{options.epochs}", **{k: f"{v:.3f}" for k, v in
                                                                              averages.items()}})
                if time.perf_counter() - reported > PROGRESS_EVERY_S:
                    report(step + 1, averages)
                    reported = time.perf_counter()
            for key, value in totals.items():
                history.setdefault(f"train_{key}", []).append(value / steps)
            trainer.finish_epoch(epoch, x_train, y_train if conditional else None)
            for key, value in trainer.validate(x_val, y_val if conditional else None).items():
                history.setdefault(f"val_{key}", []).append(value)
            epoch += 1
            elapsed += time.perf_counter() - started
            summary = ", ".join(f"{k}={v[-1]:.4g}" for k, v in sorted(history.items()))
            if options.progress:
                tqdm.write(f"epoch {epoch}/{options.epochs} ({elapsed:.0f}s): {summary}")
            _write_logs(out, history, epoch, trainer, grid_latents, row_names, board)
            if epoch % options.checkpoint_every == 0 or epoch == options.epochs:
                _save(trainer, out, metadata, epoch, history, shuffle, elapsed)
            started = time.perf_counter()
            report(0, {k: v[-1] for k, v in history.items()})
    finally:
        bar.close()
        if board is not None:
            board.close()
    return read_json(out / "card.json")["training"]

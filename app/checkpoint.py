"""Checkpoint folders: `config.json` + `*.safetensors` (+ `card.json`). Nothing is ever unpickled.

A folder `models/<name>/` holds:
- `config.json`: format version, architecture class, hyper-parameters, image shape, class names, pixel
  normalisation, latent size, training-data fingerprint, creation time and code version;
- the weights serving needs in one file (`generator.safetensors` for a GAN, `decoder.safetensors` for a VAE)
  and the other network in another (`discriminator.safetensors`, `encoder.safetensors`);
- `card.json` (training summary and quality metrics) and, once evaluated, `evaluator.safetensors` + `evaluator.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from app import __version__
from app.errors import CheckpointError
from app.nets.classifier import Classifier, ClassifierConfig
from app.nets.gan import Discriminator, GanConfig, Generator
from app.nets.vae import ConditionalVAE, VaeConfig

FORMAT_VERSION = 1
PIXEL_NORMALISATION = {"from_uint8": "x / 127.5 - 1", "range": [-1.0, 1.0], "layout": "NCHW"}
# architecture class → (kind, hyper-parameter dataclass, {role: weights file}); the first role is what serving needs.
ARCHITECTURES: dict[str, tuple[str, type, dict[str, str]]] = {
    "ConditionalGAN": ("gan", GanConfig, {"generator": "generator.safetensors",
                                          "discriminator": "discriminator.safetensors"}),
    "ConditionalVAE": ("vae", VaeConfig, {"decoder": "decoder.safetensors", "encoder": "encoder.safetensors"}),
}


def utc_now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Sorted, indented JSON with a trailing newline, written atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True, indent=2) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return payload


def save_weights(path: Path, module: nn.Module) -> None:
    tensors = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def load_weights(path: Path, module: nn.Module) -> None:
    """Load a `.safetensors` file into `module` strictly; any mismatch names the file and the keys."""
    try:
        state = load_file(str(path))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: weights file missing") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid .safetensors file (corrupt, truncated or pickled?): {exc}") from exc
    expected = module.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the architecture: missing keys {missing}, "
                              f"unexpected keys {unexpected}")
    wrong = [f"{k}: {list(state[k].shape)} != {list(v.shape)}"
             for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{path}: tensor shapes do not match the config: {'; '.join(wrong)}")
    module.load_state_dict(state, strict=True)


def config_hash(folder: Path) -> str:
    """sha256 of config.json and the serving weights: identifies the exact model that made a sample."""
    digest = hashlib.sha256()
    config = read_json(folder / "config.json")
    for file in ["config.json", next(iter(config.get("weights", {}).values()), "")]:
        if file and (folder / file).is_file():
            digest.update((folder / file).read_bytes())
    return "sha256:" + digest.hexdigest()


def build_config(class_name: str, hparams: Any, class_names: list[str], training_data: dict[str, Any],
                 training: dict[str, Any]) -> dict[str, Any]:
    """The config.json payload of a new checkpoint."""
    _, _, weights = ARCHITECTURES[class_name]
    return {
        "format_version": FORMAT_VERSION,
        "class_name": class_name,
        "kind": ARCHITECTURES[class_name][0],
        "hyperparameters": dataclasses.asdict(hparams),
        "image": {"height": hparams.height, "width": hparams.width, "channels": hparams.channels},
        "class_names": class_names,
        "pixel_normalisation": PIXEL_NORMALISATION,
        "latent_dim": hparams.latent_dim,
        "training_data": training_data,
        "training": training,
        "weights": weights,
        "created_at": utc_now(),
        "code_version": __version__,
    }


def parse_config(folder: Path) -> tuple[dict[str, Any], Any]:
    """Read and validate config.json; returns it and its hyper-parameter dataclass."""
    config = read_json(folder / "config.json")
    path = folder / "config.json"
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {config.get('format_version')!r} is not supported "
                              f"(this synthgen reads {FORMAT_VERSION})")
    class_name = config.get("class_name")
    if class_name not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown class_name {class_name!r}; known: {sorted(ARCHITECTURES)}")
    _, hparams_class, _ = ARCHITECTURES[class_name]
    try:
        hparams = hparams_class(**config["hyperparameters"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: bad hyperparameters for {class_name}: {exc}") from exc
    names = config.get("class_names")
    if not isinstance(names, list) or len(names) != hparams.num_classes:
        raise CheckpointError(f"{path}: class_names must list {hparams.num_classes} names")
    return config, hparams


@dataclass
class SyntheticModel:
    """A loaded checkpoint: the network that generates (GAN generator or VAE) and its metadata."""

    name: str
    folder: Path
    config: dict[str, Any]
    net: Generator | ConditionalVAE
    card: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""  # of config.json + serving weights, computed once at load (manifests cite it)

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def class_names(self) -> list[str]:
        return self.config["class_names"]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def latent_dim(self) -> int:
        return self.config["latent_dim"]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        image = self.config["image"]
        return image["height"], image["width"], image["channels"]

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Latents (+ labels) → images in [-1, 1], `[N, C, H, W]`."""
        if isinstance(self.net, ConditionalVAE):
            return self.net.decode(z, labels)
        return self.net(z, labels)


def build_nets(class_name: str, hparams: Any) -> dict[str, nn.Module]:
    """Fresh networks of an architecture, by role (the roles of ARCHITECTURES)."""
    if class_name == "ConditionalGAN":
        return {"generator": Generator(hparams), "discriminator": Discriminator(hparams)}
    vae = ConditionalVAE(hparams)
    return {"decoder": vae.decoder, "encoder": vae.encoder, "vae": vae}


def load_model(folder: str | Path, device: str | torch.device = "cpu", name: str | None = None) -> SyntheticModel:
    """Load a checkpoint folder for sampling (eval mode) on `device`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    config, hparams = parse_config(folder)
    class_name = config["class_name"]
    nets = build_nets(class_name, hparams)
    _, _, weights = ARCHITECTURES[class_name]
    roles = list(weights) if class_name == "ConditionalVAE" else ["generator"]
    for role in roles:
        load_weights(folder / weights[role], nets[role])
    net = nets["vae"] if class_name == "ConditionalVAE" else nets["generator"]
    card = read_json(folder / "card.json") if (folder / "card.json").is_file() else {}
    return SyntheticModel(name or folder.name, folder, config, net.to(device).eval().requires_grad_(False), card,
                          config_hash(folder))


def save_evaluator(folder: Path, classifier: Classifier, summary: dict[str, Any],
                   train_features: torch.Tensor | None = None) -> None:
    """The evaluator CNN, its summary and (for the filters) its features of the training images, in float16."""
    save_weights(folder / "evaluator.safetensors", classifier)
    if train_features is not None:
        save_file({"features": train_features.detach().cpu().half().contiguous()},
                  str(folder / "train_features.safetensors"))
    write_json(folder / "evaluator.json", {"format_version": FORMAT_VERSION, "class_name": "Classifier",
                                           "hyperparameters": dataclasses.asdict(classifier.cfg), **summary})


def load_evaluator(folder: Path, device: str | torch.device = "cpu") -> Classifier:
    meta = read_json(folder / "evaluator.json")
    try:
        classifier = Classifier(ClassifierConfig(**meta["hyperparameters"]))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / 'evaluator.json'}: bad hyperparameters: {exc}") from exc
    load_weights(folder / "evaluator.safetensors", classifier)
    return classifier.to(device).eval().requires_grad_(False)


def load_training_features(folder: Path, device: str | torch.device = "cpu") -> torch.Tensor:
    """The evaluator features of the training images that `evaluate` stored (float32 `[N, D]`)."""
    path = folder / "train_features.safetensors"
    try:
        return load_file(str(path))["features"].float().to(device)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing; run synthgen evaluate on the model") from exc
    except (SafetensorError, OSError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a valid features file: {exc}") from exc

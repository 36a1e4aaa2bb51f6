"""The checkpoint format: a folder with a JSON config and `*.safetensors` weights. Nothing is ever unpickled.

A network class that subclasses `Checkpointable` and is `@register`ed owns its save and load: `save_pretrained`
writes its config (format version, class name, hyper-parameters, weight files) and one weights file per part;
`Checkpointable.from_pretrained` reads the class name from the config, looks the class up in the registry and
loads the weights strictly. A generator folder `models/<name>/` also holds `card.json` and, once evaluated,
`evaluator.json` + `evaluator.safetensors` and the evaluator's features of the training images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from app import __version__
from app.errors import CheckpointError

FORMAT_VERSION = 1
FEATURES_FILE = "train_features.safetensors"
REGISTRY: dict[str, type[Checkpointable]] = {}
Arch = TypeVar("Arch", bound="type[Checkpointable]")


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_weights(path: Path, module: nn.Module) -> None:
    """The tensors a `.safetensors` file holds (read from its header, nothing loaded) match `module`'s keys and
    shapes; `module` may live on the meta device, so a config is checked before anything is allocated for it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: weights file missing") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid .safetensors file (corrupt, truncated or pickled?): {exc}") from exc
    expected = module.state_dict()
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the architecture: missing keys {missing}, "
                              f"unexpected keys {unexpected}")
    wrong = [f"{k}: {shapes[k]} != {list(v.shape)}" for k, v in expected.items() if shapes[k] != list(v.shape)]
    if wrong:
        raise CheckpointError(f"{path}: tensor shapes do not match the config: {'; '.join(wrong)}")


def check_digest(path: Path, sha256: str | None) -> None:
    """With `sha256` (from the config), the file must have that digest: a truncated, corrupted or swapped file is
    refused."""
    try:
        if sha256 is not None and file_sha256(path) != sha256:
            raise CheckpointError(f"{path}: its sha256 is not the one config.json records (corrupt, truncated or "
                                  "replaced); copy or download the model folder again")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: weights file missing") from exc


def load_weights(path: Path, module: nn.Module) -> None:
    """Load a `.safetensors` file into `module` strictly (`from_pretrained` has checked its digest and shapes)."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid .safetensors file (corrupt, truncated or pickled?): {exc}") from exc
    module.load_state_dict(state, strict=True)


def save_features(folder: Path, features: torch.Tensor) -> None:
    """Evaluator features of the training images, in float16 (what the `max_similarity` filter compares with)."""
    save_file({"features": features.detach().cpu().half().contiguous()}, str(folder / FEATURES_FILE))


def load_features(folder: Path, device: str | torch.device = "cpu") -> torch.Tensor:
    """The stored training features as float32 `[N, D]`."""
    path = folder / FEATURES_FILE
    try:
        return load_file(str(path))["features"].float().to(device)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing; run synthgen evaluate on the model") from exc
    except (SafetensorError, OSError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a valid features file: {exc}") from exc


def config_hash(folder: Path) -> str:
    """sha256 of config.json and the serving weights (with the evaluator when a label filter samples through it):
    identifies the exact model that made a sample."""
    digest = hashlib.sha256()
    config = read_json(folder / "config.json")
    files = ["config.json", next(iter(config.get("weights", {}).values()), "")]
    if config.get("label_filter") is not None:
        files += ["evaluator.json", "evaluator.safetensors"]
    for file in files:
        if file and (folder / file).is_file():
            digest.update((folder / file).read_bytes())
    return "sha256:" + digest.hexdigest()


_SCALARS: dict[Any, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def checked_hyperparameters(config_class: type, values: object, path: Path) -> dict[str, Any]:
    """The config's hyperparameters, with every field's JSON type checked against the dataclass (a wrong type
    would otherwise fail deep inside a layer with a message that names no field)."""
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: 'hyperparameters' must be an object of {config_class.__name__} fields")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CheckpointError(f"{path}: unknown hyperparameters {unknown} for {config_class.__name__}")
    for name, value in values.items():
        allowed = _SCALARS.get(str(fields[name].type))
        if allowed and (not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool))):
            raise CheckpointError(f"{path}: hyperparameter {name} must be {fields[name].type}, not {value!r}")
    return values


def register(cls: Arch) -> Arch:
    """Make a network class loadable by the class name its config names."""
    REGISTRY[cls.__name__] = cls
    return cls


class Checkpointable(nn.Module):
    """A network with its hyper-parameters (`cfg`, a dataclass) that saves to and loads from a folder.

    `weight_files` maps each part (a sub-module attribute; "" is the whole network) to its weights file;
    `serving_parts` names those sampling needs (empty: all); the others are dropped when loading for serving (a served
    GAN has no discriminator).
    """

    kind: ClassVar[str]
    config_class: ClassVar[type]
    config_file: ClassVar[str] = "config.json"
    weight_files: ClassVar[dict[str, str]]
    serving_parts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg

    def part(self, name: str) -> nn.Module:
        return self if not name else getattr(self, name)

    def save_pretrained(self, folder: Path, **metadata: Any) -> None:
        """Write every part's weights and the config (with `metadata`, e.g. class names and provenance)."""
        folder.mkdir(parents=True, exist_ok=True)
        for part, file in self.weight_files.items():
            save_weights(folder / file, self.part(part))
        write_json(folder / self.config_file, {
            **metadata, "format_version": FORMAT_VERSION, "class_name": type(self).__name__, "kind": self.kind,
            "hyperparameters": dataclasses.asdict(self.cfg), "weights": self.weight_files, "code_version": __version__,
            "sha256": {file: file_sha256(folder / file) for file in self.weight_files.values()}})

    def load_parts(self, folder: Path, parts: tuple[str, ...] = ()) -> None:
        """Load these parts' weights (default: all) strictly from `folder`."""
        for part in parts or tuple(self.weight_files):
            load_weights(folder / self.weight_files[part], self.part(part))

    @classmethod
    def from_pretrained(cls, folder: Path, serving: bool = False) -> tuple[Self, dict[str, Any]]:
        """The network a folder holds (its class named by the config, which must be `cls` or a subclass) in eval
        mode, and the config; with `serving`, only the parts sampling needs."""
        path = folder / cls.config_file
        config = read_json(path)
        if config.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {config.get('format_version')!r} is not supported "
                                  f"(this synthgen reads {FORMAT_VERSION})")
        known = sorted(name for name, arch in REGISTRY.items() if issubclass(arch, cls))
        arch = REGISTRY.get(str(config.get("class_name")))
        if arch is None or not issubclass(arch, cls):
            raise CheckpointError(f"{path}: unknown class_name {config.get('class_name')!r}; known: {known}")
        hyperparameters = checked_hyperparameters(arch.config_class, config.get("hyperparameters"), path)
        try:  # on the meta device first: the weight files' shapes are checked before memory is spent on the config
            with torch.device("meta"):
                shell = arch(arch.config_class(**hyperparameters))
        except Exception as exc:  # a value of the right type can still be impossible (e.g. a negative width)
            raise CheckpointError(f"{path}: the hyperparameters do not build a {arch.__name__}: {exc}") from exc
        parts = arch.serving_parts if serving else ()
        digests = config.get("sha256")
        if digests is not None and not isinstance(digests, dict):
            raise CheckpointError(f"{path}: 'sha256' must map weight files to their hex digests")
        for part in parts or tuple(arch.weight_files):
            file = folder / arch.weight_files[part]
            check_digest(file, (digests or {}).get(file.name))
            check_weights(file, shell.part(part))
        net = arch(arch.config_class(**hyperparameters))
        net.load_parts(folder, parts)
        for part in set(arch.weight_files) - set(parts or arch.weight_files):
            setattr(net, part, None)
        return net.eval().requires_grad_(False), config

"""VAE operations on the device's worker thread: reconstruct uploads, interpolate between latents, inpaint masked
pixels. A GAN is refused with a conflict; uploads are decoded (bounded) off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from app.core.images import decode_to_shape, to_model_range, to_uint8
from app.core.model import SyntheticModel
from app.core.nets import ConditionalVAE
from app.core.sampling import draw_latents, resolve_label
from app.engine.generation import Samples
from app.engine.repository import ServedModel
from app.errors import ConflictError, InvalidInputError

T = TypeVar("T")
Upload = tuple[str, bytes]  # (file name, PNG/JPEG bytes)


def require_vae(model: SyntheticModel) -> ConditionalVAE:
    if not isinstance(model.net, ConditionalVAE):
        raise ConflictError(f"model {model.name!r} is a {model.kind.upper()}; reconstruct, interpolate and inpaint "
                            "need a VAE (GET /v1/models lists each model's kind)")
    return model.net


async def decode_uploads(served: ServedModel, uploads: list[Upload], convert: bool, max_pixels: int,
                         mask: bool = False) -> np.ndarray:
    """Uploaded images → uint8 `[N, H, W, C]` in the model's shape (a mask: one channel), decoded on the CPU
    pool."""
    model = served.model
    height, width, channels = model.image_shape
    shape = (height, width, 1 if mask else channels)

    def decode() -> np.ndarray:
        return np.stack([decode_to_shape(data, name, shape, model.name, convert, max_pixels) for name, data in uploads])

    return await served.on_cpu(decode)


def _best_labels(vae: ConditionalVAE, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """For each image, the class whose reconstruction matches its known pixels best."""
    errors = []
    for k in range(vae.cfg.num_classes):
        labels = torch.full((len(x),), k, dtype=torch.int64, device=x.device)
        errors.append(((vae.reconstruct(x, labels) - x).pow(2) * known).flatten(1).sum(1))
    return torch.stack(errors, dim=1).argmin(dim=1)


async def _on_device(served: ServedModel, fn: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(served.executor, torch.inference_mode()(fn))


def _labels_for(model: SyntheticModel, labels: list[str | int] | None, count: int) -> torch.Tensor | None:
    if labels is None or not model.num_classes:
        return None
    if len(labels) == 1:
        labels = labels * count
    if len(labels) != count:
        raise InvalidInputError(f"{len(labels)} labels for {count} images: give one label, or one per image")
    return torch.tensor([resolve_label(label, model.class_names) for label in labels], dtype=torch.int64)


async def reconstruct(served: ServedModel, images: np.ndarray, labels: list[str | int] | None) -> Samples:
    """Encode and decode each image (posterior mean); labels omitted → the best-fitting class."""
    model = served.model
    vae = require_vae(model)
    given = _labels_for(model, labels, len(images))

    def run() -> tuple[np.ndarray, np.ndarray | None]:
        x = to_model_range(images).to(model.device)
        y = given.to(model.device) if given is not None else None
        if model.num_classes and y is None:
            y = _best_labels(vae, x, torch.ones_like(x))
        return to_uint8(vae.reconstruct(x, y)), None if y is None else y.cpu().numpy()

    out, used = await _on_device(served, run)
    return Samples(model.name, out, used, model.class_names)


async def interpolate(served: ServedModel, seed_a: int, seed_b: int, label_a: str | int | None,
                      label_b: str | int | None, steps: int) -> Samples:
    """Decode `steps` points on the line from latent (seed_a, index 0) to (seed_b, index 0); a conditional model
    also moves its one-hot label from label_a to label_b."""
    model = served.model
    vae = require_vae(model)
    first = resolve_label(label_a, model.class_names) if label_a is not None else None
    z_a, y_a = draw_latents(seed_a, [0], model.latent_dim, model.num_classes, [first])
    second = resolve_label(label_b, model.class_names) if label_b is not None else int(y_a[0])
    z_b, y_b = draw_latents(seed_b, [0], model.latent_dim, model.num_classes, [second])

    def run() -> np.ndarray:
        soft = None
        if model.num_classes:
            t = torch.linspace(0, 1, steps)[:, None]
            soft = ((1 - t) * F.one_hot(y_a, model.num_classes) + t * F.one_hot(y_b, model.num_classes))
            soft = soft.to(model.device)
        ends = vae.prior_latents(torch.cat([z_a, z_b]).to(model.device), torch.cat([y_a, y_b]).to(model.device))
        return to_uint8(vae.interpolate(ends[0], ends[1], steps, soft))

    images = await _on_device(served, run)
    nearest = np.where(np.linspace(0, 1, steps) < 0.5, int(y_a[0]), int(y_b[0]))
    return Samples(model.name, images, nearest if model.num_classes else None, model.class_names, columns=steps)


async def inpaint(served: ServedModel, image: np.ndarray, mask: np.ndarray, label: str | int | None,
                  iterations: int = 60) -> Samples:
    """Fill the masked pixels (mask > 127) by iterating encode/decode while clamping the known pixels."""
    model = served.model
    vae = require_vae(model)
    given = _labels_for(model, [label] if label is not None else None, 1)

    def run() -> tuple[np.ndarray, np.ndarray | None]:
        x = to_model_range(image[None]).to(model.device)
        known = torch.from_numpy(mask[None] <= 127).permute(0, 3, 1, 2).to(model.device).expand_as(x).float()
        current = x * known  # unknown pixels start at mid-grey
        y = given.to(model.device) if given is not None else None
        if model.num_classes and y is None:
            y = _best_labels(vae, current, known)
        for _ in range(iterations):
            current = known * x + (1 - known) * vae.reconstruct(current, y)
        return to_uint8(current), None if y is None else y.cpu().numpy()

    out, used = await _on_device(served, run)
    return Samples(model.name, out, used, model.class_names)

"""What the routes ask of the models: generation through the micro-batcher, and the VAE operations (reconstruct,
interpolate, inpaint) on the device's worker thread. No HTTP here; results are uint8 images and labels."""

from __future__ import annotations

import asyncio
import secrets
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from app.checkpoint import SyntheticModel
from app.data import decode_image, to_model_range, to_uint8
from app.errors import ConflictError, InvalidInputError, OverloadedError
from app.filters import FilterReport, FilterSpec, fill
from app.nets.vae import ConditionalVAE
from app.repository import ServedModel
from app.sampling import MAX_SEED, draw_latents, resolve_label


@dataclass
class Samples:
    """Generated (or reconstructed) images with their labels, ready to encode."""

    model: str
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray | None  # int64 [N], None for an unconditional model
    class_names: list[str]
    seed: int | None = None
    indices: np.ndarray | None = None  # the sample indices (not 0..n-1 once filters rejected candidates)
    rejected: dict[str, int] | None = None  # candidates each filter rejected, when filters were asked for
    columns: int | None = None  # grid layout for format=png (None: about square)


INLINE_SAMPLES = 64


def sampler(served: ServedModel, seed: int, truncation: float, timeout_s: float, wait_when_full: bool = False):
    """(indices, labels) → (uint8 images, labels) through the micro-batcher; with `wait_when_full`, a full queue
    is waited out (for exports) instead of answered with 503."""
    model = served.model

    async def generate(indices: list[int] | range, labels: list[int | None]) -> tuple[np.ndarray, np.ndarray]:
        args = (seed, indices, model.latent_dim, model.num_classes, labels)
        # ~15 µs a sample: a thread hop costs more than drawing a few latents on the event loop
        if len(indices) <= INLINE_SAMPLES:
            z, drawn = draw_latents(*args)
        else:
            z, drawn = await asyncio.to_thread(draw_latents, *args)
        delay, deadline = 0.05, time.monotonic() + timeout_s
        while True:
            try:
                return await served.batcher.submit(z, drawn, truncation, timeout_s), drawn.numpy()
            except OverloadedError:
                if not wait_when_full or time.monotonic() > deadline:  # never wait forever (an unloaded model)
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    return generate


async def generate(served: ServedModel, n: int, label: str | int | None, seed: int | None, truncation: float,
                   timeout_s: float, spec: FilterSpec | None = None, max_rounds: int = 20) -> Samples:
    """n samples of `seed` (a random seed when None) at indices 0..n-1, or, with filters, the first candidate
    of each slot that passes them."""
    model = served.model
    index = resolve_label(label, model.class_names) if label is not None else None
    seed = secrets.randbelow(MAX_SEED) if seed is None else seed
    spec = spec or FilterSpec()
    report = FilterReport()
    images, labels, indices = await fill(sampler(served, seed, truncation, timeout_s), served.judge,
                                         served.executor, spec, list(range(n)), [index] * n, n, max_rounds, report)
    return Samples(model.name, images, labels if model.num_classes else None, model.class_names, seed, indices,
                   report.rejected if spec.active else None)


def require_vae(model: SyntheticModel) -> ConditionalVAE:
    if not isinstance(model.net, ConditionalVAE):
        raise ConflictError(f"model {model.name!r} is a {model.kind.upper()}; reconstruct, interpolate and inpaint "
                            "need a VAE (GET /v1/models lists each model's kind)")
    return model.net


def decode_upload(data: bytes, name: str, model: SyntheticModel, convert: bool, max_pixels: int,
                  mask: bool = False) -> np.ndarray:
    """An uploaded PNG/JPEG → uint8 `[H, W, C]` in the model's shape (resized only when `convert`); a mask is
    always one channel."""
    image = decode_image(data, name, max_pixels)
    height, width, channels = model.image_shape
    channels = 1 if mask else channels
    mode = "L" if channels == 1 else "RGB"
    if image.size != (width, height) or image.mode != mode:
        if not convert and image.size != (width, height):
            raise InvalidInputError(f"{name}: {image.size[0]}×{image.size[1]} pixels, but {model.name} works on "
                                    f"{width}×{height}; resize it or pass convert=true")
        image = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def _best_labels(vae: ConditionalVAE, x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """For each image, the class whose reconstruction matches its known pixels best."""
    errors = []
    for k in range(vae.cfg.num_classes):
        labels = torch.full((len(x),), k, dtype=torch.int64, device=x.device)
        errors.append(((vae.reconstruct(x, labels) - x).pow(2) * known).flatten(1).sum(1))
    return torch.stack(errors, dim=1).argmin(dim=1)


async def _on_device(executor: Executor, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


def _labels_for(model: SyntheticModel, labels: list[str | int] | None, count: int) -> torch.Tensor | None:
    if labels is None or not model.num_classes:
        return None
    if len(labels) == 1:
        labels = labels * count
    if len(labels) != count:
        raise InvalidInputError(f"{len(labels)} labels for {count} images: give one label, or one per image")
    return torch.tensor([resolve_label(label, model.class_names) for label in labels], dtype=torch.int64)


async def reconstruct(model: SyntheticModel, executor: Executor, uploads: list[np.ndarray],
                      labels: list[str | int] | None) -> Samples:
    """Encode and decode each image (posterior mean); labels omitted → the best-fitting class."""
    vae = require_vae(model)
    images = np.stack(uploads)
    given = _labels_for(model, labels, len(images))

    @torch.inference_mode()
    def run() -> tuple[np.ndarray, np.ndarray | None]:
        x = to_model_range(images).to(model.device)
        y = given.to(model.device) if given is not None else None
        if model.num_classes and y is None:
            y = _best_labels(vae, x, torch.ones_like(x))
        return to_uint8(vae.reconstruct(x, y)), None if y is None else y.cpu().numpy()

    out, used = await _on_device(executor, run)
    return Samples(model.name, out, used, model.class_names)


async def interpolate(model: SyntheticModel, executor: Executor, seed_a: int, seed_b: int,
                      label_a: str | int | None, label_b: str | int | None, steps: int) -> Samples:
    """Decode `steps` points on the line from latent (seed_a, index 0) to (seed_b, index 0); a conditional model
    also moves its one-hot label from label_a to label_b."""
    vae = require_vae(model)
    first = resolve_label(label_a, model.class_names) if label_a is not None else None
    z_a, y_a = draw_latents(seed_a, [0], model.latent_dim, model.num_classes, [first])
    second = resolve_label(label_b, model.class_names) if label_b is not None else int(y_a[0])
    z_b, y_b = draw_latents(seed_b, [0], model.latent_dim, model.num_classes, [second])

    @torch.inference_mode()
    def run() -> np.ndarray:
        t = torch.linspace(0, 1, steps)[:, None]
        z = ((1 - t) * z_a + t * z_b).to(model.device)
        if not model.num_classes:
            return to_uint8(vae.decode(z))
        soft = (1 - t) * F.one_hot(y_a, model.num_classes) + t * F.one_hot(y_b, model.num_classes)
        return to_uint8(vae.decode(z, soft.to(model.device)))

    images = await _on_device(executor, run)
    nearest = np.where(np.linspace(0, 1, steps) < 0.5, int(y_a[0]), int(y_b[0]))
    return Samples(model.name, images, nearest if model.num_classes else None, model.class_names, columns=steps)


async def inpaint(model: SyntheticModel, executor: Executor, image: np.ndarray, mask: np.ndarray,
                  label: str | int | None, iterations: int = 60) -> Samples:
    """Fill the masked pixels (mask > 127) by iterating encode/decode while clamping the known pixels."""
    vae = require_vae(model)
    given = _labels_for(model, [label] if label is not None else None, 1)

    @torch.inference_mode()
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

    out, used = await _on_device(executor, run)
    return Samples(model.name, out, used, model.class_names)

"""Deterministic sampling: a sample is a pure function of (model, seed, index).

Each index gets its own random generator, seeded from (seed, index), which draws the latent and then, when no
label is asked for, the label. The same code path serves the CLI and the server.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from app.core.images import to_uint8
from app.core.label_filter import MAX_TRIES, redraw
from app.core.model import SyntheticModel
from app.errors import InvalidInputError

_MASK64 = (1 << 64) - 1
MAX_SEED = 2**53 - 1  # the largest integer every JSON parser (JavaScript's too) reads exactly
MIN_PASS = 4  # the fewest rows a forward pass runs on (see `pass_rows`)


def index_seed(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): independent, well-mixed seeds for neighbouring indices."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def pass_rows(size: int) -> int:
    """The rows a forward pass of `size` samples runs on: the next power of two, at least `MIN_PASS`. The CPU kernels
    round differently for one or two rows, or for odd sizes split between threads, which moved a pixel of ~0.5 % of
    samples by a level; with padded shapes a sample is the same however requests are split and batched. A handful of
    shapes also keeps the backends' per-shape caches (oneDNN primitives, cuDNN plans) bounded."""
    return max(MIN_PASS, 1 << max(size - 1, 0).bit_length())


def resolve_label(label: str | int, class_names: list[str]) -> int:
    """A class name, or an index into the class names (an int, or its canonical ASCII decimal string) → the index.

    Nothing is guessed: " 7", "07", "٧" and booleans match no class unless a class has exactly that name."""
    if not class_names:
        raise InvalidInputError("this model is unconditional; leave out the label")
    if isinstance(label, str) and label in class_names:
        return class_names.index(label)
    index = -1
    if isinstance(label, int) and not isinstance(label, bool):
        index = label
    elif isinstance(label, str) and label.isascii() and label.isdigit() and str(int(label)) == label:
        index = int(label)
    if 0 <= index < len(class_names):
        return index
    shown = repr(label) if len(repr(label)) <= 100 else f"{repr(label)[:100]}… ({len(repr(label))} characters)"
    raise InvalidInputError(f"unknown label {shown}; use a class name or an index: {class_names}")


def draw_latents(seed: int, indices: Sequence[int], latent_dim: int, num_classes: int,
                 labels: Sequence[int | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents `[n, latent_dim]` and labels `[n]` for these indices; a `None` label is drawn uniformly."""
    z = torch.empty(len(indices), latent_dim)
    out_labels = [0] * len(indices)
    gen = torch.Generator()  # one generator reseeded per index: same draws, a fraction of the per-row cost
    for row, index in enumerate(indices):
        gen.manual_seed(index_seed(seed, index))
        torch.randn(latent_dim, generator=gen, out=z[row])
        label = labels[row] if labels is not None else None
        if label is None and num_classes:
            label = int(torch.randint(num_classes, (1,), generator=gen))
        out_labels[row] = label or 0
    return z, torch.tensor(out_labels, dtype=torch.int64)


@torch.inference_mode()
def render(model: SyntheticModel, z: torch.Tensor, labels: torch.Tensor, truncation: float | torch.Tensor = 1.0,
           batch_size: int = 512) -> np.ndarray:
    """Run the generator on latents scaled by `truncation` (GAN ψ, VAE prior temperature; a float or one value
    per sample, `[N, 1]`), which multiplies the model's own `latent_scale` (1 draws as its card was measured) →
    uint8 `[N, H, W, C]`, in passes of `batch_size` padded to `pass_rows`, through the model's label filter when it
    has one."""
    chunks = []
    for start in range(0, len(z), batch_size):
        scale = truncation[start : start + batch_size] if isinstance(truncation, torch.Tensor) else truncation
        zb, yb = z[start : start + batch_size], labels[start : start + batch_size]
        chunks.append(_filtered_pass(model, zb, yb, scale) if model.label_filter else _pass(model, zb, yb, scale))
    return np.concatenate(chunks) if chunks else np.zeros((0, *model.image_shape), np.uint8)


def _padded(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors padded to `pass_rows` rows with copies of their first row (whose outputs are dropped)."""
    n, rows = len(tensors[0]), pass_rows(len(tensors[0]))
    return [torch.cat([t, t[:1].expand(rows - n, *t.shape[1:])]) if rows != n else t for t in tensors]


def _pass(model: SyntheticModel, z: torch.Tensor, labels: torch.Tensor, scale: float | torch.Tensor) -> np.ndarray:
    zb, yb = _padded(z * scale, labels)
    images = model.net.generate(zb.to(model.device), yb.to(model.device) if model.num_classes else None)
    return to_uint8(images[: len(z)])


def _confidence(model: SyntheticModel, images: np.ndarray, labels: torch.Tensor) -> np.ndarray:
    x, y = _padded(torch.from_numpy(images), labels)
    return model.label_filter.confidence(x.numpy(), y)[: len(images)]  # type: ignore[union-attr]


def _filtered_pass(model: SyntheticModel, z: torch.Tensor, labels: torch.Tensor,
                   scale: float | torch.Tensor) -> np.ndarray:
    """`_pass`, then rows whose label the evaluator doubts are drawn again (see `app.core.label_filter`): a row keeps
    its first passing try, or after `MAX_TRIES` the try whose label it gives the highest probability."""
    threshold = model.label_filter.min_confidence  # type: ignore[union-attr]
    images = _pass(model, z, labels, scale)
    best = _confidence(model, images, labels)
    todo = np.flatnonzero(best < threshold)
    for attempt in range(1, MAX_TRIES):
        if not len(todo):
            break
        rows = torch.from_numpy(todo)
        tries = _pass(model, redraw(z[rows], attempt), labels[rows],
                      scale[rows] if isinstance(scale, torch.Tensor) else scale)
        confidence = _confidence(model, tries, labels[rows])
        better = confidence > best[todo]
        images[todo[better]] = tries[better]
        best[todo[better]] = confidence[better]
        todo = todo[confidence < threshold]
    return images


def per_class_labels(num_classes: int, per_class: int) -> list[int]:
    """Labels 0,0,…,1,1,… with `per_class` of each class, in index order."""
    return [label for label in range(num_classes) for _ in range(per_class)]


def sample(model: SyntheticModel, seed: int, labels: Sequence[int | None], truncation: float = 1.0,
           start_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Samples at indices `start_index …` with the given labels (None → drawn) → (uint8 images, int64 labels)."""
    indices = range(start_index, start_index + len(labels))
    z, drawn = draw_latents(seed, indices, model.latent_dim, model.num_classes, labels)
    return render(model, z, drawn, truncation), drawn.numpy()

"""The pictures of a model's card: a fresh sample grid (one row per class, seed 0) and the nearest-training-neighbour
grid that evaluation left in the model folder."""

from __future__ import annotations

from app.core.images import encode_png, image_grid
from app.core.model import NEIGHBOURS_FILE
from app.engine.generation import generate_samples
from app.engine.plans import plan_samples
from app.engine.repository import ServedModel
from app.settings import Settings

PER_CLASS = 8


async def card_images(served: ServedModel, settings: Settings) -> tuple[bytes | None, bytes | None]:
    """(sample grid PNG, nearest-neighbour grid PNG), each None when there is none."""
    model = served.model
    samples_png = None
    if model.num_classes:
        plan = plan_samples(model, PER_CLASS * model.num_classes, "a card", per_class=PER_CLASS, seed=0)
        samples = await generate_samples(served, plan, settings)
        samples_png = await served.on_cpu(lambda: encode_png(image_grid(samples.images, columns=PER_CLASS, scale=2)))
    neighbours = model.folder / NEIGHBOURS_FILE
    neighbours_png = await served.on_cpu(neighbours.read_bytes) if neighbours.is_file() else None
    return samples_png, neighbours_png

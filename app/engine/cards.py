"""The pictures of a model's card: a fresh sample grid (one row per class, seed 0) and the nearest-training-neighbour
grid that evaluation left in the model folder. Both are a pure function of the served version, so they are made once
per version and kept while it is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from weakref import WeakKeyDictionary

from app.core.images import image_grid
from app.core.model import NEIGHBOURS_FILE
from app.core.png import encode_png
from app.engine.generation import generate_samples
from app.engine.plans import SamplePlan
from app.engine.repository import ServedModel
from app.settings import Settings

PER_CLASS = 8
MAX_ROWS = 100  # classes shown: a model trained through the API may have thousands


@dataclass(frozen=True)
class CardImages:
    samples_png: bytes | None  # None for an unconditional model
    neighbours_png: bytes | None  # None when evaluation left none
    note: str | None = None  # what the sample grid leaves out, when it is bounded


_made: WeakKeyDictionary[ServedModel, CardImages] = WeakKeyDictionary()


def card_rows(num_classes: int, max_samples: int) -> tuple[int, int]:
    """(classes shown, samples per class): PER_CLASS of each class, fewer per class and then only the first classes
    when that would pass `max_samples` or MAX_ROWS."""
    per_class = max(1, min(PER_CLASS, max_samples // num_classes))
    return min(num_classes, MAX_ROWS, max_samples // per_class), per_class


async def card_images(served: ServedModel, settings: Settings) -> CardImages:
    """The card's images for this served version (made on the first call; a cancelled call keeps nothing)."""
    if (made := _made.get(served)) is not None:
        return made
    model = served.model
    samples_png: bytes | None = None
    note: str | None = None
    if model.num_classes:
        limit = settings.max_samples_per_request  # settings keep the queue at least this large
        classes, per_class = card_rows(model.num_classes, limit)
        if classes < model.num_classes or per_class < PER_CLASS:
            shown = f"the first {classes} of" if classes < model.num_classes else "all"
            note = (f"{shown} {model.num_classes} classes, {per_class} each: a card shows at most {MAX_ROWS} classes "
                    f"and {limit} samples")
        plan = SamplePlan(tuple((label, per_class) for label in range(classes)), seed=0)
        samples = await generate_samples(served, plan, settings)
        samples_png = await served.on_cpu(lambda: encode_png(image_grid(samples.images, columns=per_class, scale=2)))
    neighbours = model.folder / NEIGHBOURS_FILE
    neighbours_png = await served.on_cpu(neighbours.read_bytes) if neighbours.is_file() else None
    made = _made[served] = CardImages(samples_png, neighbours_png, note)
    return made

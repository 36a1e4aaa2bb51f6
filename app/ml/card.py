"""The model card (`card.json`), the one place that writes it: training records how the model was made, evaluation
how good it is. Serving only reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.core.checkpoint import read_json, write_json

CARD_FILE = "card.json"
CARD_VERSION = 1


def update_card(folder: Path, **sections: Any) -> dict[str, Any]:
    """Replace these top-level sections of the folder's card (e.g. `training=…`, `metrics=…`), keep the others;
    returns the card written."""
    path = folder / CARD_FILE
    card = read_json(path) if path.is_file() else {}
    card.update(sections, format_version=CARD_VERSION, model=folder.name)
    write_json(path, card)
    return card

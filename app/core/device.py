"""Choosing the torch device from a setting or a command-line flag."""

from __future__ import annotations

import torch

from app.errors import InvalidInputError


def resolve_device(name: str) -> torch.device:
    """`auto` → cuda when available, else cpu; `cuda`/`cuda:N` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidInputError(f"device {name!r} is not valid; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {name!r} asked for, but CUDA is not available here; use cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device

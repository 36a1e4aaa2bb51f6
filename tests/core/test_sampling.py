"""Sampling: a sample is a pure function of (model, seed, index)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.core.model import load_model
from app.core.sampling import sample


def test_sample_is_a_function_of_seed_and_index(tiny_gan: Path) -> None:
    model = load_model(tiny_gan)
    short, short_labels = sample(model, 11, [None] * 4)
    long, long_labels = sample(model, 11, [None] * 9)
    assert np.array_equal(short, long[:4]) and np.array_equal(short_labels, long_labels[:4])
    tail, _ = sample(model, 11, list(long_labels[4:]), start_index=4)
    assert np.array_equal(tail, long[4:])

"""Sample plans: labels by index without listing them, limits checked before anything is built."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from app.core.model import load_model
from app.engine.plans import SamplePlan, plan_samples
from app.errors import InvalidInputError


def test_a_million_sample_plan_stays_small_and_slices_exactly(tiny_gan: Path) -> None:
    model = load_model(tiny_gan)
    plan = plan_samples(model, 1_000_000, "a test", per_class=100_000, seed=3)
    assert len(plan) == 1_000_000 and len(plan.runs) == 10 and sys.getsizeof(plan.runs) < 1000
    assert plan.labels(99_998, 100_002) == [0, 0, 1, 1]
    assert plan.labels(999_999, 2_000_000) == [9]
    assert plan.counts(model.class_names) == {name: 100_000 for name in model.class_names}
    drawn = SamplePlan(((None, 5),), seed=1)
    assert drawn.labels() == [None] * 5 and drawn.counts(model.class_names) is None


def test_limits_are_checked_before_anything_is_built(tiny_gan: Path) -> None:
    model = load_model(tiny_gan)
    with pytest.raises(InvalidInputError, match="6134232340 samples is over the limit of 10 for a test"):
        plan_samples(model, 10, "a test", per_class=613_423_234)
    with pytest.raises(InvalidInputError, match="names class '7' twice"):
        plan_samples(model, 10, "a test", per_class={"7": 1, 7: 1})  # a name and an index of the same class

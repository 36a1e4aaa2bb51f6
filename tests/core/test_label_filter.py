"""A model's own label filter: rejected samples are drawn again, and a sample stays a function of (seed, index)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from app.core.checkpoint import config_hash, read_json, write_json
from app.core.label_filter import MAX_TRIES, LabelFilter, redraw
from app.core.model import load_model
from app.core.nets import Classifier, ClassifierConfig
from app.core.sampling import draw_latents, per_class_labels, render, sample
from app.errors import CheckpointError
from tests.conftest import serve
from tests.helpers import npz_arrays

LABELS = per_class_labels(10, 6)


def add_filter(folder: Path, min_confidence: float | None = None) -> float:
    """Give the model at `folder` a (random, seeded) evaluator and a label filter that rejects about half of its
    unfiltered samples; returns the filter's min_confidence."""
    height, width, channels = load_model(folder).image_shape
    torch.manual_seed(0)
    evaluator = Classifier(ClassifierConfig(height, width, channels, 10)).eval()
    evaluator.save_pretrained(folder, temperature=0.05)  # a low temperature spreads a random net's probabilities
    images, labels = sample(load_model(folder), 0, LABELS)
    confidence = LabelFilter(evaluator, 1.0, 0.05).confidence(images, torch.from_numpy(labels))
    min_confidence = min_confidence or float(np.quantile(confidence, 0.5))
    config = read_json(folder / "config.json")
    write_json(folder / "config.json", {**config, "label_filter": {"min_confidence": min_confidence}})
    return min_confidence


@pytest.fixture
def filtered(tiny_gan: Path, tmp_path: Path) -> Path:
    folder = shutil.copytree(tiny_gan, tmp_path / "models" / "digits-gan")
    add_filter(folder)
    return folder


def test_samples_the_evaluator_doubts_are_drawn_again(filtered: Path, tiny_gan: Path) -> None:
    model = load_model(filtered)
    assert model.label_filter is not None
    threshold, labels = model.label_filter.min_confidence, torch.tensor(LABELS)
    plain, _ = sample(load_model(tiny_gan), 0, LABELS)
    kept, drawn = sample(model, 0, LABELS)
    assert drawn.tolist() == LABELS
    before = model.label_filter.confidence(plain, labels)
    after = model.label_filter.confidence(kept, labels)
    clear = np.abs(before - threshold) > 1e-4  # rounding apart, the same verdict in any batch
    passed, failed = clear & (before >= threshold), clear & (before < threshold)
    assert passed.sum() >= 20 and failed.sum() >= 20
    assert np.array_equal(kept[passed], plain[passed])  # samples that passed are untouched
    assert not np.array_equal(kept[failed], plain[failed]) and (after[failed] >= before[failed] - 1e-5).all()
    # the random evaluator gives some classes less than the threshold whatever the image: those keep their best try
    assert (after >= threshold - 1e-4).mean() > (before >= threshold).mean() + 0.05


def test_a_filtered_sample_is_the_same_however_it_is_batched(filtered: Path) -> None:
    model = load_model(filtered)
    whole, _ = sample(model, 3, LABELS)
    head, _ = sample(model, 3, LABELS[:7])
    tail, _ = sample(model, 3, LABELS[7:], start_index=7)
    assert np.array_equal(np.concatenate([head, tail]), whole)
    assert np.array_equal(sample(model, 3, LABELS)[0], whole)


def test_a_sample_no_try_passes_keeps_its_best_try(tiny_gan: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_gan, tmp_path / "model")
    add_filter(folder, min_confidence=1.0)  # no image gets probability 1: every sample takes all its tries
    model, plain = load_model(folder), load_model(folder, label_filter=False)
    z, labels = draw_latents(0, range(4), model.latent_dim, 10, LABELS[:4])
    tries = [render(plain, z if attempt == 0 else redraw(z, attempt), labels) for attempt in range(MAX_TRIES)]
    confidence = np.stack([model.label_filter.confidence(images, labels) for images in tries])  # [tries, 4]
    best = confidence.argmax(axis=0)  # the first of equal ones, as the filter keeps
    assert len(set(best.tolist())) > 1  # not simply the first or the last try
    expected = np.stack([tries[attempt][row] for row, attempt in enumerate(best)])
    assert np.array_equal(sample(model, 0, LABELS[:4])[0], expected)
    assert torch.equal(redraw(z, 1), redraw(z.clone(), 1)) and not torch.equal(redraw(z, 1), redraw(z, 2))


def test_the_filter_needs_its_evaluator_and_a_valid_spec(filtered: Path) -> None:
    before = config_hash(filtered)
    torch.manual_seed(1)
    Classifier(ClassifierConfig(8, 8, 1, 10)).save_pretrained(filtered, temperature=1.0)
    assert config_hash(filtered) != before  # the evaluator decides which samples come out
    (filtered / "evaluator.json").unlink()
    with pytest.raises(CheckpointError, match="label_filter needs the model's evaluator; run synthgen evaluate"):
        load_model(filtered)
    assert load_model(filtered, label_filter=False).label_filter is None
    config = read_json(filtered / "config.json")
    for bad in ({"min_confidence": 0}, {"min_confidence": True}, {"min_confidence": 0.5, "x": 1}, 0.5):
        write_json(filtered / "config.json", {**config, "label_filter": bad})
        with pytest.raises(CheckpointError, match="label_filter must be"):
            load_model(filtered)


@pytest.mark.anyio
async def test_the_server_samples_through_the_filter(filtered: Path) -> None:
    expected, labels = sample(load_model(filtered), 5, [None] * 12)
    async with serve(filtered.parent, max_batch_wait_ms=50) as client:
        responses = await asyncio.gather(*[
            client.post("/v1/models/digits-gan/generate", json={"n": n, "seed": 5, "format": "npz"})
            for n in (12, 3, 12)])
    assert all(response.status_code == 200 for response in responses)
    for response, n in zip(responses, (12, 3, 12), strict=True):
        images, drawn = npz_arrays(response)
        assert np.array_equal(images, expected[:n].reshape(images.shape)) and np.array_equal(drawn, labels[:n])

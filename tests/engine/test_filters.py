"""Filters: min_confidence really raises the evaluator's label agreement; max_similarity is bounded; kept samples
stay reproducible from their reported indices."""

from __future__ import annotations

import csv
import io
import json
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from app.core.model import load_model
from app.core.nets import Classifier
from app.core.sampling import sample
from app.engine.filters import FilterReport, FilterSpec, fill
from app.errors import InvalidInputError
from app.ml.evaluation import predict
from tests.conftest import copy_shipped, serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    return copy_shipped(tmp_path, "mnist-cvae")


def _agreement(folder: Path, images: np.ndarray, labels: np.ndarray) -> float:
    probs, _ = predict(Classifier.from_pretrained(folder)[0], images[..., None])
    return float((probs.argmax(1).numpy() == labels).mean())


async def test_min_confidence_raises_label_agreement(tmp_path: Path) -> None:
    shipped = copy_shipped(tmp_path, "fashion-cvae")  # clothes: the evaluator disagrees with some of its samples
    async with serve(shipped) as client:
        body = {"n": 200, "seed": 5, "format": "npz"}
        plain = await client.post("/v1/models/fashion-cvae/generate", json=body)
        kept = await client.post("/v1/models/fashion-cvae/generate", json={**body, "min_confidence": 0.99})
    assert plain.status_code == kept.status_code == 200
    folder = shipped / "fashion-cvae"
    with np.load(io.BytesIO(plain.content)) as a, np.load(io.BytesIO(kept.content)) as b:
        before = _agreement(folder, a["images"], a["labels"])
        after = _agreement(folder, b["images"], b["labels"])
        indices, labels, images = b["indices"], b["labels"], b["images"]
    rejected = dict(part.split("=") for part in kept.headers["x-rejected"].split(","))
    assert int(rejected["min_confidence"]) > 0
    assert before < 0.97 and after == 1.0, (before, after)
    # a kept sample is still a pure function of (model, seed, index)
    model = load_model(folder)
    for position in (0, int(np.argmax(indices))):
        again, _ = sample(model, 5, [int(labels[position])], start_index=int(indices[position]))
        assert np.array_equal(again[0, ..., 0], images[position])


async def test_filters_in_a_dataset_export(shipped: Path) -> None:
    async with serve(shipped, max_batch_size=64) as client:
        response = await client.post("/v1/models/mnist-cvae/datasets",
                                     json={"per_class": 10, "seed": 1, "min_confidence": 0.9, "max_similarity": True})
    assert response.status_code == 200
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        pngs = [n for n in archive.namelist() if n.endswith(".png")]
        rows = list(csv.DictReader(io.StringIO(archive.read("labels.csv").decode())))
    assert len(pngs) == 100 and manifest["counts"] == {str(i): 10 for i in range(10)}
    rejected = sum(manifest["filters"]["rejected"].values())
    replaced = sum(int(row["index"]) >= 100 for row in rows)  # a slot whose first candidate was rejected
    assert manifest["filters"]["min_confidence"] == 0.9 and (rejected > 0) == (replaced > 0) and rejected >= replaced


async def test_unfillable_filters_fail_with_422_not_a_loop(shipped: Path) -> None:
    async with serve(shipped, filter_max_rounds=3) as client:
        client.app.state.repository.entries["mnist-cvae"].judge.threshold = 1e9  # type: ignore[attr-defined]
        response = await client.post("/v1/models/mnist-cvae/generate", json={"n": 5, "max_similarity": True})
    assert response.status_code == 422
    assert "found no candidate passing the filters in 1 of at most 3 tries" in response.json()["detail"]


async def test_model_without_evaluator_refuses_filters(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        response = await client.post("/v1/models/digits-gan/generate", json={"n": 2, "min_confidence": 0.5})
    assert response.status_code == 422 and "synthgen evaluate" in response.json()["detail"]


async def test_a_label_filter_evaluator_before_evaluate_is_no_judge_yet(models_dir: Path) -> None:
    # tune leaves the evaluator of a chosen label filter, without the memorisation threshold evaluate adds: the
    # model serves (through its filter), and request filters still say to evaluate it
    import torch

    from app.core.checkpoint import read_json, save_features, write_json
    from app.core.nets import ClassifierConfig

    folder = models_dir / "digits-gan"
    torch.manual_seed(0)
    Classifier(ClassifierConfig(8, 8, 1, 10)).eval().save_pretrained(folder, temperature=1.0)
    save_features(folder, torch.zeros(4, 128))  # a stale reference from an earlier evaluation
    write_json(folder / "config.json", {**read_json(folder / "config.json"), "label_filter": {"min_confidence": 0.05}})
    async with serve(models_dir) as client:
        plain = await client.post("/v1/models/digits-gan/generate", json={"n": 2})
        filtered = await client.post("/v1/models/digits-gan/generate", json={"n": 2, "min_confidence": 0.5})
    assert plain.status_code == 200
    assert filtered.status_code == 422 and "synthgen evaluate" in filtered.json()["detail"]


class _OddAfterTwo:
    """A stand-in judge: candidates 0..2 (a whole first round of 3) are rejected, then every odd index passes."""

    def verdicts(self, images: np.ndarray, labels: np.ndarray, spec: FilterSpec) -> tuple[np.ndarray, np.ndarray]:
        index = images[:, 0, 0, 0].astype(int)
        return (index >= 3) & (index % 2 == 1), np.ones(len(images), dtype=bool)


async def _by_index(indices: list[int], labels: list[int | None]) -> tuple[np.ndarray, np.ndarray]:
    images = np.zeros((len(indices), 2, 2, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = indices
    return images, np.zeros(len(indices), dtype=np.int64)


async def test_a_first_round_without_acceptance_does_not_end_a_small_request() -> None:
    spec = FilterSpec(min_confidence=0.5)
    with ThreadPoolExecutor(1) as executor:
        _, _, indices = await fill(_by_index, _OddAfterTwo(), executor, spec, [0, 1, 2], [0, 0, 0], 3, 20,
                                   FilterReport())
    assert indices.tolist() == [3, 7, 5]


async def test_a_hopeless_request_reports_the_rounds_it_ran() -> None:
    async def generate(indices: list[int], labels: list[int | None]) -> tuple[np.ndarray, np.ndarray]:
        return await _by_index([0] * len(indices), labels)  # index 0: always rejected

    with ThreadPoolExecutor(1) as executor, pytest.raises(InvalidInputError) as raised:
        await fill(generate, _OddAfterTwo(), executor, FilterSpec(min_confidence=0.5), list(range(500)), [0] * 500,
                   500, 20, FilterReport())
    assert "500 of 500 samples found no candidate passing the filters in 1 of at most 20 tries" in str(raised.value)
    assert "500 candidates tried" in str(raised.value)


async def test_request_timeout_bounds_all_the_rounds_of_a_filtered_request(shipped: Path) -> None:
    async with serve(shipped, request_timeout_s=0.5, filter_max_rounds=30) as client:
        served = client.app.state.repository.entries["mnist-cvae"]  # type: ignore[attr-defined]
        served.judge.threshold = 1e9  # nothing passes max_similarity, and a 2-sample request keeps trying
        run_batch = served.batcher._run_batch

        def slow(*args):  # type: ignore[no-untyped-def]
            time.sleep(0.1)
            return run_batch(*args)

        served.batcher._run_batch = slow
        started = time.monotonic()
        response = await client.post("/v1/models/mnist-cvae/generate", json={"n": 2, "max_similarity": True})
    assert response.status_code == 504, response.text
    assert "waited over 0.5 s (SYNTHGEN_REQUEST_TIMEOUT_S)" in response.json()["detail"]
    assert time.monotonic() - started < 1.5  # not 30 rounds × 0.1 s

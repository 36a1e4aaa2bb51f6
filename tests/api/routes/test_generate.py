"""`POST /v1/models/{name}/generate`: formats, seeds, batching, fairness, overload, timeout, cancellation, faults."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import serve
from tests.helpers import hang_up_mid_generation, metric_value, npz_arrays

pytestmark = pytest.mark.anyio


async def test_generate_formats(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        response = await client.post("/v1/models/digits-gan/generate", json={"n": 6, "label": "3", "seed": 1,
                                                                              "format": "json"})
        assert response.status_code == 200 and response.headers["x-seed"] == "1"
        body = response.json()
        assert body["seed"] == 1 and len(body["samples"]) == 6
        first = body["samples"][0]
        assert first["label"] == 3 and first["class_name"] == "3" and first["index"] == 0
        assert Image.open(io.BytesIO(base64.b64decode(first["png_base64"]))).size == (8, 8)
        images, labels = npz_arrays(await client.post("/v1/models/digits-gan/generate",
                                                json={"n": 6, "label": 3, "seed": 1, "format": "npz"}))
        assert images.shape == (6, 8, 8) and images.dtype == np.uint8 and labels.tolist() == [3] * 6
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(first["png_base64"]))))
        assert np.array_equal(decoded, images[0])
        grid = await client.post("/v1/models/digits-vae/generate", json={"n": 9, "format": "png"})
        assert grid.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(grid.content)).size == (2 * (3 * 10 + 2),) * 2  # 3×3 of 8 px, 2 px apart, ×2

async def test_random_seed_is_returned_and_reproduces(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        first = await client.post("/v1/models/digits-vae/generate", json={"n": 3, "format": "npz"})
        seed = int(first.headers["x-seed"])
        again = await client.post("/v1/models/digits-vae/generate", json={"n": 3, "seed": seed, "format": "npz"})
        assert first.content == again.content

async def test_concurrent_requests_are_batched_and_deterministic(models_dir: Path) -> None:
    async with serve(models_dir, max_batch_wait_ms=50) as client:
        alone = await client.post("/v1/models/digits-gan/generate", json={"n": 5, "seed": 9, "format": "npz"})
        before = metric_value((await client.get("/metrics")).text, "synthgen_forward_passes_total", "digits-gan")
        requests = [client.post("/v1/models/digits-gan/generate", json={"n": 1 + i % 3, "seed": i, "format": "npz"})
                    for i in range(63)]
        requests.append(client.post("/v1/models/digits-gan/generate", json={"n": 5, "seed": 9, "format": "npz"}))
        responses = await asyncio.gather(*requests)
        assert all(r.status_code == 200 for r in responses)
        metrics = (await client.get("/metrics")).text
        passes = metric_value(metrics, "synthgen_forward_passes_total", "digits-gan") - before
        assert 1 <= passes < 64 / 4, passes  # far fewer forward passes than requests
        assert responses[-1].content == alone.content  # packed with 63 others: the same bytes as alone
        assert "synthgen_batch_samples_bucket" in metrics and "synthgen_queue_wait_seconds_bucket" in metrics

async def test_small_request_is_not_starved_behind_a_big_one(models_dir: Path) -> None:
    async with serve(models_dir, max_batch_size=64, max_batch_wait_ms=0) as client:
        repository = client.app.state.repository  # type: ignore[attr-defined]
        batcher = repository.entries["digits-gan"].batcher
        big = asyncio.create_task(client.post("/v1/models/digits-gan/generate",
                                              json={"n": 10_000, "seed": 0, "format": "npz"}))
        while batcher.stats.forward_passes == 0:
            await asyncio.sleep(0.001)
        passes_before = batcher.stats.forward_passes
        small = await client.post("/v1/models/digits-gan/generate", json={"n": 1, "seed": 1, "format": "npz"})
        assert small.status_code == 200
        # the HTTP hops take a few (1 ms) batches; the batcher itself serves it in the next batch (test_batcher)
        assert batcher.stats.forward_passes - passes_before <= 10
        assert not big.done()  # the big one is still being generated
        images, _ = npz_arrays(await big)
        assert len(images) == 10_000

async def test_overload_gets_503_with_retry_after(models_dir: Path) -> None:
    async with serve(models_dir, max_queued_samples=50, max_samples_per_request=50, max_batch_size=8) as client:
        responses = await asyncio.gather(*(client.post("/v1/models/digits-gan/generate", json={"n": 50, "seed": i})
                                           for i in range(20)))
        refused = [r for r in responses if r.status_code == 503]
        assert refused and {r.status_code for r in responses} == {200, 503}
        assert all(r.headers["retry-after"] == "1" and "limit of 50" in r.json()["detail"] for r in refused)
        assert (await client.post("/v1/models/digits-gan/generate", json={"n": 10})).status_code == 200

async def test_timeout_gets_504_and_leaves_the_queue(models_dir: Path) -> None:
    async with serve(models_dir, request_timeout_s=0.02, max_batch_size=8) as client:
        response = await client.post("/v1/models/digits-gan/generate", json={"n": 5000, "format": "npz"})
        assert response.status_code == 504 and "waited over" in response.json()["detail"]
        batcher = client.app.state.repository.entries["digits-gan"].batcher  # type: ignore[attr-defined]
        assert batcher.queued_samples == 0
        assert batcher.stats.samples < 5000

async def test_disconnected_client_is_cancelled(models_dir: Path) -> None:
    async with serve(models_dir, max_batch_size=8) as client:
        app = client.app  # type: ignore[attr-defined]
        batcher = app.state.repository.entries["digits-gan"].batcher
        messages = await hang_up_mid_generation(app, batcher, "POST", "/v1/models/digits-gan/generate",
                                                body=json.dumps({"n": 5000, "format": "npz"}).encode(),
                                                headers=[(b"content-type", b"application/json")])
        assert messages[0]["status"] == 499
        assert batcher.queued_samples == 0
        await asyncio.sleep(0.05)
        assert batcher.stats.samples < 5000  # generation for it stopped
        assert (await client.post("/v1/models/digits-gan/generate", json={"n": 2})).status_code == 200

@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"json": {"n": 0}}, 422, "n: Input should be greater than or equal to 1"),
        ({"json": {"n": 20_001}}, 422, "over the limit of 20000"),
        ({"json": {"n": 2, "label": "cat"}}, 422, "unknown label 'cat'"),
        ({"json": {"n": 2, "label": "x" * 100_000}}, 422, "unknown label 'xxx"),
        ({"json": {"n": 2, "format": "gif"}}, 422, "format: Input should be 'json', 'npz' or 'png'"),
        ({"json": {"n": 2, "colour": "red"}}, 422, "colour: Extra inputs are not permitted"),
        ({"json": {"n": 2, "truncation": -1}}, 422, "truncation"),
        ({"content": b'{"n": 2, "truncation": NaN}', "headers": {"content-type": "application/json"}}, 422,
         "truncation: Input should be a finite number"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "not valid JSON"),
        ({"content": b'{"n": ' + b"9" * 5000 + b"}", "headers": {"content-type": "application/json"}}, 422,
         "integers of at most 4,300 digits"),
        ({"content": b"n=2", "headers": {"content-type": "text/plain"}}, 415, "Content-Type: application/json"),
        ({"content": b"{" + b" " * 2_000_000 + b"}", "headers": {"content-type": "application/json"}}, 413,
         "over the limit"),
    ],
)
async def test_bad_generate_requests(models_dir: Path, kwargs: dict, status: int, message: str) -> None:
    async with serve(models_dir, max_samples_per_request=20_000) as client:
        response = await client.post("/v1/models/digits-gan/generate", **kwargs)
        assert response.status_code == status, response.text
        assert message in response.json()["detail"] and len(response.content) < 2000  # input is not echoed whole
        assert response.json()["request_id"] == response.headers["x-request-id"]

async def test_failing_forward_pass_fails_only_its_batch(faulty_models_dir: Path) -> None:
    async with serve(faulty_models_dir, max_batch_wait_ms=0) as client:
        failed = await client.post("/v1/models/faulty-gan/generate", json={"n": 2, "label": 3})
        assert failed.status_code == 500 and "injected fault" in failed.json()["detail"]
        assert (await client.post("/v1/models/faulty-gan/generate", json={"n": 2, "label": 2})).status_code == 200
        batcher = client.app.state.repository.entries["faulty-gan"].batcher  # type: ignore[attr-defined]
        assert batcher.running and batcher.queued_samples == 0

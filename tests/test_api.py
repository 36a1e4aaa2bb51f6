"""The HTTP API through httpx.ASGITransport, with the app's lifespan (models load at start-up)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import serve

pytestmark = pytest.mark.anyio


def _npz(response: httpx.Response) -> tuple[np.ndarray, np.ndarray]:
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content), allow_pickle=False) as archive:
        return archive["images"], archive["labels"]


def _metric(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}\{{model="{model}"\}} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


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
        images, labels = _npz(await client.post("/v1/models/digits-gan/generate",
                                                json={"n": 6, "label": 3, "seed": 1, "format": "npz"}))
        assert images.shape == (6, 8, 8) and images.dtype == np.uint8 and labels.tolist() == [3] * 6
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(first["png_base64"]))))
        assert np.array_equal(decoded, images[0])
        grid = await client.post("/v1/models/digits-vae/generate", json={"n": 9, "format": "png"})
        assert grid.headers["content-type"] == "image/png" and int(grid.headers["x-seed"]) >= 0
        assert Image.open(io.BytesIO(grid.content)).size[0] > 8 * 3


async def test_random_seed_is_returned_and_reproduces(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        first = await client.post("/v1/models/digits-vae/generate", json={"n": 3, "format": "npz"})
        seed = int(first.headers["x-seed"])
        again = await client.post("/v1/models/digits-vae/generate", json={"n": 3, "seed": seed, "format": "npz"})
        assert first.content == again.content


async def test_concurrent_requests_are_batched_and_deterministic(models_dir: Path) -> None:
    async with serve(models_dir, max_batch_wait_ms=50) as client:
        alone = await client.post("/v1/models/digits-gan/generate", json={"n": 5, "seed": 9, "format": "npz"})
        before = _metric((await client.get("/metrics")).text, "synthgen_forward_passes_total", "digits-gan")
        requests = [client.post("/v1/models/digits-gan/generate", json={"n": 1 + i % 3, "seed": i, "format": "npz"})
                    for i in range(63)]
        requests.append(client.post("/v1/models/digits-gan/generate", json={"n": 5, "seed": 9, "format": "npz"}))
        responses = await asyncio.gather(*requests)
        assert all(r.status_code == 200 for r in responses)
        metrics = (await client.get("/metrics")).text
        passes = _metric(metrics, "synthgen_forward_passes_total", "digits-gan") - before
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
        images, _ = _npz(await big)
        assert len(images) == 10_000


async def test_overload_gets_503_with_retry_after(models_dir: Path) -> None:
    async with serve(models_dir, max_queued_samples=50) as client:
        response = await client.post("/v1/models/digits-gan/generate", json={"n": 60})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "limit of 50" in response.json()["detail"]
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
        body = json.dumps({"n": 5000, "format": "npz"}).encode()
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            while batcher.stats.forward_passes < 2:  # hang up once generation is under way
                await asyncio.sleep(0.001)
            return {"type": "http.disconnect"}

        messages: list[dict] = []

        async def send(message: dict) -> None:
            messages.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/models/digits-gan/generate", "raw_path": b"", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
                 "client": ("127.0.0.1", 1), "server": ("test", 80), "state": {}}
        await app(scope, receive, send)
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
        ({"json": {"n": 2, "format": "gif"}}, 422, "format: Input should be 'json', 'npz' or 'png'"),
        ({"json": {"n": 2, "colour": "red"}}, 422, "colour: Extra inputs are not permitted"),
        ({"json": {"n": 2, "truncation": -1}}, 422, "truncation"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "not valid JSON"),
        ({"content": b"n=2", "headers": {"content-type": "text/plain"}}, 415, "Content-Type: application/json"),
        ({"content": b"{" + b" " * 2_000_000 + b"}", "headers": {"content-type": "application/json"}}, 413,
         "over the limit"),
    ],
)
async def test_bad_generate_requests(models_dir: Path, kwargs: dict, status: int, message: str) -> None:
    async with serve(models_dir, max_samples_per_request=20_000) as client:
        response = await client.post("/v1/models/digits-gan/generate", **kwargs)
        assert response.status_code == status, response.text
        assert message in response.json()["detail"]
        assert response.json()["request_id"] == response.headers["x-request-id"]


async def test_unknown_and_invalid_model_names(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        missing = await client.post("/v1/models/nope/generate", json={"n": 1})
        assert missing.status_code == 404 and "GET /v1/models" in missing.json()["detail"]
        bad = await client.get("/v1/models/..%2F..%2Fetc")
        assert bad.status_code in (404, 422)
        dotted = await client.get("/v1/models/a..b")
        assert dotted.status_code == 422 and "invalid model name" in dotted.json()["detail"]


async def test_models_listing_and_detail(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        listing = (await client.get("/v1/models")).json()["models"]
        assert [m["name"] for m in listing] == ["digits-gan", "digits-vae"]
        gan = listing[0]
        assert gan["kind"] == "gan" and gan["status"] == "ready" and gan["height"] == 8 and gan["channels"] == 1
        assert gan["class_names"] == [str(i) for i in range(10)] and gan["device"] == "cpu"
        detail = (await client.get("/v1/models/digits-vae")).json()
        assert detail["config"]["class_name"] == "ConditionalVAE" and "training" in detail["card"]


async def test_broken_model_does_not_stop_the_others_and_reload(models_dir: Path) -> None:
    broken = models_dir / "broken"
    shutil.copytree(models_dir / "digits-gan", broken)
    (broken / "generator.safetensors").write_bytes(b"garbage")
    async with serve(models_dir) as client:
        listing = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert listing["broken"]["status"] == "failed"
        assert "generator.safetensors" in listing["broken"]["error"]
        assert (await client.post("/v1/models/digits-gan/generate", json={"n": 2})).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and any("broken" in p for p in ready.json()["problems"])
        refused = await client.post("/v1/models/broken/generate", json={"n": 1})
        assert refused.status_code == 409 and "failed" in refused.json()["detail"]
        reload = await client.post("/v1/models/broken/load")
        assert reload.status_code == 409 and "generator.safetensors" in reload.json()["detail"]
        shutil.copy(models_dir / "digits-gan" / "generator.safetensors", broken / "generator.safetensors")
        assert (await client.post("/v1/models/broken/load")).json()["status"] == "ready"
        assert (await client.get("/readyz")).status_code == 200


async def test_readyz_before_and_after_loading(tmp_path: Path, tiny_gan: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    async with serve(root) as client:
        assert (await client.get("/healthz")).status_code == 200
        before = await client.get("/readyz")
        assert before.status_code == 503 and "no model is loaded" in before.json()["problems"]
        shutil.copytree(tiny_gan, root / "late")
        assert (await client.post("/v1/models/late/load")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        unloaded = await client.delete("/v1/models/late")
        assert unloaded.json()["status"] == "unloaded"
        assert (await client.post("/v1/models/late/generate", json={"n": 1})).status_code == 409


async def test_api_keys(models_dir: Path) -> None:
    key = "k" * 20
    async with serve(models_dir, api_keys=[key]) as client:
        missing = await client.get("/v1/models")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code == 403
        assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code == 200
        assert (await client.get("/healthz")).status_code == 200  # probes stay open


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_vae_routes(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        images, _ = _npz(await client.post("/v1/models/digits-vae/generate",
                                           json={"n": 3, "seed": 2, "label": 5, "format": "npz"}))
        files = [("files", (f"{i}.png", _png(image), "image/png")) for i, image in enumerate(images)]
        recon, labels = _npz(await client.post("/v1/models/digits-vae/reconstruct", files=files,
                                               data={"format": "npz", "labels": "5"}))
        assert recon.shape == (3, 8, 8) and labels.tolist() == [5, 5, 5]
        inferred = await client.post("/v1/models/digits-vae/reconstruct", files=files, data={"format": "json"})
        assert len(inferred.json()["samples"]) == 3
        path, _ = _npz(await client.post("/v1/models/digits-vae/interpolate",
                                         json={"seed_a": 0, "seed_b": 1, "label_a": 3, "label_b": 8, "steps": 5,
                                               "format": "npz"}))
        assert path.shape == (5, 8, 8)
        mask = np.zeros((8, 8), np.uint8)
        mask[:, 4:] = 255
        filled, _ = _npz(await client.post("/v1/models/digits-vae/inpaint", data={"format": "npz", "label": "5"},
                                           files={"image": ("x.png", _png(images[0]), "image/png"),
                                                  "mask": ("m.png", _png(mask), "image/png")}))
        assert np.array_equal(filled[0][:, :4], images[0][:, :4])  # known pixels are kept
        gan = await client.post("/v1/models/digits-gan/interpolate", json={"steps": 3})
        assert gan.status_code == 409 and "need a VAE" in gan.json()["detail"]
        big = await client.post("/v1/models/digits-vae/reconstruct",
                                files=[("files", ("big.png", _png(np.zeros((9, 9), np.uint8)), "image/png"))])
        assert big.status_code == 422 and "convert=true" in big.json()["detail"]
        junk = await client.post("/v1/models/digits-vae/reconstruct",
                                 files=[("files", ("a.png", b"nope", "image/png"))])
        assert junk.status_code == 422 and "not a readable" in junk.json()["detail"]


async def test_openapi_documents_every_route(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        schema = (await client.get("/openapi.json")).json()
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                assert operation.get("summary") and operation.get("description"), (method, path)
        generate = schema["paths"]["/v1/models/{name}/generate"]["post"]
        assert "image/png" in generate["responses"]["200"]["content"]
        docs = await client.get("/docs")
        assert docs.status_code == 200 and "cdn" not in docs.text  # Swagger UI is served locally (no internet needed)
        assert (await client.get("/static/swagger-ui/swagger-ui-bundle.js")).status_code == 200


async def test_failing_forward_pass_fails_only_its_batch(models_dir: Path) -> None:
    async with serve(models_dir, max_batch_wait_ms=0) as client:
        batcher = client.app.state.repository.entries["digits-gan"].batcher  # type: ignore[attr-defined]
        healthy = batcher._run_batch

        def flaky(z, labels, truncation):
            if (labels == 3).any():
                raise RuntimeError("injected fault")
            return healthy(z, labels, truncation)

        batcher._run_batch = flaky
        failed = await client.post("/v1/models/digits-gan/generate", json={"n": 2, "label": 3})
        assert failed.status_code == 500 and "injected fault" in failed.json()["detail"]
        assert (await client.post("/v1/models/digits-gan/generate", json={"n": 2, "label": 2})).status_code == 200
        assert batcher.running and batcher.queued_samples == 0


async def test_failed_reload_keeps_serving_the_old_version(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        (models_dir / "digits-vae" / "decoder.safetensors").write_bytes(b"truncated")
        reload = await client.post("/v1/models/digits-vae/load")
        assert reload.status_code == 409 and "still serving" in reload.json()["detail"]
        assert (await client.post("/v1/models/digits-vae/generate", json={"n": 2})).status_code == 200

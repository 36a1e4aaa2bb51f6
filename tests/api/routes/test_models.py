"""The model repository over HTTP: list, describe, load, reload and unload."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import serve
from tests.helpers import hang_up_mid_generation

pytestmark = pytest.mark.anyio


async def test_unknown_and_invalid_model_names(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        missing = await client.post("/v1/models/nope/generate", json={"n": 1})
        assert missing.status_code == 404 and "GET /v1/models" in missing.json()["detail"]
        bad = await client.get("/v1/models/..%2F..%2Fetc")
        assert bad.status_code == 404  # no route: the name never reaches disk
        assert bad.json()["detail"].startswith("no such route; the routes are listed at /docs")
        dotted = await client.get("/v1/models/a..b")
        assert dotted.status_code == 422 and "invalid model name" in dotted.json()["detail"]
        spaced = await client.get("/v1/models/a%20b")  # what a name looks like, in words, not as a regex
        assert spaced.status_code == 422 and "1-64 letters, digits and '._-'" in spaced.json()["detail"]

async def test_versioned_models_newest_by_name_pinned_by_version(models_dir: Path) -> None:
    """Trained versions live in <data dir>/models/<name>/<N>/: listed once with their versions, `name` is the newest,
    `name@N` pins one, and a version written while the server runs is found and loaded."""
    trained = models_dir.parent / "data" / "models" / "shoes"
    for version in (1, 2):
        shutil.copytree(models_dir / "digits-gan", trained / str(version))
    async with serve(models_dir) as client:
        listing = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert list(listing) == ["digits-gan", "digits-vae", "shoes"]
        assert (listing["shoes"]["version"], listing["shoes"]["versions"]) == (2, [1, 2])
        assert listing["digits-gan"]["version"] is None and listing["digits-gan"]["versions"] == []
        pinned = (await client.get("/v1/models/shoes@1")).json()
        assert (pinned["name"], pinned["version"], pinned["status"]) == ("shoes", 1, "ready")
        for ref in ("shoes", "shoes@1", "shoes@2"):
            answer = await client.post(f"/v1/models/{ref}/generate", json={"n": 2, "seed": 3, "format": "npz"})
            assert answer.status_code == 200, answer.text
        assert (await client.post("/v1/models/shoes@3/generate", json={"n": 1})).status_code == 404
        assert (await client.post("/v1/models/shoes@0/generate", json={"n": 1})).status_code == 422
        shutil.copytree(models_dir / "digits-gan", trained / "3")
        await client.app.state.repository.load_new_versions()  # what every server does every 10 s
        newest = (await client.get("/v1/models/shoes")).json()
        assert (newest["version"], newest["versions"], newest["status"]) == (3, [1, 2, 3], "ready")


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

async def test_failed_reload_keeps_serving_the_old_version(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        (models_dir / "digits-vae" / "decoder.safetensors").write_bytes(b"truncated")
        reload = await client.post("/v1/models/digits-vae/load")
        assert reload.status_code == 409 and "still serving" in reload.json()["detail"]
        assert (await client.post("/v1/models/digits-vae/generate", json={"n": 2})).status_code == 200


async def test_card_as_json_and_as_a_self_contained_html_report(tmp_path) -> None:
    import json

    from tests.conftest import copy_shipped

    models = copy_shipped(tmp_path, "mnist-cvae")
    card_path = models / "mnist-cvae" / "card.json"
    card = json.loads(card_path.read_text())
    card["training"]["note"] = "<script>alert(1)</script>"  # anything in a card is shown as text
    card["per_class"] = {"7": {"tstr_recall": 0.9, "label_agreement": 0.95, "frechet_distance": 3.2}}
    card["sampling"] = {"latent_scale": 1.75, "validation_tstr": {"1.75": {"mean": 0.9731}, "2.5": {"mean": 0.9802},
                                                                  "2.5 filtered": {"mean": 0.9811}},
                        "label_agreement": {"1.75": 0.9612, "2.5": 0.9013, "2.5 filtered": 0.9702},
                        "label_agreement_floor": 0.9311, "min_label_agreement": 0.95, "real_val_accuracy": 0.98,
                        "label_filter": {"min_confidence": 0.5}}
    card_path.write_text(json.dumps(card))
    async with serve(models) as client:
        as_json = await client.get("/v1/models/mnist-cvae/card")
        page = await client.get("/v1/models/mnist-cvae/card", params={"format": "html"})
        missing = await client.get("/v1/models/nope/card")
    assert as_json.status_code == 200 and as_json.json() == card
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert text.count('src="data:image/png;base64,') >= 1 and "Per class" in text and "src=\"http" not in text
    assert "latent scale chosen on the validation split" in text and "0.9731" in text
    assert "<td>0.9802</td><td>0.9013</td>" in text and "label agreement is under 0.9311" in text
    assert "<td>2.5 filtered</td><td>0.9811</td>" in text and "label at least 0.5" in text
    assert missing.status_code == 404


def test_card_rows_stay_within_the_sample_limit() -> None:
    from app.engine.cards import MAX_ROWS, card_rows

    assert card_rows(10, 10_000) == (10, 8)
    assert card_rows(10, 16) == (10, 1)  # fewer per class
    assert card_rows(40, 16) == (16, 1)  # only the first classes
    assert card_rows(6000, 10_000) == (MAX_ROWS, 1)  # not 48,000 samples, nor a 6000-row grid


async def test_html_card_is_bounded_and_made_once_per_version(models_dir: Path) -> None:
    async with serve(models_dir, max_samples_per_request=16) as client:
        repository = client.app.state.repository  # type: ignore[attr-defined]
        classes = len((await client.get("/v1/models/digits-gan")).json()["class_names"])
        first = await client.get("/v1/models/digits-gan/card", params={"format": "html"})
        again = await client.get("/v1/models/digits-gan/card", params={"format": "html"})
        assert first.status_code == again.status_code == 200 and first.text == again.text
        assert repository.entries["digits-gan"].batcher.stats.samples == classes == 10  # 1 a class, made once
        assert "all 10 classes, 1 each: a card shows at most 100 classes and 16 samples" in first.text
        assert (await client.post("/v1/models/digits-gan/load")).status_code == 200  # a new version: a new grid
        assert (await client.get("/v1/models/digits-gan/card", params={"format": "html"})).status_code == 200
        assert repository.entries["digits-gan"].batcher.stats.samples == 10


async def test_html_card_stops_when_its_client_goes_away(models_dir: Path) -> None:
    async with serve(models_dir, max_batch_size=8) as client:
        app = client.app  # type: ignore[attr-defined]
        batcher = app.state.repository.entries["digits-gan"].batcher
        run_batch = batcher._run_batch

        def slow(*args):  # type: ignore[no-untyped-def]
            time.sleep(0.05)
            return run_batch(*args)

        batcher._run_batch = slow
        messages = await hang_up_mid_generation(app, batcher, "GET", "/v1/models/digits-gan/card", b"format=html")
        assert messages[0]["status"] == 499
        await asyncio.sleep(0.2)
        assert batcher.stats.samples < 80 and batcher.queued_samples == 0  # the grid's 10 × 8 samples stopped
        batcher._run_batch = run_batch
        assert (await client.get("/v1/models/digits-gan/card", params={"format": "html"})).status_code == 200


async def test_html_pages_send_a_content_security_policy(models_dir: Path) -> None:
    import base64
    import hashlib
    import re

    async with serve(models_dir) as client:
        card = await client.get("/v1/models/digits-gan/card", params={"format": "html"})
        gallery = await client.get("/")
    for page in (card, gallery):
        assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert card.headers["content-security-policy"].startswith("default-src 'none'; img-src data:;")
    # the same policy inside the page, for the gallery's copy opened from a blob: URL
    assert '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:;' in card.text
    assert set(re.findall(r'<img[^>]* src="([a-z]+):', card.text)) == {"data"}  # what img-src data: allows
    scripts = re.findall(r"<script>(.*?)</script>", gallery.text, flags=re.S)
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert len(scripts) == 1 and f"script-src 'sha256-{digest}';" in gallery.headers["content-security-policy"]

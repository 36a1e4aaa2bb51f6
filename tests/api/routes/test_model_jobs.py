"""Training jobs over the API on real Fashion-MNIST images: upload, progress, a versioned model that is loaded and
generates, its card, quality gates, refusals, and a worker killed mid-training resuming to the same weights."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from app.ml.datasets import load_dataset
from tests.conftest import ROOT, launch_server, serve, stop_server
from tests.helpers import png_bytes, png_metadata_bomb, zip_bytes, zip_with_unnamed_member

FASHION = ROOT.parent / "shared" / "datasets" / "fashion-mnist" / "train-images-idx3-ubyte.gz"
NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
PER_CLASS = 50


def _fashion_zip(first: int, per_class: int) -> bytes:
    """Real Fashion-MNIST training images of every class (the `first`-th to the next `per_class` of each) as an
    ImageFolder zip."""
    if not FASHION.exists():
        pytest.skip(f"the Fashion-MNIST images are not at {FASHION} (../shared/datasets)")
    data = load_dataset(str(FASHION))
    members = {}
    for label, name in enumerate(NAMES):
        for i in np.flatnonzero(data.labels == label)[first : first + per_class]:
            members[f"fashion/{name}/{i:05d}.png"] = png_bytes(data.images[i, :, :, 0])
    return zip_bytes(members)


@pytest.fixture(scope="module")
def fashion_zip() -> bytes:
    """50 real Fashion-MNIST training images of every class (500 images)."""
    return _fashion_zip(0, PER_CLASS)


async def _submit(client: httpx.AsyncClient, archive: bytes | None, val_archive: bytes | None = None,
                  **fields: object) -> httpx.Response:
    files = {key: (f"{key}.zip", data, "application/zip") for key, data in (("dataset", archive),
                                                                           ("val_dataset", val_archive))
             if data is not None}
    return await client.post("/v1/trainings", files=files or None, data={k: str(v) for k, v in fields.items()})


async def _wait(client: httpx.AsyncClient, training_id: str, timeout_s: float = 480.0) -> tuple[dict, list[dict]]:
    """Poll until the training finished; returns it and every state seen while it ran."""
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        training = (await client.get(f"/v1/trainings/{training_id}")).json()
        seen.append(training)
        if training["state"] in ("succeeded", "failed"):
            return training, seen
        await asyncio.sleep(0.2)
    raise AssertionError(f"training {training_id} still {training['state']} after {timeout_s} s: {training}")


@pytest.mark.anyio
async def test_train_a_gan_on_500_images_through_the_api(tmp_path: Path, models_dir: Path, fashion_zip: bytes) -> None:
    async with serve(models_dir, max_trainings_per_key=2) as client:
        answer = await _submit(client, fashion_zip, name="fashion-small", arch="gan", epochs=4, eval_per_class=100)
        assert answer.status_code == 202, answer.text
        submitted = answer.json()
        assert answer.headers["location"] == f"/v1/trainings/{submitted['id']}"
        assert submitted["dataset"]["per_class"] == dict.fromkeys(sorted(NAMES), PER_CLASS)
        recipe = submitted["recipes"]["gan"]
        assert recipe["val_fraction"] == 0.2 and recipe["batch_size"] == 32  # the small-data recipe
        assert recipe["hyperparameters"]["diff_augment"] == "translation,cutout"
        assert any("validation split holds 100 images" in w for w in submitted["warnings"])

        training, seen = await _wait(client, submitted["id"])
        assert training["state"] == "succeeded", training
        running = [t for t in seen if t["state"] == "running" and t["stage"] == "training"]
        assert any(t["epoch"] >= 1 and t["losses"] and t["eta_s"] is not None for t in running), seen
        assert training["model"] == "fashion-small@1" and training["chosen"] == "gan"
        assert training["epochs_done"] == training["epochs_total"] == 4

        model = (await client.get("/v1/models/fashion-small")).json()
        assert (model["name"], model["version"], model["versions"], model["status"]) == ("fashion-small", 1, [1],
                                                                                          "ready")
        assert model["class_names"] == sorted(NAMES)
        for ref in ("fashion-small", "fashion-small@1"):
            generated = await client.post(f"/v1/models/{ref}/generate", json={"n": 4, "label": "sandal", "seed": 1})
            assert generated.status_code == 200, generated.text
            assert len(generated.json()["samples"]) == 4

        card = (await client.get(f"/v1/trainings/{training['id']}/card")).json()
        metrics = card["metrics"]
        assert 0.1 < metrics["tstr_accuracy"] <= 1 and 0.1 < metrics["real_accuracy"] <= 1
        assert card["evaluation"]["n_real_val"] == 100  # TSTR judged on real images the model never trained on
        assert (await client.get("/v1/models/fashion-small/card")).json()["metrics"] == metrics
        detail = (await client.get("/v1/models/fashion-small")).text
        assert str(tmp_path) not in json.dumps(card) + detail  # no server path in answers
        assert card["evaluation"]["data"] == f"datasets/open/{training['dataset_id']}.npz"
        grid = await client.get(f"/v1/trainings/{training['id']}/samples.png")
        assert grid.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(grid.content)).height >= 10 * 28  # a row per class
        promoted = tmp_path / "data" / "models" / "fashion-small" / "1"
        assert [p.name for p in (promoted / "samples").iterdir()] == ["epoch_004.png"]  # the last grid only
        assert not (promoted / "training_state.safetensors").exists()
        events = list((tmp_path / "data" / training["tensorboard_logdir"]).rglob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0

        # the same images again, by id, validated on 20 other images of each class, tuned, and with a gate it cannot
        # pass: all 500 images train, the scale and the card are judged on the 200, the model is reported, not promoted
        answer = await _submit(client, None, _fashion_zip(PER_CLASS, 20), dataset_id=training["dataset_id"],
                               name="fashion-small", arch="gan", epochs=1, eval_per_class=20, min_tstr=0.999,
                               tune="true")
        assert answer.status_code == 202, answer.text
        assert answer.json()["val_dataset"]["per_class"] == dict.fromkeys(sorted(NAMES), 20)
        assert answer.json()["recipes"]["gan"]["val_fraction"] is None
        gated, gated_seen = await _wait(client, answer.json()["id"])
        assert gated["state"] == "failed" and gated["model"] is None
        assert "tuning" in {t["stage"] for t in gated_seen}
        assert "min_tstr 0.999" in gated["error"] and gated["gate_failures"]
        gated_card = (await client.get(f"/v1/trainings/{gated['id']}/card")).json()
        assert str(tmp_path) not in json.dumps(gated_card)
        assert (gated_card["evaluation"]["n_real_train"], gated_card["evaluation"]["n_real_val"]) == (500, 200)
        sampling = gated_card["sampling"]
        assert sampling["n_val"] == 200 and sampling["per_class"] == 20 and len(sampling["label_agreement"]) == 6
        assert gated_card["evaluation"]["latent_scale"] == sampling["latent_scale"]  # the card is at the tuned scale
        assert (await client.get("/v1/models/fashion-small")).json()["versions"] == [1]
        listed = (await client.get("/v1/trainings")).json()["trainings"]
        assert [t["id"] for t in listed] == [gated["id"], training["id"]]
        assert (await client.get("/v1/jobs")).json()["jobs"] == []  # trainings are not dataset jobs


def _grey(size: int = 8) -> bytes:
    return png_bytes(np.full((size, size), 100, np.uint8))


def _red() -> np.ndarray:
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    return red


def _folder(per_class: int = 10, **odd: bytes) -> bytes:
    members = {f"{c}/{i}.png": _grey() for c in ("a", "b") for i in range(per_class)}
    return zip_bytes({**members, **odd})


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("archive", "fields", "status", "message"),
    [
        (_folder(**{"a/odd.png": _grey(9)}), {}, 422, "a/odd.png: 9×9 pixels, but 20 of 21 images are 8×8"),
        (_folder(**{"b/red.png": png_bytes(_red())}), {}, 422, "b/red.png: colour, but 20 of 21 images are greyscale"),
        (_folder(per_class=3), {}, 422, "class 'a' has 3 image(s), fewer than the 10"),
        (_folder(**{"a/broken.png": b"not a png"}), {}, 422, "a/broken.png: not a readable PNG/JPEG"),
        (zip_with_unnamed_member({f"{c}/{i}.png": _grey() for c in "ab" for i in range(10)}), {}, 422,
         "upload: a member has an empty name"),
        (_folder(**{"a/bomb.png": png_metadata_bomb()}), {}, 422, "a/bomb.png: a text or colour-profile"),
        (_folder(**{"a/big.png": _grey(200)}), {}, 422, "a/big.png: 200×200 pixels is over the limit of 16384 pixels "
         "(SYNTHGEN_MAX_TRAINING_PIXELS)"),
        (_folder(), {"hyperparameters": '{"colour": 1}'}, 422, "unknown gan hyper-parameter(s) ['colour']"),
        (_folder(), {"hyperparameters": '{"latent_scale": 2}'}, 422, "unknown gan hyper-parameter(s) ['latent_scale']"),
        (_folder(), {"hyperparameters": '{"g_channels": 1024}'}, 422, "over the 5,000,000 a model may have"),
        (_folder(), {"hyperparameters": '{"diff_augment": 5}'}, 422, "diff_augment must be str, not 5"),
        (_folder(), {"hyperparameters": '{"latent_dim": -1}'}, 422, "latent_dim = -1 is out of range"),
        (_folder(), {"hyperparameters": '{"g_channels": 0}'}, 422, "g_channels must be at least 1, not 0"),
        (_folder(), {"hyperparameters": '{"latent_dim": 0}'}, 422, "latent_dim must be at least 1, not 0"),
        (_folder(), {"arch": "auto", "hyperparameters": '{"gan": {"g_channels": 8}, "vae": {"colour": 1}}'}, 422,
         "unknown vae hyper-parameter(s) ['colour']"),
        (_folder(), {"epochs": 5000}, 422, "over the limit of 1000"),
        (_folder(), {"name": "digits-gan"}, 409, "a model of the repository"),
        (_folder(), {"dataset_id": "0" * 32}, 422, "either a `dataset` zip or the `dataset_id`"),
        (None, {"dataset_id": "0" * 32}, 404, "no dataset 0000"),
        (b"not a zip", {}, 422, "not a readable zip"),
        (_folder(), {"callback_url": "http://127.0.0.1:9/hook"}, 422, "127.0.0.1"),
        (_folder(), {"callback_url": "http://[::1/hook"}, 422, "not a well-formed URL"),
        (_folder(), {"callback_url": "https://example.com/" + "x" * 2048}, 422, "at most 2048 characters"),
        (_folder(), {"name": "a..b"}, 422, "invalid model name 'a..b'"),
    ],
)
async def test_bad_uploads_are_refused_naming_the_file_and_the_fix(models_dir: Path, archive: bytes | None,
                                                                    fields: dict, status: int, message: str) -> None:
    async with serve(models_dir) as client:
        answer = await _submit(client, archive, **{"name": "mine", "arch": "gan", **fields})
        assert answer.status_code == status, answer.text
        assert message in answer.json()["detail"]


def _other_grey(classes: str = "ab", size: int = 8) -> bytes:
    """Validation images: 10 a class, other pixels than `_folder`'s."""
    return zip_bytes({f"{c}/{i}.png": png_bytes(np.full((size, size), 50, np.uint8)) for c in classes
                      for i in range(10)})


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("val_archive", "fields", "status", "message"),
    [
        (_other_grey("ac"), {}, 422, "the validation set's classes ['a', 'c'] are not the dataset's ['a', 'b']"),
        (_other_grey(size=9), {}, 422, "the validation images are 9x9x1, the dataset's 8x8x1"),
        (_folder(), {}, 422, "20 of the 20 validation images are also in the dataset"),
        (_other_grey(), {"val_fraction": 0.2}, 422, "val_fraction splits the dataset, but a validation set was given"),
        (_other_grey(), {"val_dataset_id": "0" * 32}, 422, "either a `val_dataset` zip or the `val_dataset_id`"),
        (_folder(**{"a/broken.png": b"not a png"}), {}, 422, "val_dataset:a/broken.png: not a readable PNG/JPEG"),
        (b"not a zip", {}, 422, "val_dataset: not a readable zip"),
        (None, {"val_dataset_id": "0" * 32}, 404, "no dataset 0000"),
    ],
)
async def test_a_validation_set_must_fit_the_dataset(models_dir: Path, val_archive: bytes | None, fields: dict,
                                                     status: int, message: str) -> None:
    async with serve(models_dir, run_jobs=False) as client:
        answer = await _submit(client, _folder(), val_archive, **{"name": "mine", "arch": "gan", **fields})
        assert answer.status_code == status, answer.text
        assert message in answer.json()["detail"]


@pytest.mark.anyio
async def test_a_validation_set_that_fits_is_kept_and_reused_by_id(models_dir: Path) -> None:
    async with serve(models_dir, run_jobs=False, max_trainings_per_key=2) as client:
        accepted = await _submit(client, _folder(), _other_grey(), name="mine", arch="gan")
        assert accepted.status_code == 202, accepted.text
        training = accepted.json()
        assert training["val_dataset"] == {"images": 20, "per_class": {"a": 10, "b": 10}}
        assert "20 training images and the 20 validation set images" in training["recipes"]["gan"]["notes"][0]
        again = await _submit(client, None, name="mine", arch="gan", dataset_id=training["dataset_id"],
                              val_dataset_id=training["val_dataset_id"])
        assert again.status_code == 202, again.text
        assert (again.json()["val_dataset_id"], again.json()["val_dataset"]) == (training["val_dataset_id"],
                                                                                training["val_dataset"])


def _stored(data: Path) -> list[str]:
    return sorted(path.name for path in (data / "datasets").rglob("*") if path.is_file())


@pytest.mark.anyio
async def test_only_an_accepted_training_keeps_its_datasets_until_it_is_deleted(models_dir: Path, tmp_path: Path
                                                                                 ) -> None:
    data = tmp_path / "data"
    async with serve(models_dir, run_jobs=False, data_dir=data) as client:
        bad = await _submit(client, _folder(), name="mine", arch="gan", hyperparameters='{"latent_dim": 0}')
        assert bad.status_code == 422 and _stored(data) == []
        accepted = await _submit(client, _folder(), _other_grey(), name="mine", arch="gan")
        assert accepted.status_code == 202, accepted.text
        training = accepted.json()
        assert _stored(data) == sorted(f"{training[key]}.npz" for key in ("dataset_id", "val_dataset_id"))
        busy = await _submit(client, _folder(11), name="mine", arch="gan")  # one training per key at a time
        assert busy.status_code == 429 and len(_stored(data)) == 2
        assert (await client.delete(f"/v1/trainings/{training['id']}")).status_code == 204
        assert _stored(data) == []
    async with serve(models_dir, run_jobs=False, data_dir=data, datasets_quota_bytes_per_key=3000) as client:
        over = await _submit(client, _folder(), _other_grey(), name="mine", arch="gan")  # 1,440 bytes each, decoded
        assert over.status_code == 507, over.text
        assert "SYNTHGEN_DATASETS_QUOTA_BYTES_PER_KEY" in over.json()["detail"]
        assert _stored(data) == []  # the dataset stored before the validation set was refused is taken back


@pytest.mark.anyio
async def test_the_decoded_size_of_an_upload_is_bounded(models_dir: Path) -> None:
    async with serve(models_dir, run_jobs=False, max_training_decoded_bytes=1024) as client:
        answer = await _submit(client, _folder(), name="mine", arch="gan")  # 20 images of 8 × 8 grey: 1280 bytes
    assert answer.status_code == 422, answer.text
    assert "more than the limit of 1024 bytes" in answer.json()["detail"]
    assert "SYNTHGEN_MAX_TRAINING_DECODED_BYTES" in answer.json()["detail"]


@pytest.mark.anyio
async def test_convert_normalises_and_trainings_are_bounded_per_key(models_dir: Path) -> None:
    keys = {"api_keys": ["user-key-0123456789", "other-key-0123456789"]}
    alice, bob = ({"Authorization": f"Bearer {k}"} for k in keys["api_keys"])
    async with serve(models_dir, run_jobs=False, **keys) as client:
        mixed = _folder(**{"a/odd.png": _grey(9)})
        answer = await client.post("/v1/trainings", headers=alice, files={"dataset": ("d.zip", mixed)},
                                   data={"name": "mine", "convert": "true"})
        assert answer.status_code == 202, answer.text
        training = answer.json()
        assert training["dataset"]["height"] == 8 and "1 image(s) resized to 8×8" in training["warnings"]
        assert set(training["recipes"]) == {"gan", "vae"}  # auto: both, the better one kept
        again = await client.post("/v1/trainings", headers=alice, files={"dataset": ("d.zip", mixed)},
                                  data={"name": "mine", "convert": "true"})
        assert again.status_code == 429 and "SYNTHGEN_MAX_TRAININGS_PER_KEY" in again.json()["detail"]
        assert (await client.get(f"/v1/trainings/{training['id']}", headers=bob)).status_code == 404
        assert (await client.get(f"/v1/jobs/{training['id']}", headers=alice)).status_code == 404  # not a dataset job
        reuse = await client.post("/v1/trainings", headers=bob,
                                  data={"name": "b", "dataset_id": training["dataset_id"]})
        assert reuse.status_code == 404  # another key's upload is not there for bob
        assert (await client.delete(f"/v1/trainings/{training['id']}", headers=alice)).status_code == 204
        assert (await client.get(f"/v1/trainings/{training['id']}", headers=alice)).status_code == 404


def _weights(folder: Path) -> dict:
    return {f"{part}.{key}": value for part in ("generator", "discriminator")
            for key, value in load_file(folder / f"{part}.safetensors").items()}


def test_a_killed_worker_resumes_to_the_same_weights(tmp_path: Path, models_dir: Path, fashion_zip: bytes) -> None:
    """SIGKILL the server mid-training; its training child stops with it; a new server resumes from the last epoch
    and ends with the weights of an uninterrupted run."""
    data = tmp_path / "data"
    quiet = {"SYNTHGEN_LOG_LEVEL": "warning"}  # nobody reads the server's output pipe while the test polls
    process, url = launch_server(models_dir, data, quiet)
    try:
        answer = httpx.post(f"{url}/v1/trainings", files={"dataset": ("f.zip", fashion_zip)},
                            data={"name": "resumed", "arch": "gan", "epochs": "5", "eval_per_class": "20"}, timeout=60)
        assert answer.status_code == 202, answer.text
        training = answer.json()
        deadline = time.monotonic() + 120
        while (progress := httpx.get(f"{url}/v1/trainings/{training['id']}").json())["epochs_done"] < 2:
            assert progress["state"] in ("queued", "running") and time.monotonic() < deadline, progress
            time.sleep(0.25)
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        assert children, "the training runs in a child process"
        process.send_signal(signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in children):
            assert time.monotonic() < deadline, "the training child outlived its worker"
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            process.kill()
    work = data / "trainings" / training["id"] / "gan"
    assert (work / "training_state.safetensors").exists()
    process, url = launch_server(models_dir, data, quiet)
    try:
        deadline = time.monotonic() + 360  # a hang guard: slow 2-core machines evaluate for minutes
        while (done := httpx.get(f"{url}/v1/trainings/{training['id']}").json())["state"] not in ("succeeded",
                                                                                                    "failed"):
            assert time.monotonic() < deadline, done
            time.sleep(0.2)
        assert done["state"] == "succeeded", done
    finally:
        stop_server(process)
    log = (data / "trainings" / training["id"] / "gan-train.log").read_text()
    recipe = training["recipes"]["gan"]
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "app", "train", "--arch", "gan", "--data",
                    str(next((data / "datasets").rglob("*.npz"))), "--out", str(reference), "--epochs", "5",
                    "--seed", "0", "--batch-size", str(recipe["batch_size"]), "--val-fraction",
                    str(recipe["val_fraction"]), "--lr", str(recipe["lr"]), "--hparams",
                    json.dumps(recipe["hyperparameters"]), "--quiet", "--threads", "1", "--device", "cpu"],
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    promoted = data / "models" / "resumed" / "1"
    ours, theirs = _weights(promoted), _weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(bool((ours[k] == theirs[k]).all()) for k in ours), log

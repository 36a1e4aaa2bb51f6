"""`POST /v1/augment`: exact counts with correct labels, and every hostile upload gets a 4xx."""

from __future__ import annotations

import csv
import io
import json
import stat
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.core.nets import Classifier
from app.engine.batcher import MicroBatcher
from app.engine.repository import ServedModel
from app.ml.datasets import load_dataset
from app.ml.evaluation import predict
from tests.conftest import MNIST, copy_shipped, serve
from tests.helpers import png_bytes, png_metadata_bomb, zip_bytes, zip_with_unnamed_member

pytestmark = pytest.mark.anyio


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    return copy_shipped(tmp_path, "mnist-cgan")


def _small_mnist_upload(per_class: int) -> bytes:
    digits = load_dataset(f"{MNIST}#7000:8000")
    members = {}
    for label in range(10):
        for i, index in enumerate(np.flatnonzero(digits.labels == label)[:per_class]):
            members[f"upload/{label}/{i}.png"] = png_bytes(digits.images[index, ..., 0])
    return zip_bytes(members)


async def test_augment_fills_every_class_to_the_target(shipped: Path) -> None:
    async with serve(shipped) as client:
        response = await client.post("/v1/augment", files={"dataset": ("d.zip", _small_mnist_upload(50))},
                                     data={"model": "mnist-cgan", "target_per_class": "500", "copies_per_image": "2",
                                           "augmentations": json.dumps({"rotation": 10, "translate": 0.1}),
                                           "seed": "3"})
    assert response.status_code == 200, response.text
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    rows = list(csv.DictReader(io.StringIO(archive.read("labels.csv").decode())))
    manifest = json.loads(archive.read("manifest.json"))
    assert Counter(r["class_name"] for r in rows) == {str(c): 500 for c in range(10)}
    assert Counter(r["source"] for r in rows) == {"original": 500, "augmented": 1000, "synthetic": 3500}
    assert manifest["synthetic"] == {str(c): 350 for c in range(10)} and manifest["unknown_classes"] == []
    assert all(r["file_name"].startswith(f"{r['class_name']}/{r['source']}-") for r in rows)
    synthetic = [r for r in rows if r["source"] == "synthetic"]
    images = np.stack([np.asarray(Image.open(io.BytesIO(archive.read(r["file_name"])))) for r in synthetic])
    probs, _ = predict(Classifier.from_pretrained(shipped / "mnist-cgan")[0], images[..., None])
    agreement = (probs.argmax(1).numpy() == np.array([int(r["class_name"]) for r in synthetic])).mean()
    assert agreement > 0.95  # synthetic images carry the right labels


async def test_an_augmented_zip_is_the_same_bytes_however_many_threads_encode_it(shipped: Path) -> None:
    upload, answers = _small_mnist_upload(3), []
    for workers in (1, 3):  # 3: originals, copies and each pass of samples are encoded in three pieces at once
        async with serve(shipped, cpu_workers=workers) as client:
            answers.append(await client.post("/v1/augment", files={"dataset": ("d.zip", upload)},
                                             data={"model": "mnist-cgan", "target_per_class": "8",
                                                   "copies_per_image": "1", "seed": "4"}))
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    assert answers[0].content == answers[1].content
    assert len(zipfile.ZipFile(io.BytesIO(answers[0].content)).namelist()) > 10 * 8


async def test_augment_generates_the_next_samples_while_the_last_are_encoded(
        shipped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, int]] = []
    submit, encode = MicroBatcher.submit, ServedModel.encode_pngs

    async def logged_submit(self, z, *args, **kwargs):
        events.append(("generate", len(z)))
        return await submit(self, z, *args, **kwargs)

    async def logged_encode(self, images):
        pngs = await encode(self, images)
        events.append(("encoded", len(images)))
        return pngs

    monkeypatch.setattr(MicroBatcher, "submit", logged_submit)
    monkeypatch.setattr(ServedModel, "encode_pngs", logged_encode)
    async with serve(shipped, max_batch_size=16) as client:
        response = await client.post("/v1/augment", files={"dataset": ("d.zip", _small_mnist_upload(3))},
                                     data={"model": "mnist-cgan", "target_per_class": "8", "copies_per_image": "1"})
    assert response.status_code == 200, response.text
    # 30 originals, 30 copies, then 20 samples in passes of 16 and 4: each pass starts before the last one's PNGs
    assert events == [("generate", 16), ("encoded", 30), ("encoded", 30), ("generate", 4), ("encoded", 16),
                      ("encoded", 4)]


async def test_unknown_classes_are_reported_not_guessed(shipped: Path) -> None:
    blank = png_bytes(np.zeros((28, 28), np.uint8))
    upload = zip_bytes({"7/a.png": blank, "cat/b.png": blank})
    async with serve(shipped) as client:
        response = await client.post("/v1/augment", files={"dataset": ("d.zip", upload)},
                                     data={"model": "mnist-cgan", "target_per_class": "3"})
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(response.content)).read("manifest.json"))
    assert manifest["unknown_classes"] == ["cat"] and manifest["synthetic"] == {"7": 2}
    assert manifest["counts"] == {"7": 3, "cat": 1}


async def test_flat_upload_with_labels_csv(shipped: Path) -> None:
    blank = png_bytes(np.zeros((28, 28), np.uint8))
    upload = zip_bytes({"x.png": blank, "labels.csv": b"file_name,class_name\nx.png,4\n"})
    async with serve(shipped) as client:
        response = await client.post("/v1/augment", files={"dataset": ("d.zip", upload)},
                                     data={"model": "mnist-cgan", "copies_per_image": "1"})
    rows = list(csv.DictReader(io.StringIO(zipfile.ZipFile(io.BytesIO(response.content)).read("labels.csv").decode())))
    assert [(r["class_name"], r["source"]) for r in rows] == [("4", "original"), ("4", "augmented")]


async def test_bad_labels_csv_rows_get_422_naming_the_row(shipped: Path) -> None:
    blank = png_bytes(np.zeros((28, 28), np.uint8))
    async with serve(shipped) as client:
        for csv_text, message in ((b"class_name,file_name\n7\n", "labels.csv row 2: no file_name"),
                                  (b"file_name,class_name\nx.png\n", "labels.csv row 2: no class_name")):
            response = await client.post("/v1/augment", data={"model": "mnist-cgan"}, files={
                "dataset": ("d.zip", zip_bytes({"x.png": blank, "labels.csv": csv_text}))})
            assert response.status_code == 422 and message in response.json()["detail"], response.text


def _symlink_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo("3/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


PNG = png_bytes(np.zeros((28, 28), np.uint8))
HOSTILE = {
    "zip slip": (zip_bytes({"../../evil/3/x.png": PNG}), 422, "unsafe member name"),
    "absolute path": (zip_bytes({"/tmp/3/x.png": PNG}), 422, "unsafe member name"),
    "symlink": (_symlink_zip(), 422, "symbolic link"),
    "zip bomb": (zip_bytes({"3/bomb.png": b"\0" * 5_000_000}, zipfile.ZIP_DEFLATED), 422, "zip bombs are refused"),
    "zip bomb past the total": (zip_bytes({"3/bomb.png": b"\0" * 5_000_000}, zipfile.ZIP_DEFLATED), 422,
                                "more than the limit of 1000000"),
    "too many files": (zip_bytes({f"3/{i}.png": PNG for i in range(30)}), 422, "over the limit of 20"),
    "decompressed size": (zip_bytes({f"3/{i}.png": np.random.default_rng(i).bytes(400_000) for i in range(4)}), 422,
                          "more than the limit"),
    "huge image": (zip_bytes({"3/big.png": png_bytes(np.zeros((300, 300), np.uint8))}), 422, "over the limit of 10000"),
    "non-image": (zip_bytes({"3/notes.txt": b"hello"}), 422, "not an image"),
    "corrupt image": (zip_bytes({"3/x.png": b"\x89PNG\r\n\x1a\nbroken"}), 422, "not a readable PNG/JPEG"),
    "empty member name": (zip_with_unnamed_member({"3/x.png": PNG}), 422, "a member has an empty name"),
    "metadata bomb": (zip_bytes({"3/x.png": png_metadata_bomb()}), 422, "3/x.png: a text or colour-profile"),
    "nested zip": (zip_bytes({"3/inner.zip": zip_bytes({"3/x.png": PNG})}), 422, "nested archives"),
    "empty class": (zip_bytes({"3/x.png": PNG, "4/": b""}), 422, "hold no images"),
    "not a zip": (b"PK\x03\x04 this is not really a zip", 422, "not a readable zip"),
    "wrong size": (zip_bytes({"3/x.png": png_bytes(np.zeros((20, 20), np.uint8))}), 422, "convert=true"),
}


@pytest.mark.parametrize("case", HOSTILE)
async def test_hostile_uploads_get_4xx(shipped: Path, tmp_path: Path, case: str) -> None:
    upload, status, message = HOSTILE[case]
    total = 100_000_000 if case == "zip bomb" else 1_000_000  # the ratio check, or the total, stops it first
    async with serve(shipped, max_archive_files=20, max_decompressed_bytes=total, max_image_pixels=10_000) as c:
        response = await c.post("/v1/augment", files={"dataset": ("d.zip", upload)},
                                 data={"model": "mnist-cgan", "target_per_class": "5"})
        assert response.status_code == status, response.text
        assert message in response.json()["detail"]
        assert (await c.get("/readyz")).status_code == 200  # the server is fine afterwards
    assert not (tmp_path / "evil").exists() and not Path("/tmp/3").exists()


async def test_oversized_upload_gets_413(shipped: Path) -> None:
    async with serve(shipped, max_upload_bytes=10_000) as client:
        response = await client.post("/v1/augment", files={"dataset": ("d.zip", b"\0" * 20_000)},
                                     data={"model": "mnist-cgan"})
    assert response.status_code == 413 and "over the limit of 10000 bytes" in response.json()["detail"]


async def test_bad_augmentations_json(shipped: Path) -> None:
    async with serve(shipped) as client:
        response = await client.post("/v1/augment", files={"dataset": ("d.zip", zip_bytes({"3/x.png": PNG}))},
                                     data={"model": "mnist-cgan", "augmentations": '{"rotation": 400}'})
        assert response.status_code == 422 and "rotation" in response.json()["detail"]
        for text, message in (("{", "augmentations: Invalid JSON"), ("[]", "augmentations: Input should be")):
            response = await client.post("/v1/augment", files={"dataset": ("d.zip", zip_bytes({"3/x.png": PNG}))},
                                         data={"model": "mnist-cgan", "augmentations": text})
            assert response.status_code == 422 and response.json()["detail"].startswith(message), response.text
            assert "augmentations: augmentations" not in response.json()["detail"]

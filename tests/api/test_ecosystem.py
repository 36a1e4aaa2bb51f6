"""Exports read by the tools data people use, with no help from us: WebDataset (shards, DataLoader workers),
Hugging Face `datasets` (ImageFolder with named labels, Parquet) and byte-identical repeats."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import serve
from tests.helpers import wait_for_job

datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is a dev dependency (pip install -e .[dev])")
wds = pytest.importorskip("webdataset", reason="webdataset is a dev dependency (pip install -e .[dev])")
pytestmark = pytest.mark.anyio
DIGITS = [str(i) for i in range(10)]


async def test_a_tar_job_is_shards_that_webdataset_reads_with_several_workers(models_dir: Path, tmp_path: Path) -> None:
    async with serve(models_dir, data_dir=tmp_path / "data", max_batch_size=16) as client:
        submitted = await client.post("/v1/jobs", json={"model": "digits-gan", "per_class": 5, "seed": 4,
                                                        "format": "tar", "shard_size": 13})
        job = await wait_for_job(client, submitted.json()["id"])
        assert job["state"] == "succeeded" and job["result_url"] is None, job
        names = [file["name"] for file in job["files"]]
        assert names == [f"digits-gan-seed4-{i:06d}.tar" for i in range(4)] + ["manifest.json"]
        for file in job["files"]:
            response = await client.get(file["url"])
            assert response.status_code == 200 and len(response.content) == file["bytes"]
            assert response.headers["content-type"] == file["media_type"]
            (tmp_path / file["name"]).write_bytes(response.content)
        assert (await client.get(f"/v1/jobs/{job['id']}/result")).status_code == 409  # shards: use `files`
        assert (await client.get(f"/v1/jobs/{job['id']}/files/..%2Fjobs.sqlite3")).status_code == 404
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"] == names[:-1] and manifest["count"] == 50 and manifest["seed"] == 4
    urls = [str(tmp_path / name) for name in names[:-1]]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("png", "cls", "json")
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    seen = [(meta["index"], int(label), image.size) for image, label, meta in loader]
    assert sorted(index for index, _, _ in seen) == list(range(50))  # every sample once across the workers
    assert all(label == index // 5 and size == (8, 8) for index, label, size in seen)


async def test_the_imagefolder_export_loads_in_hugging_face_datasets_with_named_labels(models_dir: Path,
                                                                                       tmp_path: Path) -> None:
    async with serve(models_dir) as client:
        response = await client.post("/v1/models/digits-gan/datasets", json={"per_class": 3, "seed": 9})
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        archive.extractall(tmp_path / "export")
        assert archive.read("README.md").startswith(b"---\n")  # the dataset card's YAML
    for loaded in (datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "export"), split="train"),
                   datasets.load_dataset(str(tmp_path / "export"), split="train")):
        assert loaded.features["label"].names == DIGITS and len(loaded) == 30
        rows = sorted(loaded, key=lambda row: row["index"])
        assert [row["index"] for row in rows] == list(range(30)) and {row["seed"] for row in rows} == {9}
        assert all(loaded.features["label"].int2str(row["label"]) == row["class_name"] == str(i // 3)
                   for i, row in enumerate(rows))
        png = np.asarray(Image.open(tmp_path / "export" / "4" / "00000013.png"))
        assert np.array_equal(np.asarray(rows[13]["image"]), png)


async def test_the_parquet_export_decodes_in_datasets_and_pyarrow(models_dir: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    async with serve(models_dir, max_batch_size=8) as client:
        parquet = await client.post("/v1/models/digits-vae/datasets", json={"per_class": 2, "seed": 5,
                                                                           "format": "parquet"})
        zipped = await client.post("/v1/models/digits-vae/datasets", json={"per_class": 2, "seed": 5})
    assert parquet.status_code == 200 and parquet.headers["content-type"] == "application/vnd.apache.parquet"
    (tmp_path / "d.parquet").write_bytes(parquet.content)
    file = pq.ParquetFile(tmp_path / "d.parquet")
    assert file.num_row_groups == 3  # streamed a batch of 8 at a time
    assert json.loads(file.metadata.metadata[b"synthgen_manifest"])["seed"] == 5
    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "d.parquet"), split="train")
    assert loaded.features["label"].names == DIGITS and loaded["index"] == list(range(20))
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
        for row in loaded:
            png = archive.read(f"{row['class_name']}/{row['index']:08d}.png")
            assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(io.BytesIO(png))))


@pytest.mark.parametrize("output", ["zip", "tar", "parquet", "npz"])
async def test_the_same_request_gives_the_same_bytes(models_dir: Path, output: str) -> None:
    body = {"per_class": {"1": 3, "7": 4}, "seed": 11, "format": output}
    async with serve(models_dir, max_batch_size=4) as client:
        first = await client.post("/v1/models/digits-gan/datasets", json=body)
        second = await client.post("/v1/models/digits-gan/datasets", json=body)
    assert first.status_code == 200 and first.content == second.content

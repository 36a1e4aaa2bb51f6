"""Dataset exports: each format round-trips, counts are exact, bad requests get 4xx."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import tarfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from app.ml.datasets import load_dataset
from tests.conftest import serve

pytestmark = pytest.mark.anyio


async def test_zip_export_round_trips(models_dir: Path, tmp_path: Path) -> None:
    async with serve(models_dir, max_batch_size=16) as client:
        response = await client.post("/v1/models/digits-gan/datasets", json={"per_class": 7, "seed": 3})
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    assert response.headers["content-disposition"] == 'attachment; filename="digits-gan-seed3.zip"'
    (tmp_path / "d.zip").write_bytes(response.content)
    dataset = load_dataset(str(tmp_path / "d.zip"))
    assert len(dataset) == 70 and np.bincount(dataset.labels).tolist() == [7] * 10
    with zipfile.ZipFile(tmp_path / "d.zip") as archive:
        assert archive.testzip() is None
        rows = list(csv.DictReader(io.StringIO(archive.read("labels.csv").decode())))
        manifest = json.loads(archive.read("manifest.json"))
        names = set(archive.namelist())
    assert [int(r["index"]) for r in rows] == list(range(70)) and all(r["file_name"] in names for r in rows)
    assert all(r["file_name"].startswith(r["class_name"] + "/") and r["seed"] == "3" for r in rows)
    assert manifest["counts"] == {str(i): 7 for i in range(10)} and manifest["config_hash"].startswith("sha256:")
    assert "created_at" not in manifest and "training" in manifest["card"]  # the same request, the same bytes
    # the same samples as the offline CLI, bit for bit
    assert main(["generate", "--model", str(models_dir / "digits-gan"), "--per-class", "7", "--seed", "3",
                 "--out", str(tmp_path / "cli.zip"), "--device", "cpu"]) == 0
    with zipfile.ZipFile(tmp_path / "cli.zip") as cli, zipfile.ZipFile(tmp_path / "d.zip") as served:
        assert all(cli.read(r["file_name"]) == served.read(r["file_name"]) for r in rows)


@pytest.mark.parametrize("output", ["zip", "tar", "parquet"])
async def test_an_export_is_the_same_bytes_however_many_threads_or_processes_encode_it(
        models_dir: Path, output: str, tmp_path: Path) -> None:
    answers, encoders = [], []
    # 3 threads or 2 processes: each 8-sample chunk's PNGs are encoded in that many pieces at once
    for pool in ({"cpu_workers": 1}, {"cpu_workers": 3}, {"png_processes": 2}):
        async with serve(models_dir, max_batch_size=8, **pool) as client:
            answers.append(await client.post("/v1/models/digits-gan/datasets",
                                             json={"per_class": 3, "seed": 5, "format": output}))
            png = client.app.state.repository.png  # type: ignore[attr-defined]
            encoders.append(len(png._processes) if isinstance(png, ProcessPoolExecutor) else 0)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].content == answers[1].content == answers[2].content
    assert encoders == [0, 0, 2]  # the processes did the encoding
    async with serve(models_dir) as client:  # passes of the default size: a Parquet row group each
        default = await client.post("/v1/models/digits-gan/datasets", json={"per_class": 3, "seed": 5,
                                                                            "format": output})
    assert (default.content == answers[0].content) == (output != "parquet")
    out = tmp_path / f"cli.{output}"  # the offline command line writes the same file as a server of default settings
    assert main(["generate", "--model", str(models_dir / "digits-gan"), "--per-class", "3", "--seed", "5",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert out.read_bytes() == default.content


async def test_an_export_survives_a_png_process_that_died(models_dir: Path) -> None:
    request = {"per_class": 3, "seed": 5, "format": "zip"}
    async with serve(models_dir, max_batch_size=8, png_processes=2) as client:
        first = await client.post("/v1/models/digits-gan/datasets", json=request)
        png = client.app.state.repository.png  # type: ignore[attr-defined]
        os.kill(next(iter(png._processes)), signal.SIGKILL)
        await asyncio.sleep(0.5)
        second = await client.post("/v1/models/digits-gan/datasets", json=request)
        third = await client.post("/v1/models/digits-gan/datasets", json=request)
    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 200], second.text
    assert first.content == second.content == third.content  # encoded on the threads instead, the same bytes


async def test_tar_and_npz_exports(models_dir: Path) -> None:
    async with serve(models_dir, max_batch_size=8) as client:
        tar = await client.post("/v1/models/digits-vae/datasets",
                                json={"per_class": {"3": 5, "8": 2}, "seed": 1, "format": "tar"})
        npz = await client.post("/v1/models/digits-vae/datasets", json={"n": 12, "label": 4, "format": "npz"})
        again = await client.post("/v1/models/digits-vae/datasets",  # the random seed, returned, reproduces it
                                  json={"n": 12, "label": 4, "format": "npz", "seed": int(npz.headers["x-seed"])})
    assert tar.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        names = archive.getnames()
        classes = [archive.extractfile(f"{i:08d}.cls").read().decode() for i in range(7)]
        meta = json.loads(archive.extractfile("00000006.json").read())
    assert len(names) == 7 * 3 and classes == ["3"] * 5 + ["8"] * 2  # samples only: no manifest in the stream
    assert meta == {"class_name": "8", "index": 6, "label": 8, "model": "digits-vae", "seed": 1}
    with np.load(io.BytesIO(npz.content), allow_pickle=False) as arrays:
        assert arrays["images"].shape == (12, 8, 8) and arrays["labels"].tolist() == [4] * 12
    assert again.content == npz.content


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"per_class": 2, "n": 3}, "exactly one of"),
        ({}, "exactly one of"),
        ({"per_class": {"cat": 3}}, "unknown label 'cat'"),
        ({"per_class": {"3": 0}}, "would be empty"),
        ({"per_class": 0}, "per_class"),
        ({"n": 200, "format": "npz"}, "over the limit of 100 for one npz export"),
        ({"n": 2, "format": "rar"}, "format"),
    ],
)
async def test_bad_dataset_requests(models_dir: Path, body: dict, message: str) -> None:
    async with serve(models_dir, max_npz_samples=100) as client:
        response = await client.post("/v1/models/digits-gan/datasets", json=body)
    assert response.status_code == 422 and message in response.json()["detail"], response.text

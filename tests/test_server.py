"""One real server process: `synthgen serve` under uvicorn on 127.0.0.1 and a free port."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.cli import main
from app.client import Client, SynthgenClientError
from app.data import load_dataset
from tests.conftest import rss_mb


def test_real_server_generates(server: tuple[str, int]) -> None:
    server, _ = server
    response = httpx.post(f"{server}/v1/models/digits-gan/generate", json={"n": 4, "seed": 3, "format": "npz"},
                          headers={"X-Request-ID": "abc-123"}, timeout=30)
    assert response.status_code == 200 and response.headers["x-request-id"] == "abc-123"
    with np.load(io.BytesIO(response.content), allow_pickle=False) as archive:
        assert archive["images"].shape == (4, 8, 8)
    png = httpx.post(f"{server}/v1/models/digits-gan/generate", json={"n": 4, "format": "png"}, timeout=30)
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    metrics = httpx.get(f"{server}/metrics").text
    assert 'synthgen_requests_total{route="/v1/models/{name}/generate",status="200"} 2.0' in metrics
    assert 'synthgen_model_status{model="digits-gan",status="ready"} 1.0' in metrics


def test_streamed_export_keeps_server_memory_flat(server: tuple[str, int], tmp_path: Path) -> None:
    url, pid = server
    samples: list[tuple[int, float]] = []
    received = 0
    target = tmp_path / "big.zip"
    with httpx.stream("POST", f"{url}/v1/models/digits-gan/datasets", json={"per_class": 2000, "seed": 0},
                      timeout=120) as response, target.open("wb") as out:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            out.write(chunk)
            received += len(chunk)
            samples.append((received, rss_mb(pid)))
    with zipfile.ZipFile(target) as archive:
        names = archive.namelist()
    assert len(names) == 20_000 + 2
    warm = next(rss for size, rss in samples if size > received * 0.1)
    peak = max(rss for _, rss in samples)
    print(f"server RSS: {warm:.1f} MB after 10% of {received / 1e6:.1f} MB, peak {peak:.1f} MB")
    assert peak - warm < 25, (warm, peak)  # the archive is never held whole (it is about 3 MB per 10% here)


def test_python_client_and_dataset_cli(server: tuple[str, int], tmp_path: Path) -> None:
    url, _ = server
    with Client(url) as client:
        assert [m["name"] for m in client.models()] == ["digits-gan", "digits-vae"]
        images, labels = client.generate("digits-gan", n=5, label=2, seed=1)
        assert images.shape == (5, 8, 8) and labels.tolist() == [2] * 5
        path = client.download_dataset("digits-gan", tmp_path / "d.zip", per_class=20, seed=3, progress=False)
        assert len(load_dataset(str(path))) == 200
        # an interrupted download resumes: keep the first 1,000 bytes as a .part file and download again
        job = client.submit_job("digits-gan", per_class=20, seed=3)
        client.wait(job["id"], progress=False)
        whole = client.download(job["id"], tmp_path / "whole.zip", progress=False).read_bytes()
        (tmp_path / "r.zip.part").write_bytes(whole[:1000])
        assert client.download(job["id"], tmp_path / "r.zip", progress=False).read_bytes() == whole
        with pytest.raises(SynthgenClientError, match="unknown label"):
            client.generate("digits-gan", n=1, label="cat")
        upload = tmp_path / "upload.zip"
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(upload, "w") as small:
            for digit in ("3", "5"):
                for name in [n for n in source.namelist() if n.startswith(f"{digit}/")][:4]:
                    small.writestr(name, source.read(name))
        out = client.augment(upload, tmp_path / "augmented.zip", "digits-gan", target_per_class=10)
        assert load_dataset(str(out)).images.shape[0] == 20
    assert main(["dataset", "--server", url, "--model", "digits-vae", "--n", "7", "--seed", "2",
                 "--out", str(tmp_path / "v.npz")]) == 0
    with np.load(tmp_path / "v.npz") as arrays:
        assert arrays["images"].shape == (7, 8, 8)
    assert main(["dataset", "--server", url, "--model", "nope", "--n", "1", "--out", str(tmp_path / "x.zip")]) == 2

"""One real server process: `synthgen serve` under uvicorn on 127.0.0.1 and a free port."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import httpx
import numpy as np

from tests.conftest import launch_server, rss_mb, stop_server


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
    # a smaller export first: the first metadata.parquet loads pyarrow's Parquet code (55-65 MB, once per process)
    assert httpx.post(f"{url}/v1/models/digits-gan/datasets", json={"per_class": 500}, timeout=60).status_code == 200
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
    assert len(names) == 20_000 + 4  # labels.csv, metadata.parquet, README.md, manifest.json
    warm = next(rss for size, rss in samples if size > received * 0.1)
    peak = max(rss for _, rss in samples)
    print(f"server RSS: {warm:.1f} MB after 10% of {received / 1e6:.1f} MB, peak {peak:.1f} MB")
    # what grows is the bookkeeping of the archive's directory (zipfile keeps an entry of about 1 KB per member, and
    # labels.csv needs 17 bytes a sample); the 8×8 PNGs themselves are only 290 bytes a sample here. Encoding each
    # chunk on two threads adds a one-off ~8 MB (about 1,700 bytes a sample here against 1,250 on one thread; at
    # 60,000 samples 88 MB against 84: not per sample)
    assert (peak - warm) * 1e6 / 20_000 < 2000, (warm, peak)


def test_logs_are_one_json_object_per_line_and_one_line_per_request(tmp_path: Path, tiny_gan: Path) -> None:
    shutil.copytree(tiny_gan, tmp_path / "models" / "digits-gan")
    process, url = launch_server(tmp_path / "models", tmp_path / "data")
    try:
        httpx.post(f"{url}/v1/models/digits-gan/generate", json={"n": 3}, headers={"X-Request-ID": "req-1"})
        httpx.get(f"{url}/v1/models/no-such-model", headers={"X-Request-ID": "req-2"})
    finally:
        output = stop_server(process)
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]  # every line is a JSON object
    assert all({"time", "level", "logger"} <= line.keys() for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's own lines go the same way
    requests = {line["request_id"]: line for line in lines if line["logger"] == "synthgen.access"}
    assert sum(line["logger"] == "synthgen.access" for line in lines) == len(requests)  # once per request
    assert requests["req-1"] | {"latency_ms": 0} == {
        **requests["req-1"], "method": "POST", "route": "/v1/models/{name}/generate", "model": "digits-gan",
        "samples": 3, "status": 200, "latency_ms": 0}
    assert requests["req-2"]["status"] == 404 and requests["req-2"]["model"] == "no-such-model"

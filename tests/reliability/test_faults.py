"""Faults injected for real, overload, and security checks."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import time
from pathlib import Path

import pytest

from app.engine.results import LocalWriter
from tests.conftest import ROOT, rss_mb, serve

pytestmark = pytest.mark.anyio


async def test_dead_worker_is_reported_and_restarted(faulty_models_dir: Path) -> None:
    async with serve(faulty_models_dir) as client:
        killed = await client.post("/v1/models/faulty-gan/generate", json={"n": 3, "label": 4})  # the worker dies
        assert killed.status_code == 503 and "worker stopped" in killed.json()["detail"]  # its batch did not hang
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and "model faulty-gan: worker not running" in ready.json()["problems"]
        for _ in range(50):  # the supervisor restarts it within about a second
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.post("/v1/models/faulty-gan/generate", json={"n": 3, "label": 1})).status_code == 200


async def test_overload_answers_only_200_503_504_and_recovers(models_dir: Path) -> None:
    import os

    async with serve(models_dir, max_queued_samples=64, max_samples_per_request=64, max_batch_size=16,
                     request_timeout_s=5) as client:
        before = rss_mb(os.getpid())
        responses = await asyncio.gather(*(client.post("/v1/models/digits-gan/generate", json={"n": 4, "seed": i})
                                           for i in range(2000)))
        statuses = {r.status_code for r in responses}
        assert statuses <= {200, 503, 504}, statuses
        assert 200 in statuses and 503 in statuses
        assert all(r.headers.get("retry-after") for r in responses if r.status_code == 503)
        assert rss_mb(os.getpid()) - before < 300  # bounded: the queue never grows past its limit
        batcher = client.app.state.repository.entries["digits-gan"].batcher  # type: ignore[attr-defined]
        assert batcher.queued_samples == 0
        assert (await client.post("/v1/models/digits-gan/generate", json={"n": 4})).status_code == 200


async def test_rate_limit_per_key(models_dir: Path) -> None:
    keys = ["a" * 20, "b" * 20]
    async with serve(models_dir, api_keys=keys, rate_limit_per_s=1, rate_limit_burst=3) as client:
        first = [await client.get("/v1/models", headers={"Authorization": f"Bearer {keys[0]}"}) for _ in range(4)]
        assert [r.status_code for r in first] == [200, 200, 200, 429]
        assert first[-1].headers["retry-after"] == "1" and "rate limit" in first[-1].json()["detail"]
        other = await client.get("/v1/models", headers={"Authorization": f"Bearer {keys[1]}"})
        assert other.status_code == 200  # the limit is per key


async def test_no_secrets_in_logs_and_cors_closed(models_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = "s3cret-key-" + "x" * 16
    caplog.set_level(logging.DEBUG)
    async with serve(models_dir, api_keys=[key]) as client:
        await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        await client.get("/v1/models", headers={"Authorization": "Bearer wrong-guess"})
        cross = await client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert key not in caplog.text and "wrong-guess" not in caplog.text
    assert "access-control-allow-origin" not in cross.headers


def test_no_code_path_unpickles() -> None:
    pattern = re.compile(r"^\s*(import pickle|from pickle|.*\bpickle\.loads?\(|.*torch\.load\(|.*allow_pickle=True)")
    offenders = [f"{path.relative_to(ROOT)}:{number}" for path in (ROOT / "app").rglob("*.py")
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.match(line)]
    assert not offenders, f"these lines may unpickle: {offenders}"
    weights = [p for p in (ROOT / "models").rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl")]
    assert not weights, weights


async def test_disk_full_during_a_job_fails_it_without_a_result(models_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    writes = 0

    write = LocalWriter.write

    def fill_up(self: LocalWriter, data: bytes) -> None:  # the disk fills up after a few chunks
        nonlocal writes
        writes += 1
        if writes > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(models_dir.parent / "data" / "x.part"))
        write(self, data)

    monkeypatch.setattr(LocalWriter, "write", fill_up)
    async with serve(models_dir, max_batch_size=16) as client:
        job = (await client.post("/v1/jobs", json={"model": "digits-gan", "n": 5000})).json()
        for _ in range(500):
            state = (await client.get(f"/v1/jobs/{job['id']}")).json()
            if state["state"] not in ("queued", "running"):
                break
            await asyncio.sleep(0.01)
        assert state["state"] == "failed" and state["error"].startswith("the disk is full (No space left on device)")
        assert "partial result was removed" in state["error"] and str(models_dir) not in state["error"]
        assert (await client.get(f"/v1/jobs/{job['id']}/result")).status_code == 409
        assert not list((models_dir.parent / "data" / "results").iterdir())


def test_client_disconnect_mid_stream_stops_generation(server: tuple[str, int]) -> None:
    import httpx

    url, _ = server

    def generated() -> float:
        text = httpx.get(f"{url}/metrics").text
        match = re.search(r'^synthgen_samples_generated_total\{model="digits-gan"\} ([0-9.e+]+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    with httpx.stream("POST", f"{url}/v1/models/digits-gan/datasets", json={"per_class": 100_000, "seed": 0},
                      timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_bytes())  # read a little, then hang up
    time.sleep(1.0)
    after_hangup = generated()
    time.sleep(1.0)
    assert generated() == after_hangup < 1_000_000  # generation stopped long before the million samples
    queued = re.search(r'^synthgen_queued_samples\{model="digits-gan"\} ([0-9.e+]+)$',
                       httpx.get(f"{url}/metrics").text, re.M)
    assert float(queued.group(1)) == 0  # and the queue drained


async def test_cors_lets_a_browser_read_the_headers_the_api_sends(models_dir: Path) -> None:
    origin = {"Origin": "https://app.example"}
    async with serve(models_dir, cors_origins=["https://app.example"]) as client:
        preflight = await client.options("/v1/jobs/abc/result", headers={
            **origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization,range"})
        response = await client.post("/v1/models/digits-gan/generate", json={"n": 2, "seed": 0}, headers=origin)
    assert preflight.status_code == 200 and "range" in preflight.headers["access-control-allow-headers"].lower()
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "https://app.example"
    exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "x-seed", "x-rejected", "retry-after", "location", "content-disposition",
            "content-range"} <= exposed

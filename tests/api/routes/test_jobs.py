"""Asynchronous dataset jobs on each job-store backend (SQLite, PostgreSQL): lifecycle, Range downloads, cancel,
restart persistence, disk quota."""

from __future__ import annotations

import asyncio
import io
import zipfile
from pathlib import Path

import pytest

from app.engine.repository import ModelRepository
from tests.conftest import serve
from tests.helpers import wait_for_job

pytestmark = pytest.mark.anyio


async def test_job_lifecycle_and_range_download(models_dir: Path, database_url: str | None) -> None:
    async with serve(models_dir, database_url=database_url) as client:
        submitted = await client.post("/v1/jobs", json={"model": "digits-gan", "per_class": 30, "seed": 4})
        assert submitted.status_code == 202
        job = submitted.json()
        assert submitted.headers["location"] == f"/v1/jobs/{job['id']}" and job["total"] == 300
        assert job["state"] in ("queued", "running")
        done = await wait_for_job(client, job["id"])
        assert done["state"] == "succeeded" and done["done"] == 300 and done["result_url"]
        whole = await client.get(done["result_url"])
        assert whole.status_code == 200 and len(whole.content) == done["result_bytes"]
        with zipfile.ZipFile(io.BytesIO(whole.content)) as archive:
            assert len([n for n in archive.namelist() if n.endswith(".png")]) == 300
        # a broken download resumes with Range
        tail = await client.get(done["result_url"], headers={"Range": "bytes=1000-"})
        assert tail.status_code == 206 and whole.content[:1000] + tail.content == whole.content
        last = await client.get(done["result_url"], headers={"Range": "bytes=-100"})
        assert last.status_code == 206 and last.content == whole.content[-100:]
        beyond = await client.get(done["result_url"], headers={"Range": f"bytes={len(whole.content)}-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(whole.content)}"
        # download tools ask with HEAD first: the size and Range support, no body
        for url in (done["result_url"], f"/v1/jobs/{job['id']}/files/{done['files'][0]['name']}"):
            head = await client.head(url)
            assert (head.status_code, head.content) == (200, b"") and head.headers["accept-ranges"] == "bytes"
            assert int(head.headers["content-length"]) == done["files"][0]["bytes"]
        assert (await client.head("/healthz")).status_code == 200
        # the same dataset as the streamed export
        streamed = await client.post("/v1/models/digits-gan/datasets", json={"per_class": 30, "seed": 4})
        with zipfile.ZipFile(io.BytesIO(streamed.content)) as a, zipfile.ZipFile(io.BytesIO(whole.content)) as b:
            assert all(a.read(n) == b.read(n) for n in a.namelist() if n.endswith(".png"))
        assert (await client.delete(f"/v1/jobs/{job['id']}")).status_code == 204
        assert (await client.get(f"/v1/jobs/{job['id']}")).status_code == 404


async def test_cancel_a_running_job(models_dir: Path, database_url: str | None) -> None:
    async with serve(models_dir, max_batch_size=8, database_url=database_url) as client:
        job = (await client.post("/v1/jobs", json={"model": "digits-gan", "n": 200_000})).json()
        await wait_for_job(client, job["id"], ("running",))
        assert (await client.delete(f"/v1/jobs/{job['id']}")).status_code == 204
        assert not list((models_dir.parent / "data" / "results").iterdir())


async def test_restart_keeps_results_and_resumes_interrupted_jobs(models_dir: Path, database_url: str | None) -> None:
    async with serve(models_dir, max_batch_size=8, database_url=database_url) as client:
        finished = (await client.post("/v1/jobs", json={"model": "digits-vae", "n": 20, "format": "npz"})).json()
        await wait_for_job(client, finished["id"])
        interrupted = (await client.post("/v1/jobs", json={"model": "digits-gan", "n": 200_000})).json()
        await wait_for_job(client, interrupted["id"], ("running",))
    async with serve(models_dir, database_url=database_url) as client:  # a new server, the same data and database
        kept = (await client.get(f"/v1/jobs/{finished['id']}")).json()
        assert kept["state"] == "succeeded"
        assert (await client.get(kept["result_url"])).status_code == 200
        # the stopping server handed the job back to the queue: the new one runs it again at once
        resumed = await wait_for_job(client, interrupted["id"], ("running",))
        assert resumed["error"] is None
        assert (await client.get(f"/v1/jobs/{interrupted['id']}/result")).status_code == 409


async def test_a_queued_job_waits_for_its_model_to_load(models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve(models_dir, run_jobs=False) as client:  # an API without a worker queues the job
        job = (await client.post("/v1/jobs", json={"model": "digits-gan", "n": 20, "format": "npz"})).json()
    load_all = ModelRepository.load_all

    async def slow_load_all(self: ModelRepository) -> None:
        await asyncio.sleep(1.0)  # models that take a while to load: the worker must not claim before they did
        await load_all(self)

    monkeypatch.setattr(ModelRepository, "load_all", slow_load_all)
    async with serve(models_dir) as client:
        done = await wait_for_job(client, job["id"])
        assert done["state"] == "succeeded", done["error"]


async def test_quota_and_bad_jobs(models_dir: Path, database_url: str | None) -> None:
    async with serve(models_dir, jobs_quota_bytes=50_000, database_url=database_url) as client:
        refused = await client.post("/v1/jobs", json={"model": "digits-gan", "n": 5000})
        assert refused.status_code == 507 and "quota" in refused.json()["detail"]
        assert (await client.post("/v1/jobs", json={"model": "nope", "n": 5})).status_code == 404
        shards = await client.post("/v1/jobs", json={"model": "digits-gan", "n": 20_001, "format": "tar",
                                                     "shard_size": 2})
        assert shards.status_code == 422 and "raise shard_size" in shards.json()["detail"]
        assert (await client.get("/v1/jobs/../../etc")).status_code == 404
        bad_id = await client.get("/v1/jobs/xyz")
        assert bad_id.status_code == 422 and "job_id: String should match pattern" in bad_id.json()["detail"]

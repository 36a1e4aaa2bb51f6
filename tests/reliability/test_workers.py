"""Jobs at scale on real servers: API replicas started with --no-jobs and `synthgen worker` processes sharing a
real PostgreSQL database and a data directory. A worker killed with SIGKILL mid-job (results in an S3-compatible
store) has its job resumed by the other from the last completed shard, with the same bytes as an uninterrupted
run on the SQLite and local-folder default; the
database restarted mid-job never yields a job reported done with a partial result; with two API replicas and two
workers every job runs exactly once."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.engine.jobstore import JobStore
from app.engine.schema import create_engine, upgrade
from tests.conftest import ROOT, _free_port, launch_server, serve, stop_server
from tests.helpers import wait_for_job

N, SHARD = 100_000, 10_000
JOB = {"model": "digits-gan", "n": N, "seed": 5, "format": "tar", "shard_size": SHARD}


@pytest.fixture
def cluster(tmp_path: Path, tiny_gan: Path, postgres):
    """Models, data directory and a migrated PostgreSQL database; yields (env, start_worker, store)."""
    models, data = tmp_path / "cluster" / "models", tmp_path / "cluster" / "data"
    shutil.copytree(tiny_gan, models / "digits-gan")
    database = postgres.database()
    engine = create_engine(database)
    upgrade(engine)
    engine.dispose()
    env = {"SYNTHGEN_DATABASE_URL": database, "SYNTHGEN_RUN_JOBS": "false", "SYNTHGEN_JOB_LEASE_S": "3",
           "SYNTHGEN_MAX_BATCH_SIZE": "1000", "SYNTHGEN_DATA_DIR": str(data), "SYNTHGEN_LOG_LEVEL": "warning"}
    processes: list[subprocess.Popen] = []

    def start_worker() -> subprocess.Popen:
        """A worker process, returned once its models are loaded (its metrics port answers)."""
        port = _free_port()
        process = subprocess.Popen([sys.executable, "-m", "app", "worker", "--models-dir", str(models), "--device",
                                    "cpu", "--metrics-port", str(port)], cwd=ROOT,
                                   env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(process)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).status_code == 200:
                    return process
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"the worker did not become ready (exit code {process.poll()})")

    store = JobStore(data, database)
    yield models, env, start_worker, store
    store.close()
    for process in processes:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)


def _hashes(url: str, job: dict) -> dict[str, str]:
    return {file["name"]: hashlib.sha256(httpx.get(url + file["url"], timeout=120).content).hexdigest()
            for file in job["files"]}


def _wait(url: str, job_id: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish within {timeout_s} s")


@pytest.fixture
def reference(models_dir: Path, tmp_path: Path) -> dict[str, str]:
    """The same job on the single-host default (SQLite, the worker inside the server)."""
    import asyncio

    async def run() -> dict[str, str]:
        async with serve(models_dir, data_dir=tmp_path / "reference", max_batch_size=1000) as client:
            job = await wait_for_job(client, (await client.post("/v1/jobs", json=JOB)).json()["id"],
                                     timeout_s=300)
            assert job["state"] == "succeeded", job
            return {file["name"]: hashlib.sha256((await client.get(file["url"])).content).hexdigest()
                    for file in job["files"]}

    return asyncio.run(run())


def test_a_killed_workers_job_is_resumed_by_another_with_the_same_bytes(cluster, reference, s3_settings) -> None:
    models, env, start_worker, store = cluster
    env.update(s3_settings)  # PostgreSQL and object storage
    api, url = launch_server(models, Path(env["SYNTHGEN_DATA_DIR"]), env)
    try:
        workers = [start_worker(), start_worker()]
        job = httpx.post(f"{url}/v1/jobs", json=JOB).json()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the first shards are checkpointed
            record = store.get(job["id"])
            if record.checkpoint and record.checkpoint["next"] >= 2 * SHARD:
                break
            time.sleep(0.05)
        victim = next(w for w in workers if record.replica.endswith(f":{w.pid}"))
        victim.send_signal(signal.SIGKILL)
        killed_at = record.checkpoint["next"]
        finished = _wait(url, job["id"])
        assert finished["state"] == "succeeded", finished
        record = store.get(job["id"])
        survivor = next(w for w in workers if w is not victim)
        assert record.attempts == 2 and record.replica.endswith(f":{survivor.pid}")
        print(f"\nkilled after {killed_at} of {N} samples; resumed by the other worker")
        assert _hashes(url, finished) == reference  # byte for byte the uninterrupted run's shards and manifest
    finally:
        stop_server(api)


def test_the_database_restarted_mid_job_never_yields_a_partial_result(cluster, reference, postgres) -> None:
    models, env, start_worker, store = cluster
    api, url = launch_server(models, Path(env["SYNTHGEN_DATA_DIR"]), env)
    try:
        start_worker()
        job = httpx.post(f"{url}/v1/jobs", json=JOB).json()
        while store.get(job["id"]).state != "running":
            time.sleep(0.05)
        time.sleep(0.5)
        postgres.restart(down_s=2.0)
        finished = _wait(url, job["id"])
        assert finished["state"] in ("succeeded", "failed"), finished
        if finished["state"] == "succeeded":
            assert _hashes(url, finished) == reference
        print(f"\nthe database restarted mid-job: the job {finished['state']} after {store.get(job['id']).attempts} "
              "claim(s)")
    finally:
        stop_server(api)


def test_two_api_replicas_and_two_workers_run_every_job_exactly_once(cluster) -> None:
    models, env, start_worker, store = cluster
    env["SYNTHGEN_MAX_RUNNING_JOBS_PER_KEY"] = "4"  # all jobs are one key's (open mode): let both workers run them
    apis = [launch_server(models, Path(env["SYNTHGEN_DATA_DIR"]), env) for _ in range(2)]
    try:
        start_worker(), start_worker()
        jobs = [httpx.post(f"{apis[i % 2][1]}/v1/jobs", json={"model": "digits-gan", "n": 500, "seed": i,
                                                              "format": "zip"}).json() for i in range(12)]
        finished = [_wait(apis[(i + 1) % 2][1], job["id"]) for i, job in enumerate(jobs)]  # read on the other
        assert all(job["state"] == "succeeded" for job in finished)
        records = [store.get(job["id"]) for job in jobs]
        assert all(record.attempts == 1 for record in records)  # claimed once each
        assert len({record.replica for record in records}) == 2  # both workers took jobs
    finally:
        for api, _ in apis:
            stop_server(api)

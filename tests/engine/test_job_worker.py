"""Job workers against the job store, without the API: a job resumed after its last shard, a worker that died after
committing, a stalled worker finishing after a takeover, the bytes reserved for a result, and a training promoted
again after a crash."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from app.cli import main
from app.core.nets.gan import ConditionalGAN, GanConfig
from app.engine import results
from app.engine.jobs import JobWorker, estimate_bytes, plan_for, with_checksums
from app.engine.jobstore import Job, JobStore
from app.engine.metrics import Metrics
from app.engine.model_jobs import promote
from app.engine.repository import ModelRepository
from app.engine.schema import JOBS
from app.engine.states import JobState
from app.settings import Settings

pytestmark = pytest.mark.anyio


class Jobs:
    """A job store, a repository with one tiny untrained GAN (8×8, three classes) and helpers to run workers."""

    def __init__(self, root: Path, settings: Settings, repository: ModelRepository, store: JobStore) -> None:
        self.root, self.settings, self.repository, self.store = root, settings, repository, store

    @property
    def results(self) -> Path:
        return self.root / "data" / "results"

    def submit(self, request: dict[str, Any], output: str) -> Job:
        request = {"format": output, "seed": 7, **request}
        model = self.repository.get("tiny").model
        plan = plan_for(model, request, self.settings)
        reserved = estimate_bytes(plan, model, output, request.get("shard_size"), self.settings.max_batch_size)
        return self.store.create("tiny", request, len(plan), output, reserved_bytes=reserved)

    def worker(self, name: str) -> tuple[JobWorker, asyncio.Task[None]]:
        worker = JobWorker(self.store, self.repository, self.settings, name)
        return worker, asyncio.create_task(worker.run())

    async def wait(self, job_id: str, until: Any = lambda job: job.state in (JobState.SUCCEEDED, JobState.FAILED),
                   timeout_s: float = 30) -> Job:
        deadline = time.monotonic() + timeout_s
        while not until(job := self.store.get(job_id)):
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.01)
        return job

    async def run(self, job: Job, name: str = "w:1") -> Job:
        worker, task = self.worker(name)
        try:
            return await self.wait(job.id)
        finally:
            task.cancel()
            await worker.close()

    def expire_lease(self, job_id: str) -> None:
        """The holder's lease runs out (it died, or stalled past it)."""
        with self.store.engine.begin() as db:
            db.execute(JOBS.update().where(JOBS.c.id == job_id).values(lease_until=0))

    def files(self, job: Job) -> dict[str, bytes]:
        return {path.name: path.read_bytes() for path in sorted((self.results / job.id).iterdir())}


def save_tiny_gan(folder: Path, class_names: list[str]) -> None:
    torch.manual_seed(0)
    config = GanConfig(height=8, width=8, channels=1, num_classes=len(class_names), latent_dim=8, g_channels=4,
                       d_channels=4, embed_dim=4)
    ConditionalGAN(config).eval().save_pretrained(folder, class_names=class_names)


@pytest.fixture
def class_names() -> list[str]:
    """The tiny model's classes (a test may parametrize them)."""
    return ["a", "b", "c"]


@pytest.fixture
async def jobs(tmp_path: Path, class_names: list[str]) -> AsyncIterator[Jobs]:
    save_tiny_gan(tmp_path / "models" / "tiny", class_names)
    settings = Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data", device="cpu", max_batch_size=4,
                        max_batch_wait_ms=1, job_lease_s=30)
    with ThreadPoolExecutor(1) as executor, ThreadPoolExecutor(2) as cpu:
        repository = ModelRepository(settings, torch.device("cpu"), executor, cpu, Metrics())
        await repository.load_all()
        store = JobStore(settings.data_dir)
        try:
            yield Jobs(tmp_path, settings, repository, store)
        finally:
            await repository.close()
            store.close()


async def test_a_job_stopped_after_its_last_shard_resumes_with_the_same_manifest(
        jobs: Jobs, monkeypatch: pytest.MonkeyPatch) -> None:
    request = {"n": 10, "shard_size": 4}  # the last shard is short
    reference = await jobs.run(jobs.submit(request, "tar"))
    job = jobs.submit(request, "tar")
    opened, release = asyncio.Event(), threading.Event()
    loop, open_file = asyncio.get_running_loop(), results.LocalWriter.open

    def stall_at_the_manifest(self: results.LocalWriter, name: str) -> None:
        open_file(self, name)
        if name == "manifest.json":
            loop.call_soon_threadsafe(opened.set)
            release.wait(10)

    monkeypatch.setattr(results.LocalWriter, "open", stall_at_the_manifest)
    worker, task = jobs.worker("one:1")
    await opened.wait()
    task.cancel()
    await worker.close()  # a stopping worker hands the job back with its checkpoint
    release.set()
    monkeypatch.setattr(results.LocalWriter, "open", open_file)
    assert jobs.store.get(job.id).checkpoint["next"] == 10
    resumed = await jobs.run(job, "two:1")
    assert resumed.state == JobState.SUCCEEDED and resumed.done == 10
    assert jobs.files(resumed) == jobs.files(reference)  # the manifest too: "count": 10, and the shards' sha256
    files = jobs.files(reference)
    out = jobs.root / "exported"  # the command line's export of the same plan: the same shards and manifest
    assert main(["export", "--model", str(jobs.root / "models" / "tiny"), "--n", "10", "--seed", "7", "--shard-size",
                 "4", "--out", str(out)]) == 0
    assert {path.name: path.read_bytes() for path in out.iterdir()} == files
    listed = json.loads(files["manifest.json"])["files"]
    assert listed == {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for name, data in files.items() if name.endswith(".tar")}


def test_shards_written_before_checkpoints_kept_digests_are_listed_with_their_size_only() -> None:
    manifest = with_checksums(b'{"shards": ["a.tar", "b.tar"]}', {"a.tar": 3, "b.tar": 4}, {"b.tar": "ff"})
    assert json.loads(manifest)["files"] == {"a.tar": {"bytes": 3}, "b.tar": {"bytes": 4, "sha256": "ff"}}


@pytest.mark.parametrize("class_names", [["é" + "a" * 99, "b" * 100, "c" * 100]])
@pytest.mark.parametrize(("output", "request_"), [("zip", {"n": 1500}), ("parquet", {"n": 600}),
                                                  ("tar", {"n": 60, "shard_size": 2})])
async def test_the_bytes_reserved_bound_the_result(jobs: Jobs, output: str, request_: dict[str, Any]) -> None:
    """Long class names and small images (the per-sample overhead counts), small shards (each padded to a tar
    record) and row groups of 4 samples (each with its statistics)."""
    job = await jobs.run(jobs.submit(request_, output))
    assert job.state == JobState.SUCCEEDED, job.error
    assert job.result_bytes <= job.reserved_bytes < 3 * job.result_bytes


def test_a_training_promoted_again_after_a_crash_keeps_its_one_version(tmp_path: Path) -> None:
    """The worker died after promote() but before recording the version: the next one promotes again."""
    save_tiny_gan(tmp_path / "stage", ["a", "b", "c"])
    settings = Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data", device="cpu")
    store = JobStore(settings.data_dir)
    try:
        job, other = (store.create("mine", {}, 1, "model", kind="training") for _ in range(2))
        assert promote(settings, job, tmp_path / "stage") == 1
        assert promote(settings, job, tmp_path / "stage") == 1
        assert promote(settings, other, tmp_path / "stage") == 2  # another training is another version
        assert sorted(p.name for p in (settings.data_dir / "models" / "mine").iterdir()) == ["1", "2"]
    finally:
        store.close()


@pytest.mark.parametrize(("output", "request_"), [("zip", {"n": 20}), ("tar", {"n": 20, "shard_size": 8})])
async def test_a_job_whose_worker_died_after_committing_is_finished_by_another(
        jobs: Jobs, output: str, request_: dict[str, Any]) -> None:
    reference = await jobs.run(jobs.submit(request_, output))
    job = jobs.submit(request_, output)
    dead, task = jobs.worker("dead:1")
    update = dead._update

    async def die_before_recording(job_id: str, persist: bool = False, **fields: Any) -> bool:
        if fields.get("state") == JobState.SUCCEEDED:
            await asyncio.Event().wait()  # the process is gone from here on
        return await update(job_id, persist, **fields)

    dead._update = die_before_recording  # type: ignore[method-assign]
    await jobs.wait(job.id, lambda _: (jobs.results / job.id).is_dir())  # committed
    task.cancel()  # no more renewals
    jobs.expire_lease(job.id)
    done = await jobs.run(job, "next:1")
    for stuck in list(dead._tasks.values()):
        stuck.cancel()
        await asyncio.wait({stuck})
    assert done.state == JobState.SUCCEEDED and done.replica == "next:1", done.error
    assert jobs.files(done) == jobs.files(reference)
    assert sorted(path.name for path in jobs.results.iterdir()) == sorted([reference.id, job.id])


@pytest.mark.parametrize("stall", ["in the commit", "before the commit"])
@pytest.mark.parametrize("first", ["stalled", "new owner"])
async def test_a_stalled_worker_finishing_after_a_takeover_leaves_the_new_owners_result_alone(
        jobs: Jobs, monkeypatch: pytest.MonkeyPatch, stall: str, first: str) -> None:
    """The stalled worker (e.g. a database outage longer than its lease) goes on after the job was taken over,
    before the new owner finished, or after."""
    request = {"n": 24, "shard_size": 4}
    reference = await jobs.run(jobs.submit(request, "tar"))
    job = jobs.submit(request, "tar")
    loop, stalled_at, release_stalled, release_new = asyncio.get_running_loop(), asyncio.Event(), threading.Event(), \
        threading.Event()
    writers: list[results.LocalWriter] = []
    open_file, commit = results.LocalWriter.open, results.LocalWriter.commit

    def gated_open(self: results.LocalWriter, name: str) -> None:
        if self not in writers:
            writers.append(self)
        if writers.index(self) == 1 and name == "manifest.json" and first == "stalled":
            release_new.wait(10)
        open_file(self, name)

    def gated_commit(self: results.LocalWriter) -> None:
        if writers.index(self) == 0:
            loop.call_soon_threadsafe(stalled_at.set)
            release_stalled.wait(10)
        commit(self)

    monkeypatch.setattr(results.LocalWriter, "open", gated_open)
    stalled, stalled_task = jobs.worker("stalled:1")
    if stall == "in the commit":
        monkeypatch.setattr(results.LocalWriter, "commit", gated_commit)
    else:
        checked_commit = stalled._commit

        async def stall_before_committing(*args: Any) -> bool:
            stalled_at.set()
            await asyncio.to_thread(release_stalled.wait, 10)
            return await checked_commit(*args)

        stalled._commit = stall_before_committing  # type: ignore[method-assign]
    await asyncio.wait_for(stalled_at.wait(), 10)
    running = stalled._tasks[job.id]
    jobs.expire_lease(job.id)
    new_owner, new_task = jobs.worker("next:1")
    await jobs.wait(job.id, lambda job: job.replica == "next:1")
    if first == "new owner":
        await jobs.wait(job.id)
    release_stalled.set()
    await asyncio.wait({running}, timeout=10)
    release_new.set()
    try:
        done = await jobs.wait(job.id)
    finally:
        for worker, task in ((stalled, stalled_task), (new_owner, new_task)):
            task.cancel()
            await worker.close()
    assert done.state == JobState.SUCCEEDED and done.replica == "next:1", done.error
    assert jobs.files(done) == jobs.files(reference)
    assert sorted(path.name for path in jobs.results.iterdir()) == sorted([reference.id, job.id])


async def test_progress_never_runs_ahead_of_the_shards_written(jobs: Jobs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 4 samples in shards of 2: a chunk's pieces are two shards, counted once."""
    job = jobs.submit({"n": 32, "shard_size": 2}, "tar")
    opened: list[str] = []
    open_file = results.LocalWriter.open

    def remember(self: results.LocalWriter, name: str) -> None:
        opened.append(name)
        open_file(self, name)

    monkeypatch.setattr(results.LocalWriter, "open", remember)
    monkeypatch.setattr(JobWorker, "PROGRESS_EVERY_S", 0)
    reports: list[tuple[str, int]] = []
    update = JobWorker._update

    async def spy(self: JobWorker, job_id: str, persist: bool = False, **fields: Any) -> bool:
        if "done" in fields and "state" not in fields:
            reports.append((opened[-1], fields["done"]))
        return await update(self, job_id, persist, **fields)

    monkeypatch.setattr(JobWorker, "_update", spy)
    assert (await jobs.run(job)).state == JobState.SUCCEEDED
    shards = [(int(name[-10:-4]), done) for name, done in reports if name.endswith(".tar")]
    assert shards and all(done <= 2 * (shard + 1) for shard, done in shards)

"""Running dataset jobs: workers claim queued jobs from the job store under a lease, run them through the same
export code as the streamed route into a `.part` folder, and rename it only when complete, so a half-written result
is never reported as succeeded. A result is a folder of files: one archive, or WebDataset shards with a
`manifest.json` sidecar.

A worker is a loop in `synthgen serve` (the single-host default) or a process of its own (`synthgen worker`). It
renews its leases; a job whose worker died is claimed by another once its lease runs out and resumed: a tar job from
its last completed shard (samples are a pure function of (model, seed, index), so the shards are the same bytes),
other formats from the start. A stopping worker hands its jobs back to the queue at once.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa

from app.core.model import SyntheticModel
from app.engine.exports import export_limit, stream_export
from app.engine.filters import FilterSpec
from app.engine.jobstore import Job, JobStore
from app.engine.metrics import Metrics
from app.engine.model_jobs import TrainingRun, gate_failures, promote
from app.engine.plans import SamplePlan, plan_samples
from app.engine.repository import ModelRepository
from app.engine.results import LocalResults, ResultWriter
from app.engine.states import JobState
from app.errors import NotFoundError, QualityGateError, QuotaExceededError, SynthgenError
from app.settings import Settings

log = logging.getLogger("synthgen.jobs")
MAX_ATTEMPTS = 3


def with_checksums(manifest: bytes, sizes: dict[str, int], digests: dict[str, str]) -> bytes:
    """A tar job's manifest with every shard's size and sha256 under `files`, as `synthgen export` writes it (no
    sha256 for a shard written before checkpoints kept digests)."""
    fields = json.loads(manifest)
    fields["files"] = {name: {"bytes": sizes[name], **({"sha256": digests[name]} if name in digests else {})}
                       for name in fields["shards"]}
    return (json.dumps(fields, sort_keys=True, indent=2) + "\n").encode()


def estimate_bytes(plan: SamplePlan, model: SyntheticModel, output: str, shard_size: int | None = None,
                   batch: int = 1) -> int:
    """An upper bound of a result's size, reserved against the quotas (a job whose result passes it fails). A PNG
    is at most its raw rows (plus a filter byte each) and some overhead. A zip adds per sample its member name in
    two headers and a row of labels.csv and of metadata.parquet; Parquet its row, and per row group (`batch`
    samples) page headers and the image column's min and max statistics (in the page and the footer); a tar a
    512-byte header and padding per member (png, cls, json), and per shard an end marker, padded to tarfile's
    10240-byte records. Plus the manifest with the model's card, and the class names in cards and schemas."""
    height, width, channels = model.image_shape
    n = len(plan)
    if output == "npz":
        return n * (height * width * channels + 16) + 65_536
    raw = (width * channels + 1) * height
    png = raw + raw // 1024 + 128  # zlib's worst case (stored blocks) plus the PNG chunks
    names = model.class_names or ["samples"]
    longest = max(len(name.encode()) for name in names)
    index = max(8, len(str(n)))
    member = longest + index + 5  # <class>/<index>.png
    total = 2 * len(json.dumps(model.card, indent=2)) + 8 * sum(len(json.dumps(name)) + 16 for name in names) + 65_536
    if output == "zip":  # headers: local 30, central 46, data descriptor 24; labels.csv's fields may be quoted
        row = member + 2 * longest + 2 * index + len(str(plan.seed)) + 8
        return total + n * (png + 100 + 2 * member + row + (member + longest + 64))
    if output == "parquet":
        return total + n * (png + longest + 2 * index + 64) + -(-n // batch) * (4 * png + 4 * longest + 2048)
    text = len(json.dumps({"class_name": max(names, key=lambda name: len(json.dumps(name))), "index": n,
                           "label": len(names), "model": model.name, "seed": plan.seed}))
    per_sample = 3 * 512 + (png + 511) + 512 + -(-text // 512) * 512
    full, rest = divmod(n, shard_size or max(n, 1))
    shard_bytes = [-(-(size * per_sample + 1024) // 10240) * 10240 for size in (shard_size or n, rest)]
    listed = (full + bool(rest)) * 256 if shard_size else 0  # each shard's name, size and sha256 in the manifest
    return total + full * shard_bytes[0] + (shard_bytes[1] if rest else 0) + listed


def _failure(exc: Exception) -> str:
    """What a job's error says: the reason, never a server path."""
    if isinstance(exc, SynthgenError):
        return str(exc)
    if isinstance(exc, OSError):
        hint = "the disk is full" if exc.errno == errno.ENOSPC else "the result could not be written"
        return f"{hint} ({exc.strerror or type(exc).__name__}); the partial result was removed"
    return f"internal error ({type(exc).__name__}); the partial result was removed"


def worker_name(settings: Settings) -> str:
    """This process's name in the job store: the replica id and the process id."""
    return f"{settings.replica_id}:{os.getpid()}"


def plan_for(model: SyntheticModel, request: dict[str, Any], settings: Settings) -> SamplePlan:
    """The plan of a stored job request (what the API admitted, with its seed fixed)."""
    return plan_samples(model, *export_limit(settings, request["format"]), per_class=request.get("per_class"),
                        n=request.get("n"), label=request.get("label"), seed=request["seed"],
                        truncation=request.get("truncation", 1.0),
                        filters=FilterSpec(request.get("min_confidence"), request.get("max_similarity", False)))


def _alive(pid: int) -> bool:
    """Whether a process of this host is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resumable(job: Job) -> bool:
    """Whether a job resumes from checkpoints: tar jobs without filters (filters count rejections across shard
    borders, so their manifest needs the whole run)."""
    request = job.request
    return job.format == "tar" and request.get("min_confidence") is None and not request.get("max_similarity")


class JobWorker:
    """Claims and runs jobs: at most `max_concurrent_jobs` at a time, and no more than `max_running_jobs_per_key`
    of one API key across all workers."""

    POLL_S = 0.5
    PROGRESS_EVERY_S = 0.5

    def __init__(self, store: JobStore, repository: ModelRepository, settings: Settings, worker_id: str,
                 metrics: Metrics | None = None, on_finished: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.store, self.repository, self.settings, self.id = store, repository, settings, worker_id
        self.metrics, self.on_finished = metrics, on_finished
        self.lease_s = settings.job_lease_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._kinds: dict[str, str] = {}  # job id → dataset or training
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A job was submitted here: look for it now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Claim jobs while there is room; renew leases and fail jobs that keep killing their workers."""
        released = await asyncio.to_thread(self.store.release_dead, self.settings.replica_id, _alive)
        if released:
            log.warning("%d job(s) of this replica's stopped processes were handed back to the queue", released)
        renewing = asyncio.create_task(self._renew())
        try:
            rooms = {"dataset": self.settings.max_concurrent_jobs, "training": self.settings.max_concurrent_trainings}
            while True:
                self._wake.clear()
                claimed = False
                for kind, room in rooms.items():
                    if sum(held == kind for held in self._kinds.values()) >= room:
                        continue
                    try:
                        job = await asyncio.to_thread(self.store.claim, self.id, self.lease_s,
                                                      self.settings.max_running_jobs_per_key, kind)
                    except sa.exc.SQLAlchemyError as exc:  # the database is away: try again later
                        log.warning("worker %s cannot claim jobs: %s", self.id, exc.__class__.__name__)
                        await asyncio.sleep(self.lease_s / 3)
                        break
                    if job is not None and job.id in self._tasks:  # re-claimed after an outage: still running here
                        continue
                    if job is not None:
                        self._kinds[job.id] = kind
                        self._tasks[job.id] = asyncio.create_task(
                            self._run_training(job) if kind == "training" else self._run(job))
                        claimed = True
                if claimed:
                    continue
                try:
                    async with asyncio.timeout(self.POLL_S):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            renewing.cancel()

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                held = await asyncio.to_thread(self.store.renew, self.id, list(self._tasks), self.lease_s)
                await asyncio.to_thread(self.store.fail_exhausted, MAX_ATTEMPTS)
            except sa.exc.SQLAlchemyError as exc:  # keep running; if the outage outlasts the lease, others take over
                log.warning("worker %s cannot renew its leases: %s", self.id, exc.__class__.__name__)
                continue
            for job_id in set(self._tasks) - held:  # deleted, or taken over after a stall: stop writing it
                await self.cancel(job_id)

    async def cancel(self, job_id: str) -> None:
        task = self._tasks.pop(job_id, None)
        self._kinds.pop(job_id, None)
        while task is not None and not task.done():  # again if a library swallowed the cancellation
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    async def close(self) -> None:
        """Stop: running jobs go back to the queue at once (with their checkpoints) for any worker to resume."""
        running = list(self._tasks)
        for job_id in running:
            await self.cancel(job_id)
        for job_id in running:
            await asyncio.to_thread(self.store.update, job_id, self.id, state=JobState.QUEUED, replica="",
                                    lease_until=None)

    async def _update(self, job_id: str, persist: bool = False, **fields: Any) -> bool:
        """Update a job this worker holds. Progress is best effort; with `persist`, a database outage is waited out
        for up to a lease (then the error propagates, and the job is left for another worker to take over)."""
        deadline = time.monotonic() + self.lease_s
        while True:
            try:
                return await asyncio.to_thread(self.store.update, job_id, self.id, **fields)
            except sa.exc.SQLAlchemyError as exc:
                if not persist:
                    return False
                if time.monotonic() > deadline:
                    raise
                log.warning("job %s: the database is away (%s); retrying", job_id, exc.__class__.__name__)
                await asyncio.sleep(1.0)

    async def _notify(self, job_id: str) -> None:
        if self.on_finished is not None:
            try:
                await self.on_finished(job_id)
            except Exception:  # a webhook problem never changes the job
                log.exception("the end of job %s could not be announced", job_id)

    def _on_ray(self, job: Job) -> bool:
        """Whether the job runs on the Ray cluster: a sharded tar job without filters, results in the data
        directory (which the cluster's nodes share)."""
        return bool(self.settings.ray_address and job.format == "tar" and job.request.get("shard_size")
                    and resumable(job) and isinstance(self.store.storage, LocalResults))

    async def _run(self, job: Job) -> None:
        if self._on_ray(job):
            return await self._run_on_ray(job)
        storage = self.store.storage
        checkpoint = (job.checkpoint if resumable(job) else None) or {"files": {}, "next": 0}
        writer: ResultWriter | None = None
        started = time.monotonic()
        try:
            writer = await asyncio.to_thread(storage.writer, job.id, checkpoint, job.attempts)
            async with self.repository.serving(job.model) as served:
                plan = plan_for(served.model, job.request, self.settings)
                shard_size = job.request.get("shard_size") if job.format == "tar" else None
                written, done, reported = sum(checkpoint["files"].values()), checkpoint["next"], time.monotonic()
                current: str | None = None
                digests: dict[str, str] = dict(checkpoint.get("sha256", {}))  # of the files complete
                digest = hashlib.sha256()

                def advanced(samples: int) -> None:  # a chunk's pieces may be many (one per shard it fills)
                    nonlocal done
                    done = samples

                stream = stream_export(served, plan, job.format, self.settings, shard_size, start=checkpoint["next"],
                                       progress=advanced)
                async for name, data in stream:
                    if name != current:
                        if current is not None:
                            await asyncio.to_thread(writer.close_file)
                            digests[current] = digest.hexdigest()
                            await self._checkpoint(job, writer, shard_size, digests)
                        if shard_size and name == "manifest.json":  # one piece, the last: every shard's sha256
                            data = with_checksums(data, writer.state()["files"], digests)
                        await asyncio.to_thread(writer.open, name)
                        current, digest = name, hashlib.sha256()
                    written += len(data)
                    if written > job.reserved_bytes:
                        raise QuotaExceededError(f"the result passed the {job.reserved_bytes} bytes reserved for it; "
                                                 "the partial result was removed")
                    digest.update(data)
                    await asyncio.to_thread(writer.write, data)
                    if time.monotonic() - reported > self.PROGRESS_EVERY_S:
                        await self._update(job.id, done=done)
                        reported = time.monotonic()
                if current is not None:
                    await asyncio.to_thread(writer.close_file)
            if not await self._commit(job, writer):  # only a complete result appears under its final name
                return
            try:
                recorded = await self._update(job.id, persist=True, state=JobState.SUCCEEDED, done=len(plan),
                                              finished_at=time.time(), result_bytes=written, checkpoint=None)
            except sa.exc.SQLAlchemyError:  # never recorded: leave the files for whoever takes the job over
                await asyncio.to_thread(writer.uncommit)
                raise
            if not recorded:
                await self._lost(job.id)
                return
            if self.metrics is not None:
                self.metrics.job_samples.labels(self.id).inc(len(plan) - checkpoint["next"])
                self.metrics.job_seconds.labels(self.id).inc(time.monotonic() - started)
            await self._notify(job.id)
        except asyncio.CancelledError:
            if writer is not None and not resumable(job):
                await asyncio.shield(asyncio.to_thread(writer.abort))
            raise
        except sa.exc.SQLAlchemyError as exc:  # the database stayed away: the lease runs out, another worker resumes
            log.error("job %s left for another worker: the database is unreachable (%s)", job.id, exc)
        except Exception as exc:  # every failure is recorded on the job, never lost
            await self._fail(job.id, exc, writer, checkpoint=None)
        finally:
            self._forget(job.id)

    async def _fail(self, job_id: str, exc: Exception, writer: ResultWriter | None = None, **fields: Any) -> None:
        """Record a failure on the job (a partial result removed) and announce it. A worker that no longer holds
        the job (deleted, or taken over after it stalled) removes only its own attempt's files."""
        if writer is not None:  # its own files first: a client that sees the failure must not find them
            await asyncio.to_thread(writer.abort)
        recorded = await self._update(job_id, persist=True, state=JobState.FAILED, error=_failure(exc),
                                      finished_at=time.time(), **fields)
        log.log(logging.ERROR if recorded else logging.WARNING, "job %s %s: %s", job_id,
                "failed" if recorded else "stopped (no longer this worker's)", exc)
        if recorded:
            await asyncio.to_thread(self.store.storage.delete, job_id)
            await self._notify(job_id)

    async def _commit(self, job: Job, writer: ResultWriter) -> bool:
        """Commit the result if this worker still holds the job, renewing its lease first so that no other worker
        takes the job over meanwhile; one that lost it removes only its own attempt's files."""
        if not await self._update(job.id, persist=True, lease_until=time.time() + self.lease_s):
            await asyncio.to_thread(writer.abort)
            return False
        await asyncio.to_thread(writer.commit)
        return True

    async def _lost(self, job_id: str) -> None:
        """After committing a job this worker no longer holds: the files go if the job was deleted, and stay for the
        worker that took it over otherwise."""
        try:
            await asyncio.to_thread(self.store.get, job_id)
        except NotFoundError:
            await asyncio.to_thread(self.store.storage.delete, job_id)

    def _forget(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._kinds.pop(job_id, None)

    async def _run_on_ray(self, job: Job) -> None:
        """The job's shards written by Ray Data actors into its part folder (progress: the shards complete), then
        the folder committed; a worker that takes the job over writes them again (the same bytes)."""
        from app.engine.ray_export import done_shards, export_on_ray

        writer = None
        started = time.monotonic()
        try:
            writer = await asyncio.to_thread(self.store.storage.writer, job.id, None, job.attempts)
            async with self.repository.serving(job.model) as served:
                plan = plan_for(served.model, job.request, self.settings)
                shard_size = job.request["shard_size"]
                export = asyncio.ensure_future(asyncio.to_thread(
                    export_on_ray, self.settings.ray_address, served.model.folder, plan, shard_size, writer.part,
                    self.settings.ray_actors, self.settings.ray_gpus_per_actor, self.settings.ray_cpus_per_actor))
                while not export.done():
                    await asyncio.wait({export}, timeout=self.PROGRESS_EVERY_S * 2)
                    done = min(await asyncio.to_thread(done_shards, writer.part) * shard_size, len(plan))
                    await self._update(job.id, done=done)
                await export
            size = sum(f.stat().st_size for f in writer.part.iterdir())
            if size > job.reserved_bytes:
                raise QuotaExceededError(f"the result passed the {job.reserved_bytes} bytes reserved for it; "
                                         "the partial result was removed")
            if not await self._commit(job, writer):
                return
            recorded = await self._update(job.id, persist=True, state=JobState.SUCCEEDED, done=len(plan),
                                          finished_at=time.time(), result_bytes=size, checkpoint=None)
            if not recorded:
                await self._lost(job.id)
                return
            if self.metrics is not None:
                self.metrics.job_samples.labels(self.id).inc(len(plan))
                self.metrics.job_seconds.labels(self.id).inc(time.monotonic() - started)
            await self._notify(job.id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._fail(job.id, exc, writer, checkpoint=None)
        finally:
            self._forget(job.id)

    async def _run_training(self, job: Job) -> None:
        """Train (resuming a checkpoint a dead worker left), evaluate, check the gates, promote and load."""
        run = TrainingRun(job, self.settings, str(self.repository.device),
                          lambda **fields: self._update(job.id, **fields))
        try:
            version = (job.checkpoint or {}).get("version")
            if version is None:  # not yet promoted by an earlier attempt
                candidates = await run.run()
                best = max(candidates, key=lambda arch: candidates[arch]["tstr_accuracy"] or 0.0)
                failures = gate_failures(candidates[best], job.request["gates"])
                run.progress.update(chosen=best, gate_failures=failures, stage="checked")
                if failures:
                    raise QualityGateError("the model was not promoted: " + "; ".join(failures) + "; its card is at "
                                           f"/v1/trainings/{job.id}/card")
                version = await asyncio.to_thread(promote, self.settings, job, run.work / best)
                await self._update(job.id, persist=True, checkpoint={"version": version}, progress=run.progress)
            ref = f"{job.model}@{version}"
            entry = await self.repository.ensure_loaded(ref)
            run.progress.update(stage="done", model=ref, version=version, load_error=entry.error, eta_seconds=None)
            files = await asyncio.to_thread(lambda: [f.stat().st_size for f in entry.folder.rglob("*") if f.is_file()])
            await self._update(job.id, persist=True, state=JobState.SUCCEEDED, done=job.total, finished_at=time.time(),
                               result_bytes=sum(files), progress=run.progress)
            await self._notify(job.id)
        except asyncio.CancelledError:
            raise
        except sa.exc.SQLAlchemyError as exc:
            log.error("training %s left for another worker: the database is unreachable (%s)", job.id, exc)
        except Exception as exc:
            await self._fail(job.id, exc, progress=run.progress)
        finally:
            self._forget(job.id)

    async def _checkpoint(self, job: Job, writer: ResultWriter, shard_size: int | None, digests: dict[str, str]
                          ) -> None:
        """After each complete shard of a tar job: what a worker taking the job over resumes from."""
        if shard_size and resumable(job):
            state = writer.state()
            shards = sum(name.endswith(".tar") for name in state["files"])
            await self._update(job.id, persist=True, checkpoint={**state, "sha256": digests,
                                                                 "next": min(shards * shard_size, job.total)})

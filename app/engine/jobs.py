"""Asynchronous dataset jobs: persisted in SQLite (standard library) under the data directory, run in the
background through the same export code as the streamed route, written into a `.part` folder and renamed only when
complete, so a half-written result is never reported as succeeded. A result is a folder of files: one archive, or
WebDataset shards with a `manifest.json` sidecar.

Every job belongs to the API key that made it. Admission is one transaction: the queue bound (429), and the disk
quota (507) counted from the database (results kept plus the reservation of every unfinished job, each an upper
bound of its archive), globally and per key. After a restart, this replica's interrupted jobs are failed at once;
a crashed replica's once their heartbeat is stale. Results expire after a TTL; a download holds its file open, so
deleting or expiring a result never truncates a download in progress.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from app.core.model import SyntheticModel
from app.engine.exports import stream_export
from app.engine.plans import SamplePlan
from app.engine.repository import ModelRepository
from app.engine.states import JobState
from app.errors import InvalidInputError, NotFoundError, QuotaExceededError, RateLimitedError, SynthgenError
from app.settings import Settings

log = logging.getLogger("synthgen.jobs")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


@dataclass
class Job:
    id: str
    model: str
    request: dict[str, Any]
    state: JobState
    done: int
    total: int
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    result_bytes: int | None
    format: str
    heartbeat_at: float | None = None  # refreshed by the replica running the job
    owner: str = ""  # the fingerprint of the API key that made it ("" in open mode)
    reserved_bytes: int = 0  # an upper bound of the result's size, counted against the quotas until it finishes
    replica: str = ""  # the server that runs it

    @property
    def eta_s(self) -> float | None:
        if self.state != JobState.RUNNING or not self.started_at or not self.done:
            return None
        rate = self.done / max(time.time() - self.started_at, 1e-6)
        return (self.total - self.done) / rate


@dataclass(frozen=True)
class JobLimits:
    """What admission checks: jobs queued or running and result bytes, in all and per API key."""

    max_jobs: int = 64
    max_jobs_per_owner: int = 8
    quota_bytes: int = 2 * 1024**3
    quota_bytes_per_owner: int = 512 * 1024**2

    @classmethod
    def from_settings(cls, settings: Settings) -> JobLimits:
        return cls(settings.max_queued_jobs, settings.max_queued_jobs_per_key, settings.jobs_quota_bytes,
                   settings.jobs_quota_bytes_per_key)


_COLUMNS = ("id", "model", "request", "state", "done", "total", "error", "created_at", "started_at", "finished_at",
            "result_bytes", "format", "heartbeat_at", "owner", "reserved_bytes", "replica")
_ADDED_COLUMNS = {"owner": "TEXT NOT NULL DEFAULT ''", "reserved_bytes": "INTEGER NOT NULL DEFAULT 0",
                  "replica": "TEXT NOT NULL DEFAULT ''"}
_UNFINISHED = f"state IN ('{JobState.QUEUED}', '{JobState.RUNNING}')"
# bytes a job holds: its result once succeeded, its reservation while unfinished
_HELD = f"COALESCE(SUM(CASE WHEN state = '{JobState.SUCCEEDED}' THEN result_bytes WHEN {_UNFINISHED} " \
        "THEN reserved_bytes ELSE 0 END), 0)"
HEARTBEAT_S = 5.0
INTERRUPTED = "interrupted: the server running it stopped; submit it again"


def validate_job_id(job_id: str) -> str:
    if not JOB_ID.fullmatch(job_id):
        raise InvalidInputError(f"invalid job id {job_id!r}: job ids are 32 hexadecimal characters")
    return job_id


class JobStore:
    """The jobs table and the result files under `data_dir`. Its methods do blocking I/O: call them off the event
    loop."""

    def __init__(self, data_dir: Path, replica: str = "") -> None:
        self.data_dir, self.replica = data_dir, replica
        self.results = data_dir / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(data_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("""CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, model TEXT, request TEXT,
            state TEXT, done INTEGER, total INTEGER, error TEXT, created_at REAL, started_at REAL, finished_at REAL,
            result_bytes INTEGER, format TEXT, heartbeat_at REAL)""")
        present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, kind in _ADDED_COLUMNS.items():  # a data directory from before ownership and reservations
            if column not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self._db.close()

    def _row(self, row: tuple) -> Job:
        values = dict(zip(_COLUMNS, row))
        values["request"] = json.loads(values["request"])
        values["state"] = JobState(values["state"])
        return Job(**values)

    def create(self, model: str, request: dict[str, Any], total: int, output: str, owner: str = "",
               reserved_bytes: int = 0, limits: JobLimits | None = None) -> Job:
        """Insert a queued job, if it fits the limits (checked and inserted in one transaction, so concurrent
        submissions, from this replica or another, cannot all pass)."""
        now = time.time()
        job = Job(uuid.uuid4().hex, model, request, JobState.QUEUED, 0, total, None, now, None, None, None, output,
                  now, owner, reserved_bytes, self.replica)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if limits is not None:
                    self._admit(job, limits)
                self._db.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                                 (job.id, model, json.dumps(request), job.state, 0, total, None, now, None, None, None,
                                  output, now, owner, reserved_bytes, self.replica))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return job

    def _admit(self, job: Job, limits: JobLimits) -> None:
        def count(where: str, *args: Any) -> int:
            return self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE {_UNFINISHED}{where}", args).fetchone()[0]

        def held(where: str, *args: Any) -> int:
            return self._db.execute(f"SELECT {_HELD} FROM jobs{where}", args).fetchone()[0]

        if count("") >= limits.max_jobs:
            raise RateLimitedError(f"{limits.max_jobs} jobs are queued or running (SYNTHGEN_MAX_QUEUED_JOBS); submit "
                                   "again once some finished", retry_after_s=10)
        if job.owner and count(" AND owner = ?", job.owner) >= limits.max_jobs_per_owner:
            raise RateLimitedError(f"this API key has {limits.max_jobs_per_owner} jobs queued or running (SYNTHGEN_"
                                   "MAX_QUEUED_JOBS_PER_KEY); wait for one to finish", retry_after_s=10)
        checks = [("the jobs' disk quota", limits.quota_bytes, held(""), "SYNTHGEN_JOBS_QUOTA_BYTES")]
        if job.owner:
            checks.append(("this API key's disk quota", limits.quota_bytes_per_owner,
                           held(" WHERE owner = ?", job.owner), "SYNTHGEN_JOBS_QUOTA_BYTES_PER_KEY"))
        for what, quota, used, setting in checks:
            if used + job.reserved_bytes > quota:
                raise QuotaExceededError(f"{what} of {quota} bytes ({setting}) would be exceeded: {used} held by "
                                         f"results and unfinished jobs, up to {job.reserved_bytes} needed; download "
                                         "and delete finished jobs, or ask for fewer samples")

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job; with `owner`, only if that key owns it (another key's job is as absent as a missing one)."""
        validate_job_id(job_id)
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (owner is not None and self._row(row).owner != owner):
            raise NotFoundError(f"no job {job_id}; it may have expired or been deleted")
        return self._row(row)

    def list(self, owner: str, limit: int = 100) -> list[Job]:
        """The owner's jobs, newest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE owner = ? ORDER BY created_at "
                                    "DESC LIMIT ?", (owner, limit)).fetchall()
        return [self._row(row) for row in rows]

    def update(self, job_id: str, **fields: Any) -> None:
        assignments = ", ".join(f"{key} = ?" for key in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))

    def delete(self, job_id: str) -> None:
        """Delete the job and its files; a download already reading the result finishes (POSIX keeps an open
        file's data until it is closed)."""
        job = self.get(job_id)
        for folder in (self.result_dir(job), self.part_dir(job)):
            shutil.rmtree(folder, ignore_errors=True)
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def files(self, job: Job) -> list[tuple[str, int]]:
        """A finished job's files and their sizes: the data files by name, then the manifest sidecar if any."""
        try:
            entries = [(entry.name, entry.stat().st_size) for entry in os.scandir(self.result_dir(job))]
        except FileNotFoundError:
            return []
        return sorted(entries, key=lambda entry: (entry[0] == "manifest.json", entry[0]))

    def open_file(self, job: Job, name: str) -> IO[bytes]:
        """One file of the result opened for reading; NotFoundError if there is no such file (or it was deleted or
        expired meanwhile)."""
        if FILE_NAME.fullmatch(name):
            try:
                return (self.result_dir(job) / name).open("rb")
            except (FileNotFoundError, IsADirectoryError):
                pass
        raise NotFoundError(f"job {job.id} has no file {name!r} (it was deleted or expired, or never existed); its "
                            "files are listed in the job's `files`")

    def result_dir(self, job: Job) -> Path:
        return self.results / job.id

    def part_dir(self, job: Job) -> Path:
        return self.results / f"{job.id}.part"

    def fail_unfinished(self, job_ids: list[str] | None = None, stale_s: float | None = None,
                        replica: str | None = None) -> int:
        """Fail queued or running jobs (and drop their partial files): these ids, those whose runner stopped
        refreshing their heartbeat `stale_s` ago (a replica that crashed), or those `replica` ran (it restarted).
        Safe with replicas sharing the data directory: a live replica's jobs keep a fresh heartbeat."""
        query, args = f"SELECT id FROM jobs WHERE {_UNFINISHED}", []
        if stale_s is not None:
            query, args = query + " AND heartbeat_at < ?", [time.time() - stale_s]
        if replica is not None:
            query, args = query + " AND replica = ?", [*args, replica]
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        chosen = [job_id for (job_id,) in rows if job_ids is None or job_id in job_ids]
        for job_id in chosen:
            shutil.rmtree(self.part_dir(self.get(job_id)), ignore_errors=True)
            self.update(job_id, state=JobState.FAILED, error=INTERRUPTED, finished_at=time.time())
        return len(chosen)

    def beat(self, job_ids: list[str]) -> None:
        with self._lock:
            self._db.executemany("UPDATE jobs SET heartbeat_at = ? WHERE id = ?",
                                 [(time.time(), job_id) for job_id in job_ids])

    def expire(self, ttl_s: float) -> int:
        """Delete finished jobs (and their results) older than the TTL; returns how many."""
        cutoff = time.time() - ttl_s
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?",
                                    (cutoff,)).fetchall()
        for (job_id,) in rows:
            self.delete(job_id)
        return len(rows)


def estimate_bytes(plan: SamplePlan, model: SyntheticModel, output: str) -> int:
    """An upper bound of an archive's size, reserved against the quotas: a PNG is at most its raw rows (plus a
    filter byte each) and some overhead; a zip adds headers and a row of labels.csv and metadata.parquet per sample,
    Parquet its row, a tar a 512-byte header and padding per member (png, cls, json); plus the manifest with the
    model's card."""
    height, width, channels = model.image_shape
    if output == "npz":
        return len(plan) * (height * width * channels + 16) + 65_536
    raw = (width * channels + 1) * height
    png = raw + raw // 1024 + 128  # zlib's worst case (stored blocks) plus the PNG chunks
    per_sample = {"zip": png + 400, "parquet": png + 200}.get(output, png + 512 + 3 * 512 + 2 * 512)
    return len(plan) * per_sample + len(json.dumps(model.card)) + 65_536


def write_chunk(handle: IO[bytes], data: bytes) -> None:
    handle.write(data)


def _flush(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _failure(exc: Exception) -> str:
    """What a job's error says: the reason, never a server path."""
    if isinstance(exc, SynthgenError):
        return str(exc)
    if isinstance(exc, OSError):
        hint = "the disk is full" if exc.errno == errno.ENOSPC else "the result could not be written"
        return f"{hint} ({exc.strerror or type(exc).__name__}); the partial result was removed"
    return f"internal error ({type(exc).__name__}); the partial result was removed"


class JobRunner:
    """Runs this replica's jobs in the background: at most `max_concurrent_jobs` at a time, and at most
    `max_running_jobs_per_key` of one API key."""

    PROGRESS_EVERY_S = 0.5

    def __init__(self, store: JobStore, repository: ModelRepository, settings: Settings,
                 on_finished: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.store, self.repository, self.settings, self.on_finished = store, repository, settings, on_finished
        self.limits = JobLimits.from_settings(settings)
        self._slots = asyncio.Semaphore(settings.max_concurrent_jobs)
        self._owner_slots: dict[str, asyncio.Semaphore] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def submit(self, model: SyntheticModel, request: dict[str, Any], plan: SamplePlan, output: str,
                     owner: str) -> Job:
        """Admit the job (429 when the queue is full, 507 past a quota) and start it."""
        job = await asyncio.to_thread(self.store.create, model.name, request, len(plan), output, owner,
                                      estimate_bytes(plan, model, output), self.limits)
        self._tasks[job.id] = asyncio.get_running_loop().create_task(self._run(job, plan))
        return job

    async def cancel(self, job_id: str) -> None:
        task = self._tasks.pop(job_id, None)
        while task is not None and not task.done():  # again if a library swallowed the cancellation
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    async def heartbeat(self) -> None:
        """Refresh the heartbeat of this runner's jobs, so other replicas know they are alive."""
        while True:
            await asyncio.to_thread(self.store.beat, list(self._tasks))
            await asyncio.sleep(HEARTBEAT_S)

    async def close(self) -> None:
        """Stop: the jobs this runner was running are failed at once (a crash is caught at the next start, or by
        their stale heartbeat)."""
        running = list(self._tasks)
        for job_id in running:
            await self.cancel(job_id)
        await asyncio.to_thread(self.store.fail_unfinished, running)

    async def _update(self, job_id: str, **fields: Any) -> None:
        await asyncio.to_thread(self.store.update, job_id, **fields)

    async def _notify(self, job_id: str) -> None:
        if self.on_finished is not None:
            try:
                await self.on_finished(job_id)
            except Exception:  # a webhook problem never changes the job
                log.exception("the end of job %s could not be announced", job_id)

    async def _run(self, job: Job, plan: SamplePlan) -> None:
        part, final = self.store.part_dir(job), self.store.result_dir(job)
        owner_slot = self._owner_slots.setdefault(job.owner, asyncio.Semaphore(self.settings.max_running_jobs_per_key))
        try:
            async with owner_slot, self._slots, self.repository.serving(job.model) as served:
                await self._update(job.id, state=JobState.RUNNING, started_at=time.time())
                await asyncio.to_thread(part.mkdir, parents=True, exist_ok=True)
                handles: dict[str, IO[bytes]] = {}
                try:
                    written, done, reported = 0, 0, time.monotonic()
                    shard_size = job.request.get("shard_size") if job.format == "tar" else None
                    async for name, data in stream_export(served, plan, job.format, self.settings, shard_size):
                        written += len(data)
                        if written > job.reserved_bytes:
                            raise QuotaExceededError(f"the result passed the {job.reserved_bytes} bytes reserved for "
                                                     "it; the partial result was removed")
                        if name not in handles:
                            handles[name] = await asyncio.to_thread((part / name).open, "wb")
                        await asyncio.to_thread(write_chunk, handles[name], data)
                        done = min(done + self.settings.max_batch_size, len(plan))
                        if time.monotonic() - reported > self.PROGRESS_EVERY_S:
                            await self._update(job.id, done=done)
                            reported = time.monotonic()
                    for handle in handles.values():
                        await asyncio.to_thread(_flush, handle)
                finally:
                    for handle in handles.values():
                        handle.close()
                await asyncio.to_thread(part.replace, final)  # only a complete result carries the final name
                await self._update(job.id, state=JobState.SUCCEEDED, done=len(plan), finished_at=time.time(),
                                   result_bytes=written)
            await self._notify(job.id)
        except asyncio.CancelledError:
            shutil.rmtree(part, ignore_errors=True)
            raise
        except Exception as exc:  # every failure is recorded on the job, never lost
            shutil.rmtree(part, ignore_errors=True)
            log.error("job %s failed: %s", job.id, exc)
            await self._update(job.id, state=JobState.FAILED, error=_failure(exc), finished_at=time.time())
            await self._notify(job.id)
        finally:
            self._tasks.pop(job.id, None)

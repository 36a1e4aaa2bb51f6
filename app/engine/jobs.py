"""Asynchronous dataset jobs: persisted in SQLite (standard library) under the data directory, run in the
background through the same export code as the streamed route, written to a `.part` file and renamed only when
complete, so a half-written archive is never reported as succeeded.

After a restart, finished results are still there and interrupted jobs are marked failed. Results expire after a
TTL; a disk quota refuses new jobs (507) before the disk fills and fails a job that would pass it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.engine.exports import stream_export
from app.engine.plans import SamplePlan
from app.engine.repository import ModelRepository
from app.engine.states import JobState
from app.errors import InvalidInputError, NotFoundError, QuotaExceededError
from app.settings import Settings

log = logging.getLogger("synthgen.jobs")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


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

    @property
    def eta_s(self) -> float | None:
        if self.state != JobState.RUNNING or not self.started_at or not self.done:
            return None
        rate = self.done / max(time.time() - self.started_at, 1e-6)
        return (self.total - self.done) / rate


_COLUMNS = ("id", "model", "request", "state", "done", "total", "error", "created_at", "started_at", "finished_at",
            "result_bytes", "format", "heartbeat_at")
HEARTBEAT_S = 5.0
INTERRUPTED = "interrupted: the server running it stopped; submit it again"


def validate_job_id(job_id: str) -> str:
    if not JOB_ID.match(job_id):
        raise InvalidInputError(f"invalid job id {job_id!r}: job ids are 32 hexadecimal characters")
    return job_id


class JobStore:
    """The jobs table and the result files under `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.results = data_dir / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(data_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("""CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, model TEXT, request TEXT,
            state TEXT, done INTEGER, total INTEGER, error TEXT, created_at REAL, started_at REAL, finished_at REAL,
            result_bytes INTEGER, format TEXT, heartbeat_at REAL)""")

    def close(self) -> None:
        self._db.close()

    def _row(self, row: tuple) -> Job:
        values = dict(zip(_COLUMNS, row))
        values["request"] = json.loads(values["request"])
        values["state"] = JobState(values["state"])
        return Job(**values)

    def create(self, model: str, request: dict[str, Any], total: int, output: str) -> Job:
        now = time.time()
        job = Job(uuid.uuid4().hex, model, request, JobState.QUEUED, 0, total, None, now, None, None, None, output, now)
        with self._lock:
            self._db.execute(f"INSERT INTO jobs VALUES ({', '.join('?' * len(_COLUMNS))})",
                             (job.id, model, json.dumps(request), job.state, 0, total, None, job.created_at, None,
                              None, None, output, now))
        return job

    def get(self, job_id: str) -> Job:
        validate_job_id(job_id)
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job {job_id}; it may have expired or been deleted")
        return self._row(row)

    def update(self, job_id: str, **fields: Any) -> None:
        assignments = ", ".join(f"{key} = ?" for key in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))

    def delete(self, job_id: str) -> None:
        job = self.get(job_id)
        for path in (self.result_path(job), self.part_path(job)):
            path.unlink(missing_ok=True)
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def result_path(self, job: Job) -> Path:
        return self.results / f"{job.id}.{job.format}"

    def part_path(self, job: Job) -> Path:
        return self.results / f"{job.id}.{job.format}.part"

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.results.iterdir() if p.is_file())

    def fail_unfinished(self, job_ids: list[str] | None = None, stale_s: float | None = None) -> int:
        """Fail queued or running jobs (and drop their partial files): these ids, or those whose runner stopped
        refreshing their heartbeat `stale_s` ago (a replica that crashed). Safe with replicas sharing the data
        directory: a live replica's jobs keep a fresh heartbeat."""
        query = f"SELECT id FROM jobs WHERE state IN ('{JobState.QUEUED}', '{JobState.RUNNING}')"
        with self._lock:
            rows = self._db.execute(query + " AND heartbeat_at < ?", (time.time() - stale_s,)).fetchall() \
                if stale_s is not None else self._db.execute(query).fetchall()
        chosen = [job_id for (job_id,) in rows if job_ids is None or job_id in job_ids]
        for job_id in chosen:
            self.part_path(self.get(job_id)).unlink(missing_ok=True)
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


def estimate_bytes(plan: SamplePlan, image_shape: tuple[int, int, int], output: str) -> int:
    """A generous upper bound of an archive's size: raw pixels plus per-file overhead."""
    height, width, channels = image_shape
    per_sample = height * width * channels + (300 if output == "zip" else 1600 if output == "tar" else 16)
    return len(plan) * per_sample + 65_536


class JobRunner:
    """Runs queued jobs in the background, at most `concurrency` at a time."""

    def __init__(self, store: JobStore, repository: ModelRepository, settings: Settings) -> None:
        self.store, self.repository, self.settings = store, repository, settings
        self.quota_bytes = settings.jobs_quota_bytes
        self._slots = asyncio.Semaphore(settings.max_concurrent_jobs)
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def check_quota(self, needed: int) -> None:
        used = self.store.used_bytes()
        if used + needed > self.quota_bytes:
            raise QuotaExceededError(f"the jobs' disk quota of {self.quota_bytes} bytes would be exceeded ({used} "
                                     f"used, about {needed} needed); download and delete finished jobs first")

    def submit(self, job: Job, plan: SamplePlan) -> None:
        self._tasks[job.id] = asyncio.get_running_loop().create_task(self._run(job, plan))

    async def cancel(self, job_id: str) -> None:
        task = self._tasks.pop(job_id, None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def heartbeat(self) -> None:
        """Refresh the heartbeat of this runner's jobs, so other replicas know they are alive."""
        while True:
            await asyncio.to_thread(self.store.beat, list(self._tasks))
            await asyncio.sleep(HEARTBEAT_S)

    async def close(self) -> None:
        """Stop: the jobs this runner was running are failed at once (a crash is caught by their stale heartbeat)."""
        running = list(self._tasks)
        for job_id in running:
            await self.cancel(job_id)
        self.store.fail_unfinished(running)

    async def _run(self, job: Job, plan: SamplePlan) -> None:
        part, final = self.store.part_path(job), self.store.result_path(job)
        try:
            async with self._slots:
                served = self.repository.ready_model(job.model)
                self.store.update(job.id, state=JobState.RUNNING, started_at=time.time())
                written = 0
                with part.open("wb") as handle:
                    done = 0
                    async for data in stream_export(served, plan, job.format, self.settings):
                        written += len(data)
                        if self.store.used_bytes() + len(data) > self.quota_bytes:
                            raise QuotaExceededError(f"the jobs' disk quota of {self.quota_bytes} bytes was reached "
                                                     f"after {written} bytes; the partial result was removed")
                        await asyncio.to_thread(handle.write, data)
                        done = min(done + self.settings.max_batch_size, len(plan))
                        self.store.update(job.id, done=done)
                    await asyncio.to_thread(_flush, handle)
                part.replace(final)  # only a complete archive ever carries the final name
                self.store.update(job.id, state=JobState.SUCCEEDED, done=len(plan), finished_at=time.time(),
                                  result_bytes=final.stat().st_size)
        except asyncio.CancelledError:
            part.unlink(missing_ok=True)
            raise
        except Exception as exc:  # every failure is recorded on the job, never lost
            part.unlink(missing_ok=True)
            log.error("job %s failed: %s", job.id, exc)
            self.store.update(job.id, state=JobState.FAILED, error=str(exc), finished_at=time.time())
        finally:
            self._tasks.pop(job.id, None)


def _flush(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())

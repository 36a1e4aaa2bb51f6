"""The job store: job records in a SQL database (SQLite embedded by default, PostgreSQL for more than one
process; SQLAlchemy Core) and their results (`app.engine.results`: the data directory or an object store).

Admission is one transaction (serialized by a write lock on SQLite, an advisory lock on PostgreSQL): the queue
bound (429) and the disk quota (507), counted from results kept plus the reservation of every unfinished job,
globally and per key. Workers claim queued jobs (`FOR UPDATE SKIP LOCKED` on PostgreSQL) under a lease they renew;
a job whose lease ran out is claimed again by any worker and resumed from its checkpoint. A download holds its file
open, so deleting or expiring a result never truncates a download in progress. Methods block: call them off the
event loop."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa

from app.engine.results import LocalResults, S3Results
from app.engine.schema import JOBS, check, create_engine, database_url
from app.engine.states import JobState
from app.errors import InvalidInputError, NotFoundError, QuotaExceededError, RateLimitedError
from app.settings import Settings

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
UNFINISHED = (JobState.QUEUED, JobState.RUNNING)
TRAININGS_DIR = "trainings"  # training jobs' working folders, one per job, in the data directory
_ADMISSION_LOCK = 0x73796E74  # PostgreSQL advisory lock id for admission ("synt")


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
    heartbeat_at: float | None = None  # last lease renewal by the worker running it
    owner: str = ""  # the fingerprint of the API key that made it ("" in open mode)
    reserved_bytes: int = 0  # an upper bound of the result's size, counted against the quotas until it finishes
    replica: str = ""  # the worker holding its lease
    lease_until: float | None = None
    attempts: int = 0  # claims so far
    checkpoint: dict[str, Any] | None = None  # what a worker taking it over resumes from
    kind: str = "dataset"  # or "training"
    progress: dict[str, Any] | None = None  # a training's epoch, step, losses and ETA

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
    max_trainings_per_owner: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> JobLimits:
        return cls(settings.max_queued_jobs, settings.max_queued_jobs_per_key, settings.jobs_quota_bytes,
                   settings.jobs_quota_bytes_per_key, settings.max_trainings_per_key)


def validate_job_id(job_id: str) -> str:
    if not JOB_ID.fullmatch(job_id):
        raise InvalidInputError(f"invalid job id {job_id!r}: job ids are 32 hexadecimal characters")
    return job_id


def _unfinished() -> sa.ColumnElement[bool]:
    return JOBS.c.state.in_([str(state) for state in UNFINISHED])


def _held() -> sa.ColumnElement[int]:
    """Bytes jobs hold: a result once succeeded, a reservation while unfinished."""
    return sa.func.coalesce(sa.func.sum(sa.case(
        (JOBS.c.state == str(JobState.SUCCEEDED), JOBS.c.result_bytes),
        (_unfinished(), JOBS.c.reserved_bytes), else_=0)), 0)


class JobStore:
    """Job records at `url` (schema checked first; SQLite upgraded in place) and results under `data_dir`."""

    def __init__(self, data_dir: Path, url: str | None = None, storage: LocalResults | S3Results | None = None
                 ) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.storage = storage or LocalResults(data_dir / "results")
        self.engine = create_engine(database_url(url, data_dir))
        self.postgres = self.engine.dialect.name == "postgresql"
        check(self.engine, auto_upgrade=not self.postgres)

    def close(self) -> None:
        self.engine.dispose()

    @staticmethod
    def _job(row: sa.Row) -> Job:
        values = dict(row._mapping)
        values["request"] = json.loads(values["request"])
        values["checkpoint"] = json.loads(values["checkpoint"]) if values["checkpoint"] else None
        values["progress"] = json.loads(values["progress"]) if values["progress"] else None
        values["state"] = JobState(values["state"])
        return Job(**values)

    def create(self, model: str, request: dict[str, Any], total: int, output: str, owner: str = "",
               reserved_bytes: int = 0, limits: JobLimits | None = None, kind: str = "dataset") -> Job:
        """Insert a queued job, if it fits the limits (checked and inserted in one serialized transaction, so
        concurrent submissions, from this process or another, cannot all pass)."""
        now = time.time()
        job = Job(uuid.uuid4().hex, model, request, JobState.QUEUED, 0, total, None, now, None, None, None, output,
                  None, owner, reserved_bytes, kind=kind)
        with self.engine.begin() as db:
            if self.postgres:
                db.execute(sa.select(sa.func.pg_advisory_xact_lock(_ADMISSION_LOCK)))
            if limits is not None:
                self._admit(db, job, limits)
            db.execute(JOBS.insert().values(
                id=job.id, model=model, request=json.dumps(request), state=str(job.state), done=0, total=total,
                created_at=now, format=output, owner=owner, reserved_bytes=reserved_bytes, replica="", attempts=0,
                kind=kind))
        return job

    @staticmethod
    def _admit(db: sa.Connection, job: Job, limits: JobLimits) -> None:
        def count(*where: sa.ColumnElement[bool]) -> int:
            return db.execute(sa.select(sa.func.count()).where(_unfinished(), *where)).scalar_one()

        def held(*where: sa.ColumnElement[bool]) -> int:
            return int(db.execute(sa.select(_held()).where(*where)).scalar_one())

        if count() >= limits.max_jobs:
            raise RateLimitedError(f"{limits.max_jobs} jobs are queued or running (SYNTHGEN_MAX_QUEUED_JOBS); submit "
                                   "again once some finished", retry_after_s=10)
        if job.owner and count(JOBS.c.owner == job.owner) >= limits.max_jobs_per_owner:
            raise RateLimitedError(f"this API key has {limits.max_jobs_per_owner} jobs queued or running (SYNTHGEN_"
                                   "MAX_QUEUED_JOBS_PER_KEY); wait for one to finish", retry_after_s=10)
        if job.kind == "training" and count(JOBS.c.owner == job.owner, JOBS.c.kind == "training") >= \
                limits.max_trainings_per_owner:
            raise RateLimitedError(f"this API key has {limits.max_trainings_per_owner} training(s) queued or running "
                                   "(SYNTHGEN_MAX_TRAININGS_PER_KEY); wait for one to finish or cancel it",
                                   retry_after_s=60)
        checks = [("the jobs' disk quota", limits.quota_bytes, held(), "SYNTHGEN_JOBS_QUOTA_BYTES")]
        if job.owner:
            checks.append(("this API key's disk quota", limits.quota_bytes_per_owner,
                           held(JOBS.c.owner == job.owner), "SYNTHGEN_JOBS_QUOTA_BYTES_PER_KEY"))
        for what, quota, used, setting in checks:
            if used + job.reserved_bytes > quota:
                raise QuotaExceededError(f"{what} of {quota} bytes ({setting}) would be exceeded: {used} held by "
                                         f"results and unfinished jobs, up to {job.reserved_bytes} needed; download "
                                         "and delete finished jobs, or ask for fewer samples")

    def get(self, job_id: str, owner: str | None = None, kind: str | None = None) -> Job:
        """The job; with `owner`, only if that key owns it (another key's job is as absent as a missing one); with
        `kind`, only a job of that kind."""
        validate_job_id(job_id)
        with self.engine.connect() as db:
            row = db.execute(sa.select(JOBS).where(JOBS.c.id == job_id)).first()
        if row is None or (owner is not None and row.owner != owner) or (kind is not None and row.kind != kind):
            what = "training" if kind == "training" else "job"
            raise NotFoundError(f"no {what} {job_id}; it may have expired or been deleted")
        return self._job(row)

    def list(self, owner: str, limit: int = 100, kind: str = "dataset") -> list[Job]:
        """The owner's jobs of one kind, newest first."""
        with self.engine.connect() as db:
            rows = db.execute(sa.select(JOBS).where(JOBS.c.owner == owner, JOBS.c.kind == kind)
                              .order_by(JOBS.c.created_at.desc()).limit(limit)).all()
        return [self._job(row) for row in rows]

    def requests(self, kind: str) -> list[dict[str, Any]]:
        """The requests of every job of one kind, of every owner and state."""
        with self.engine.connect() as db:
            return [json.loads(text) for text in db.execute(sa.select(JOBS.c.request).where(JOBS.c.kind == kind))
                    .scalars()]

    def update(self, job_id: str, worker: str | None = None, **fields: Any) -> bool:
        """Set fields (a checkpoint as a dict); with `worker`, only while that worker holds the job's lease.
        Returns whether a row was changed."""
        for name in ("checkpoint", "progress"):
            if name in fields:
                fields[name] = json.dumps(fields[name]) if fields[name] is not None else None
        if "state" in fields:
            fields["state"] = str(fields["state"])
        query = JOBS.update().where(JOBS.c.id == job_id).values(**fields)
        if worker is not None:
            query = query.where(JOBS.c.replica == worker, JOBS.c.state == str(JobState.RUNNING))
        with self.engine.begin() as db:
            return db.execute(query).rowcount == 1

    def claim(self, worker: str, lease_s: float, per_owner: int, kind: str = "dataset") -> Job | None:
        """Take the oldest queued job of `kind`, or a running one whose lease ran out (its worker died), whose owner
        has fewer than `per_owner` jobs of that kind running; it becomes this worker's for `lease_s` seconds."""
        now = time.time()
        live = sa.and_(JOBS.c.state == str(JobState.RUNNING), JOBS.c.lease_until >= now, JOBS.c.kind == kind)
        busy = sa.select(JOBS.c.owner).where(live).group_by(JOBS.c.owner).having(sa.func.count() >= per_owner)
        claimable = sa.and_(JOBS.c.kind == kind, sa.or_(
            JOBS.c.state == str(JobState.QUEUED),
            sa.and_(JOBS.c.state == str(JobState.RUNNING), JOBS.c.lease_until < now)))
        query = (sa.select(JOBS.c.id).where(claimable, JOBS.c.owner.not_in(busy))
                 .order_by(JOBS.c.created_at).limit(1))
        if self.postgres:
            query = query.with_for_update(skip_locked=True)
        with self.engine.begin() as db:
            job_id = db.execute(query).scalar_one_or_none()
            if job_id is None:
                return None
            claimed = db.execute(JOBS.update().where(JOBS.c.id == job_id, claimable).values(
                state=str(JobState.RUNNING), replica=worker, lease_until=now + lease_s, heartbeat_at=now,
                started_at=sa.func.coalesce(JOBS.c.started_at, now), attempts=JOBS.c.attempts + 1)).rowcount
            row = db.execute(sa.select(JOBS).where(JOBS.c.id == job_id)).first() if claimed else None
        return self._job(row) if row is not None else None

    def renew(self, worker: str, job_ids: list[str], lease_s: float) -> set[str]:
        """Extend this worker's leases; returns the ids it still holds (a job deleted or taken over is not)."""
        if not job_ids:
            return set()
        now = time.time()
        held = sa.and_(JOBS.c.id.in_(job_ids), JOBS.c.replica == worker, JOBS.c.state == str(JobState.RUNNING))
        with self.engine.begin() as db:
            db.execute(JOBS.update().where(held).values(lease_until=now + lease_s, heartbeat_at=now))
            return set(db.execute(sa.select(JOBS.c.id).where(held)).scalars())

    def release_dead(self, replica: str, alive: Callable[[int], bool]) -> int:
        """Hand back to the queue the jobs of this replica's processes that are gone (killed: their leases would
        otherwise hold the jobs until they run out). Workers are named `<replica>:<pid>`."""
        running = sa.and_(JOBS.c.state == str(JobState.RUNNING), JOBS.c.replica.startswith(f"{replica}:"))
        with self.engine.begin() as db:
            holders = db.execute(sa.select(JOBS.c.id, JOBS.c.replica).where(running)).all()
            dead = [(job_id, holder) for job_id, holder in holders
                    if holder.rsplit(":", 1)[1].isdigit() and not alive(int(holder.rsplit(":", 1)[1]))]
            for job_id, holder in dead:
                db.execute(JOBS.update().where(JOBS.c.id == job_id, JOBS.c.replica == holder)
                           .values(state=str(JobState.QUEUED), replica="", lease_until=None))
        return len(dead)

    def delete(self, job_id: str) -> None:
        """Delete the job and its files; a download already reading the result finishes (POSIX keeps an open
        file's data until it is closed; an object store finishes a GET in progress)."""
        self.get(job_id)
        self.storage.delete(job_id)
        shutil.rmtree(self.data_dir / TRAININGS_DIR / job_id, ignore_errors=True)
        with self.engine.begin() as db:
            db.execute(JOBS.delete().where(JOBS.c.id == job_id))

    def files(self, job: Job) -> list[tuple[str, int]]:
        """A finished job's files and their sizes: the data files by name, then the manifest sidecar if any."""
        return sorted(self.storage.files(job.id), key=lambda entry: (entry[0] == "manifest.json", entry[0]))

    def open_file(self, job: Job, name: str) -> tuple[IO[bytes], int]:
        """One file of the result opened for reading, and its size; NotFoundError if there is no such file (or it
        was deleted or expired meanwhile)."""
        if not FILE_NAME.fullmatch(name):
            raise NotFoundError(f"job {job.id} has no file {name!r}; its files are listed in the job's `files`")
        return self.storage.open(job.id, name)

    def fail_exhausted(self, max_attempts: int) -> int:
        """Fail jobs whose lease ran out after `max_attempts` claims (a job that kills its workers)."""
        now = time.time()
        with self.engine.begin() as db:
            rows = db.execute(sa.select(JOBS.c.id).where(
                JOBS.c.state == str(JobState.RUNNING), JOBS.c.lease_until < now,
                JOBS.c.attempts >= max_attempts)).scalars().all()
        for job_id in rows:
            self.storage.delete(job_id)
            self.update(job_id, state=JobState.FAILED, finished_at=time.time(),
                        error=f"interrupted {max_attempts} times (its workers stopped or crashed); submit it again")
        return len(rows)

    def expire(self, ttl_s: float) -> int:
        """Delete finished jobs (and their results) older than the TTL; returns how many."""
        cutoff = time.time() - ttl_s
        with self.engine.connect() as db:
            rows = db.execute(sa.select(JOBS.c.id).where(JOBS.c.finished_at.is_not(None),
                                                          JOBS.c.finished_at < cutoff)).scalars().all()
        for job_id in rows:
            with contextlib.suppress(NotFoundError):  # another process expired it first
                self.delete(job_id)
        return len(rows)

    def queue_stats(self) -> dict[str, float]:
        """For metrics: jobs queued and running, and the age of the oldest queued job."""
        with self.engine.connect() as db:
            counts = dict(db.execute(sa.select(JOBS.c.state, sa.func.count()).where(_unfinished())
                                     .group_by(JOBS.c.state)).all())
            oldest = db.execute(sa.select(sa.func.min(JOBS.c.created_at))
                                .where(JOBS.c.state == str(JobState.QUEUED))).scalar_one()
        return {"queued": counts.get(str(JobState.QUEUED), 0), "running": counts.get(str(JobState.RUNNING), 0),
                "oldest_queued_s": time.time() - oldest if oldest else 0.0}

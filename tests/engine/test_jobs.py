"""The job store alone, on each backend (SQLite and a real PostgreSQL server): expiry, claims and leases, the
per-key running bound, admission, and the schema check."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.engine.jobstore import JobLimits, JobStore
from app.engine.schema import check, create_engine
from app.errors import RateLimitedError, SchemaError


@pytest.fixture
def store(tmp_path: Path, database_url: str | None):
    store = JobStore(tmp_path, database_url)
    yield store
    store.close()


def test_finished_results_expire_after_the_ttl(store: JobStore) -> None:
    job = store.create("m", {"n": 1}, 1, "zip")
    writer = store.storage.writer(job.id)
    writer.open("m-seed0.zip")
    writer.write(b"archive")
    writer.close_file()
    writer.commit()
    assert store.files(job) == [("m-seed0.zip", 7)]
    store.update(job.id, state="succeeded", finished_at=time.time() - 100)
    running = store.create("m", {"n": 1}, 1, "zip")
    assert store.expire(ttl_s=50) == 1
    assert store.files(job) == []
    assert store.get(running.id).state == "queued"  # unfinished jobs never expire


def test_a_job_whose_lease_ran_out_is_claimed_again(store: JobStore) -> None:
    first, second = store.create("m", {"n": 1}, 1, "tar"), store.create("m", {"n": 1}, 1, "tar")
    assert store.claim("w1", lease_s=30, per_owner=5).id == first.id  # oldest first
    assert store.claim("w2", lease_s=0.2, per_owner=5).id == second.id
    assert store.claim("w3", lease_s=30, per_owner=5) is None  # both leased
    store.update(first.id, "w1", checkpoint={"files": {"a.tar": 10}, "next": 5})
    time.sleep(0.3)  # w2 stalls: its lease runs out
    taken = store.claim("w3", lease_s=30, per_owner=5)
    assert taken.id == second.id and taken.attempts == 2 and taken.replica == "w3"
    assert store.renew("w2", [second.id], 30) == set()  # w2 has lost it: it must stop writing
    assert not store.update(second.id, "w2", done=1)  # and cannot report on it
    assert store.renew("w1", [first.id], 30) == {first.id}
    assert store.get(first.id).checkpoint == {"files": {"a.tar": 10}, "next": 5}
    store.delete(first.id)
    assert store.renew("w1", [first.id], 30) == set()  # deleted: the worker stops it


def test_one_key_runs_at_most_its_bound_across_workers(store: JobStore) -> None:
    jobs = [store.create("m", {"n": 1}, 1, "zip", owner=owner) for owner in ("a", "a", "b")]
    assert store.claim("w1", 30, per_owner=1).id == jobs[0].id
    assert store.claim("w2", 30, per_owner=1).id == jobs[2].id  # a's second job waits for its first
    assert store.claim("w3", 30, per_owner=1) is None
    assert store.queue_stats()["queued"] == 1 and store.queue_stats()["running"] == 2


def test_admission_bounds_the_queue(store: JobStore) -> None:
    limits = JobLimits(max_jobs=2, max_jobs_per_owner=1)
    store.create("m", {"n": 1}, 1, "zip", owner="a", limits=limits)
    with pytest.raises(RateLimitedError, match="this API key"):
        store.create("m", {"n": 1}, 1, "zip", owner="a", limits=limits)
    store.create("m", {"n": 1}, 1, "zip", owner="b", limits=limits)
    with pytest.raises(RateLimitedError, match="2 jobs are queued"):
        store.create("m", {"n": 1}, 1, "zip", owner="c", limits=limits)


def test_a_schema_it_does_not_know_is_refused(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    check(engine, auto_upgrade=True)  # the embedded default migrates itself
    with engine.begin() as db:
        db.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaError, match="does not know"):
        JobStore(tmp_path)
    engine.dispose()


def test_postgresql_is_never_migrated_behind_the_operators_back(postgres, tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="synthgen db upgrade"):
        JobStore(tmp_path, postgres.database())  # a fresh database: the schema is missing

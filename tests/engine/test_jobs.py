"""The job store alone: expiry and heartbeats of replicas sharing a data directory."""

from __future__ import annotations

import time
from pathlib import Path

from app.engine.jobs import JobStore


def test_finished_results_expire_after_the_ttl(tmp_path: Path) -> None:


    store = JobStore(tmp_path)
    job = store.create("m", {"n": 1}, 1, "zip")
    store.result_dir(job).mkdir()
    (store.result_dir(job) / "m-seed0.zip").write_bytes(b"archive")
    store.update(job.id, state="succeeded", finished_at=time.time() - 100)
    running = store.create("m", {"n": 1}, 1, "zip")
    assert store.expire(ttl_s=50) == 1
    assert not store.result_dir(job).exists()
    assert store.get(running.id).state == "queued"  # unfinished jobs never expire
    store.close()

def test_crashed_replicas_jobs_fail_once_their_heartbeat_is_stale(tmp_path: Path) -> None:


    store = JobStore(tmp_path)
    crashed, alive = store.create("m", {"n": 1}, 1, "zip"), store.create("m", {"n": 1}, 1, "zip")
    for job in (crashed, alive):
        store.update(job.id, state="running")
        store.part_dir(job).mkdir()
        (store.part_dir(job) / "m-seed0.zip").write_bytes(b"partial")
    store.update(crashed.id, heartbeat_at=time.time() - 120)
    store.beat([alive.id])
    assert store.fail_unfinished(stale_s=30) == 1
    assert store.get(crashed.id).state == "failed" and not store.part_dir(crashed).exists()
    assert store.get(alive.id).state == "running" and store.part_dir(alive).exists()  # another replica's job
    store.close()

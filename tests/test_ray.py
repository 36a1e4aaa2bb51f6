"""synthgen on a real two-node Ray cluster on 127.0.0.1 (head and worker started with `ray start` as separate
processes): sharded exports with the bytes of one process and of a tar job, also when the worker node dies
mid-export (the module's last test); the API as a Ray Serve deployment, batching concurrent requests and answering
them byte for byte as `synthgen serve` does."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.core.model import load_model
from app.engine.plans import plan_samples
from app.engine.shards import shards_of, write_manifest, write_shard
from tests.conftest import ROOT, serve
from tests.helpers import wait_for_job

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray[data]'; make install does)")
RAY = Path(sys.executable).parent / "ray"


def _sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def _local_export(folder: Path, out: Path, per_class: int, shard_size: int) -> dict[str, str]:
    model = load_model(folder, "cpu")
    plan = plan_samples(model, per_class=per_class, seed=0, max_samples=sys.maxsize, scope="test")
    out.mkdir(parents=True)
    write_manifest(model, plan, [write_shard(model, plan, s, shard_size, out) for s in shards_of(plan, shard_size)],
                   out)
    return _sha256s(out)


@pytest.mark.anyio
async def test_shards_written_alone_are_the_tar_jobs_shards(tmp_path: Path, models_dir: Path) -> None:
    local = _local_export(models_dir / "digits-gan", tmp_path / "local", per_class=25, shard_size=60)
    assert len(local) == 5  # 250 samples: four shards of 60 and one of 10
    async with serve(models_dir) as client:
        submitted = await client.post("/v1/jobs", json={"model": "digits-gan", "per_class": 25, "seed": 0,
                                                        "format": "tar", "shard_size": 60})
        job = await wait_for_job(client, submitted.json()["id"], timeout_s=60)
        for file in job["files"]:
            if file["name"].endswith(".tar"):
                data = (await client.get(file["url"])).content
                assert hashlib.sha256(data).hexdigest() == local[file["name"]], file["name"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node(*arguments: str) -> subprocess.Popen:
    """A Ray node in the foreground (`ray start --block`) in its own process group, so it can be killed whole."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([str(RAY), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                             *arguments], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _active_nodes(address: str) -> int:
    status = subprocess.run([str(RAY), "status", "--address", address], capture_output=True, text=True).stdout
    return len(re.findall(r"^ 1 node_", status.split("Pending:")[0], re.M))


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and a worker node on 127.0.0.1 for this module (its last test kills the worker node): yields
    (address, worker process)."""
    port = _free_port()
    head = _node("--head", "--port", str(port), "--include-dashboard", "false", "--disable-usage-stats")
    address, worker = f"127.0.0.1:{port}", None
    try:
        deadline = time.monotonic() + 60
        while _active_nodes(address) < 1:
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        worker = _node("--address", address)
        while _active_nodes(address) < 2:
            assert worker.poll() is None and time.monotonic() < deadline, "the Ray worker node did not join"
            time.sleep(0.5)
        yield address, worker
    finally:
        for node in (worker, head):  # every process of a node is in its group (a graceful stop takes 35 s)
            if node is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGKILL)
                node.wait()


def _ray_export(folder: Path, out: Path, address: str, per_class: int, shard_size: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", "export", "--model", str(folder), "--per-class",
                           str(per_class), "--seed", "0", "--shard-size", str(shard_size), "--out", str(out), "--ray",
                           address, "--actors", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_sharded_export_on_a_ray_cluster_has_the_bytes_of_one_process(tmp_path: Path, tiny_gan: Path,
                                                                        ray_cluster) -> None:
    address, _ = ray_cluster
    local = _local_export(tiny_gan, tmp_path / "local", per_class=300, shard_size=500)
    run = _ray_export(tiny_gan, tmp_path / "ray", address, per_class=300, shard_size=500)
    assert run.returncode == 0, run.stderr[-3000:]
    assert '"nodes": 2' in run.stdout and '"shards": 6' in run.stdout, run.stdout
    assert _sha256s(tmp_path / "ray") == local
    assert (tmp_path / "ray" / "manifest.json").read_text() == (tmp_path / "local" / "manifest.json").read_text()


@pytest.mark.anyio
async def test_the_api_on_ray_serve_batches_and_answers_as_synthgen_serve(tmp_path: Path, models_dir: Path,
                                                                         ray_cluster) -> None:
    from ray import serve as ray_serve

    from app.api.ray_serve import build

    address, _ = ray_cluster
    port = _free_port()
    ray.init(address=address, log_to_driver=False)
    try:
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        ray_serve.run(build({"models_dir": str(models_dir), "data_dir": str(tmp_path / "serve-data"), "device": "cpu",
                             "max_batch_wait_ms": 20, "max_replicas": 1, "num_cpus": 0.5}), name="synthgen",
                      route_prefix="/")
        bodies = [{"n": 3, "seed": seed, "label": seed % 10, "format": "npz"} for seed in range(24)]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            answers = await asyncio.gather(*(client.post("/v1/models/digits-gan/generate", json=body)
                                             for body in bodies))
            metrics = (await client.get("/metrics")).text
        ray_serve.delete("synthgen")
    finally:
        ray_serve.shutdown()
        ray.shutdown()
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers if a.status_code != 200]
    passes = float(re.search(r'^synthgen_forward_passes_total\{model="digits-gan"\} (\S+)$', metrics, re.M).group(1))
    assert passes < len(bodies)  # concurrent requests were packed into shared forward passes
    async with serve(models_dir) as client:  # the same requests to the app as `synthgen serve` runs it
        for body, answer in zip(bodies, answers):
            reference = await client.post("/v1/models/digits-gan/generate", json=body)
            assert reference.content == answer.content


@pytest.mark.anyio
async def test_a_tar_job_runs_on_ray_with_the_bytes_of_one_process(tmp_path: Path, models_dir: Path,
                                                                   ray_cluster) -> None:
    """SYNTHGEN_RAY_ADDRESS: a sharded tar job submitted to the API is generated on the cluster, its progress in the
    job store like any job's."""
    address, _ = ray_cluster
    local = _local_export(models_dir / "digits-gan", tmp_path / "local", per_class=100, shard_size=250)
    async with serve(models_dir, ray_address=address, ray_actors=2) as client:
        submitted = await client.post("/v1/jobs", json={"model": "digits-gan", "per_class": 100, "seed": 0,
                                                        "format": "tar", "shard_size": 250})
        job = await wait_for_job(client, submitted.json()["id"], timeout_s=180)
        assert job["state"] == "succeeded" and job["done"] == job["total"] == 1000, job
        shards = {file["name"]: hashlib.sha256((await client.get(file["url"])).content).hexdigest()
                  for file in job["files"] if file["name"].endswith(".tar")}
        manifest = (await client.get(f"/v1/jobs/{job['id']}/files/manifest.json")).json()
    assert shards == local
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == local


def test_a_worker_node_killed_mid_export_changes_no_byte(tmp_path: Path, tiny_gan: Path, ray_cluster) -> None:
    address, worker = ray_cluster
    local = _local_export(tiny_gan, tmp_path / "local", per_class=2000, shard_size=1000)
    out = tmp_path / "ray"
    result: dict = {}
    export = threading.Thread(target=lambda: result.update(run=_ray_export(tiny_gan, out, address, 2000, 1000)))
    export.start()
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.tar"))) < 2:  # the export is under way on both nodes
        assert export.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGKILL)  # the node's raylet and workers die at once
    export.join(timeout=300)
    run = result["run"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list(out.glob("*.tar"))) == 20 and not list(out.glob("*.part"))
    assert _sha256s(out) == local

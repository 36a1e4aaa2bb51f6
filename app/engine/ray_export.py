"""Sharded dataset generation on Ray Data: the shards of a plan (`app.engine.shards`) are the rows of a Ray dataset,
mapped by a pool of actors that each load the model once (on a GPU when they are given one) and write their shards
to a folder every node sees (a shared filesystem; each shard written aside and renamed). A task lost with its node
is run again by Ray on another; the shard comes out with the same bytes. Ray is imported only here."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.core.model import load_model
from app.engine.plans import SamplePlan
from app.engine.shards import Shard, shards_of, write_manifest, write_shard

log = logging.getLogger("synthgen.ray")


class ShardWriter:
    """A Ray Data actor: one model, loaded once, writing the shards of the rows it is given."""

    def __init__(self, folder: str, name: str, plan: SamplePlan, shard_size: int, out: str, device: str) -> None:
        self.model = load_model(folder, device, name)
        self.plan, self.shard_size, self.out = plan, shard_size, Path(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        written = [write_shard(self.model, self.plan, Shard(int(number), int(start), int(stop)), self.shard_size,
                               self.out)
                   for number, start, stop in zip(batch["number"], batch["start"], batch["stop"])]
        return {key: [w[key] for w in written] for key in ("name", "bytes", "sha256")}


def done_shards(out: Path) -> int:
    """Shards complete so far in `out` (each appears under its name only once written whole)."""
    return sum(1 for _ in out.glob("*.tar"))


def export_on_ray(address: str, folder: Path, plan: SamplePlan, shard_size: int, out: Path, actors: int = 2,
                  gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0) -> dict[str, Any]:
    """Write the plan's shards and manifest into `out` on the Ray cluster at `address`; returns a summary."""
    import ray

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(folder, "cpu")
    shards = shards_of(plan, shard_size)
    ray.init(address=address, log_to_driver=False, ignore_reinit_error=True)
    try:
        rows = ray.data.from_items([{"number": s.number, "start": s.start, "stop": s.stop} for s in shards],
                                   override_num_blocks=len(shards))
        device = "cuda" if gpus_per_actor else "cpu"
        written = rows.map_batches(ShardWriter, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                                   num_gpus=gpus_per_actor,
                                   num_cpus=cpus_per_actor, max_restarts=-1, max_task_retries=-1,
                                   fn_constructor_args=(str(folder), model.name, plan, shard_size, str(out), device),
                                   ).take_all()
        nodes = len([node for node in ray.nodes() if node["Alive"]])
    finally:
        ray.shutdown()
    by_name = sorted(written, key=lambda row: row["name"])
    manifest = write_manifest(model, plan, by_name, out)
    return {"shards": len(by_name), "samples": len(plan), "seconds": round(time.perf_counter() - started, 1),
            "nodes": nodes, "manifest": str(manifest)}

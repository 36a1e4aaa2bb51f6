"""A dataset as WebDataset shards written independently: shard k holds the samples of indices [k·S, (k+1)·S), and
samples are a pure function of (model, seed, index), so any process on any machine writes shard k with the same
bytes, and a shard that failed is simply written again. The same shards as a tar job's (`POST /v1/jobs`)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.model import SyntheticModel
from app.core.sampling import sample
from app.engine.archives import WebDatasetShards
from app.engine.exports import export_name
from app.engine.plans import SamplePlan, build_manifest

BATCH = 256


@dataclass(frozen=True)
class Shard:
    """Shard `number` of a plan: samples `start` to `stop` - 1."""

    number: int
    start: int
    stop: int


def shards_of(plan: SamplePlan, shard_size: int) -> list[Shard]:
    return [Shard(k, k * shard_size, min((k + 1) * shard_size, len(plan)))
            for k in range(math.ceil(len(plan) / shard_size))]


def shard_name(model: SyntheticModel, plan: SamplePlan, number: int) -> str:
    return f"{export_name(model.name, plan.seed)}-{number:06d}.tar"


def write_shard(model: SyntheticModel, plan: SamplePlan, shard: Shard, shard_size: int, out: Path) -> dict[str, Any]:
    """Generate one shard into `out` (written aside, then renamed); returns its name, size and sha256."""
    writer = WebDatasetShards(model.class_names, plan.seed, model.name, export_name(model.name, plan.seed),
                              shard_size, first_shard=shard.number)
    name = shard_name(model, plan, shard.number)
    part, digest, size = out / f"{name}.part", hashlib.sha256(), 0
    with part.open("wb") as handle:
        for first in range(shard.start, shard.stop, BATCH):
            last = min(first + BATCH, shard.stop)
            images, labels = sample(model, plan.seed, plan.labels(first, last), plan.truncation, start_index=first)
            for piece_name, data in writer.add(images, labels, range(first, last)):
                assert piece_name == name
                handle.write(data)
                digest.update(data)
                size += len(data)
        for _, data in writer.finish(None):
            handle.write(data)
            digest.update(data)
            size += len(data)
    part.replace(out / name)
    return {"name": name, "bytes": size, "sha256": digest.hexdigest()}


def write_manifest(model: SyntheticModel, plan: SamplePlan, shards: list[dict[str, Any]], out: Path) -> Path:
    """`manifest.json` beside the shards: the tar job's manifest, with every shard's size and sha256."""
    manifest = {**build_manifest(model, plan, "tar"), "seed": plan.seed, "count": len(plan),
                "shards": [s["name"] for s in shards], "files": {s["name"]: {"bytes": s["bytes"], "sha256": s["sha256"]}
                                                                   for s in shards}}
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    return path

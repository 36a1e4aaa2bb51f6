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

import numpy as np

from app.core.model import SyntheticModel
from app.core.sampling import sample
from app.engine.archives import WebDatasetShards
from app.engine.exports import export_name
from app.engine.plans import SamplePlan, build_manifest
from app.errors import InvalidInputError

BATCH = 256


@dataclass(frozen=True)
class Shard:
    """Shard `number` of a plan: samples `start` to `stop` - 1."""

    number: int
    start: int
    stop: int


def shards_of(plan: SamplePlan, shard_size: int) -> list[Shard]:
    if shard_size < 1:
        raise InvalidInputError(f"the shard size must be at least 1 sample, not {shard_size}")
    return [Shard(k, k * shard_size, min((k + 1) * shard_size, len(plan)))
            for k in range(math.ceil(len(plan) / shard_size))]


def generate_shard(model: SyntheticModel, plan: SamplePlan, shard: Shard) -> tuple[np.ndarray, np.ndarray]:
    """The shard's samples (uint8 images, labels), generated in batches."""
    parts = [sample(model, plan.seed, plan.labels(first, min(first + BATCH, shard.stop)), plan.truncation,
                    start_index=first) for first in range(shard.start, shard.stop, BATCH)]
    return np.concatenate([images for images, _ in parts]), np.concatenate([labels for _, labels in parts])


def encode_shard(class_names: list[str], model_name: str, plan: SamplePlan, shard: Shard, shard_size: int,
                 images: np.ndarray, labels: np.ndarray, out: Path) -> dict[str, Any]:
    """Encode a shard's samples into its tar in `out` (written aside, then renamed); returns its name, size and
    sha256."""
    prefix = export_name(model_name, plan.seed)
    writer = WebDatasetShards(class_names, plan.seed, model_name, prefix, shard_size, start=shard.start)
    pieces = writer.add(images, labels, range(shard.start, shard.stop)) + writer.finish(None)
    data = b"".join(piece for _, piece in pieces)
    name = f"{prefix}-{shard.number:06d}.tar"
    part = out / f"{name}.part"
    part.write_bytes(data)
    part.replace(out / name)
    return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_shard(model: SyntheticModel, plan: SamplePlan, shard: Shard, shard_size: int, out: Path) -> dict[str, Any]:
    """Generate and encode one shard in this process."""
    images, labels = generate_shard(model, plan, shard)
    return encode_shard(model.class_names, model.name, plan, shard, shard_size, images, labels, out)


def write_manifest(model: SyntheticModel, plan: SamplePlan, shards: list[dict[str, Any]], out: Path) -> Path:
    """`manifest.json` beside the shards: the tar job's manifest, with every shard's size and sha256."""
    manifest = {**build_manifest(model, plan, "tar"), "seed": plan.seed, "count": len(plan),
                "shards": [s["name"] for s in shards], "files": {s["name"]: {"bytes": s["bytes"], "sha256": s["sha256"]}
                                                                   for s in shards}}
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    return path

"""Model folders read from an S3-compatible store (`SYNTHGEN_MODELS_URL=s3://bucket/prefix`, one folder per model
under the prefix): downloaded into the data directory before loading. Each weights file is then checked against
the sha256 its config.json records, so a truncated or altered download is refused at load."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from app.engine.repository import MODEL_NAME
from app.engine.results import s3_client, split_s3_url
from app.errors import InvalidInputError
from app.settings import Settings

log = logging.getLogger("synthgen.models")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,2}$")
MAX_MODEL_BYTES = 1 << 30  # a model folder larger than this is refused


def fetch_models(url: str, client: Any, cache: Path) -> Path:
    """Mirror every `<prefix>/<model>/<file>` into `cache/<model>/<file>` (a fresh copy each start) and return the
    folder to serve. Keys that are not a valid model name and file path are skipped with a warning."""
    bucket, prefix = split_s3_url(url)
    staging = cache.with_name(cache.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    sizes: dict[str, int] = {}
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
    for item in (item for page in pages for item in page.get("Contents", [])):
        relative = item["Key"][len(prefix) + 1:] if prefix else item["Key"]
        model, _, file = relative.partition("/")
        if not MODEL_NAME.fullmatch(model) or not _FILE.fullmatch(file):
            log.warning("skipping %s in the model store: not <model>/<file>", item["Key"])
            continue
        sizes[model] = sizes.get(model, 0) + item["Size"]
        if sizes[model] > MAX_MODEL_BYTES:
            raise InvalidInputError(f"model {model!r} in {url} is over {MAX_MODEL_BYTES} bytes; refusing to download")
        target = staging / model / file
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, item["Key"], str(target))
    if not sizes:
        raise InvalidInputError(f"no model folders under {url}; upload them as <prefix>/<model>/config.json, …")
    shutil.rmtree(cache, ignore_errors=True)
    staging.replace(cache)
    log.info("downloaded %d model folder(s) from %s", len(sizes), url)
    return cache


def model_settings(settings: Settings) -> Settings:
    """Blocking. The settings to serve with: with SYNTHGEN_MODELS_URL, models_dir becomes the downloaded copy."""
    if not settings.models_url:
        return settings
    # not data_dir/models: that folder holds the models trained through the API, which a fresh copy would replace
    cache = fetch_models(settings.models_url, s3_client(settings), settings.data_dir / "store-models")
    return settings.model_copy(update={"models_dir": cache})

"""Dataset exports: `POST /v1/models/{name}/datasets` streams a zip, tar or npz while the samples are generated."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Body, Depends
from fastapi.responses import StreamingResponse

from app.api.deps import ModelName, RepositoryDep, SettingsDep, require_api_key, require_json
from app.api.schemas import DatasetRequest, ErrorPublic
from app.datasets import MEDIA_TYPES, plan_dataset, stream_dataset
from app.filters import FilterSpec
from app.sampling import MAX_SEED

router = APIRouter(prefix="/v1/models", tags=["datasets"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorPublic} for code in (401, 403, 404, 409, 413, 415, 422, 503, 504)}
EXAMPLES = {
    "balanced": {"summary": "100 images of every class, ImageFolder zip",
                 "value": {"per_class": 100, "seed": 0, "format": "zip"}},
    "chosen counts": {"summary": "more of the rare classes, WebDataset tar",
                      "value": {"per_class": {"3": 50, "8": 200}, "seed": 1, "format": "tar"}},
    "npz": {"summary": "arrays", "value": {"n": 500, "label": "7", "seed": 2, "format": "npz"}},
}


@router.post(
    "/{name}/datasets",
    summary="Export a dataset",
    description=(
        "Streams an archive while its samples are generated (constant server memory whatever its size), sharing "
        "the model's micro-batcher fairly with interactive requests. `zip`: ImageFolder layout "
        "`<class_name>/<8-digit index>.png` with `labels.csv` (file_name,label,class_name,seed,index) and "
        "`manifest.json` (model, config hash, seed, counts, code version, created-at, quality card): enough to "
        "regenerate it bit for bit. `tar`: WebDataset (`<key>.png`, `<key>.cls`, `<key>.json`). `npz`: `images` "
        "and `labels`, limited in size because npz cannot stream."
    ),
    response_class=StreamingResponse,
    responses={200: {"content": {t: {"schema": {"type": "string", "format": "binary"}} for t in MEDIA_TYPES.values()},
                     "description": "the archive"}, **ERRORS},
    dependencies=[Depends(require_json)],
)
async def export_dataset(body: Annotated[DatasetRequest, Body(openapi_examples=EXAMPLES)], repository: RepositoryDep,
                         settings: SettingsDep, name: ModelName) -> StreamingResponse:
    served = repository.ready_model(name)
    model = served.model
    seed = secrets.randbelow(MAX_SEED) if body.seed is None else body.seed
    limit = settings.max_npz_samples if body.format == "npz" else settings.max_dataset_samples
    plan = plan_dataset(model, seed, body.per_class, body.n, body.label, body.truncation, limit)
    stream = stream_dataset(served, plan, body.format, settings.max_batch_size, settings.request_timeout_s,
                            FilterSpec(body.min_confidence, body.max_similarity), settings.filter_max_rounds)
    first = await anext(stream)  # errors before the first byte still become proper HTTP answers

    async def archive() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()  # a client that went away stops the generation

    filename = f"{model.name}-seed{seed}.{body.format}"
    return StreamingResponse(archive(), media_type=MEDIA_TYPES[body.format],
                             headers={"Content-Disposition": f'attachment; filename="{filename}"', "X-Seed": str(seed)})

"""Dataset exports: `POST /v1/models/{name}/datasets` streams a zip, tar or npz while the samples are generated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import StreamingResponse

from app.api.deps import CallerDep, ModelName, RepositoryDep, SettingsDep, require_api_key, require_json
from app.api.schemas import DatasetRequest, ErrorPublic
from app.engine.exports import MEDIA_TYPES, export_limit, stream_export
from app.engine.plans import plan_samples

router = APIRouter(prefix="/v1/models", tags=["datasets"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorPublic} for code in (401, 403, 404, 409, 413, 415, 422, 503, 504)}
EXAMPLES = {
    "balanced": {"summary": "100 images of every class, ImageFolder zip",
                 "value": {"per_class": 100, "seed": 0, "format": "zip"}},
    "chosen counts": {"summary": "more of the rare classes, WebDataset tar",
                      "value": {"per_class": {"3": 50, "8": 200}, "seed": 1, "format": "tar"}},
    "parquet": {"summary": "Parquet for the Hugging Face Hub", "value": {"per_class": 100, "seed": 3,
                                                                          "format": "parquet"}},
    "npz": {"summary": "arrays", "value": {"n": 500, "label": "7", "seed": 2, "format": "npz"}},
}


@router.post(
    "/{name}/datasets",
    summary="Export a dataset",
    description=(
        "Streams an archive while its samples are generated (constant server memory whatever its size), sharing "
        "the model's micro-batcher fairly with interactive requests; the same request gives the same bytes. `zip`: "
        "ImageFolder layout `<class_name>/<8-digit index>.png` with `labels.csv` (file_name,label,class_name,seed,"
        "index), `metadata.parquet` (the same rows with the class names as a `ClassLabel`, for Hugging Face "
        "`load_dataset(\"imagefolder\", data_dir=...)`), a dataset card `README.md` and `manifest.json` (model, "
        "config hash, seed, counts, code version, quality card): enough to regenerate it bit for bit. `tar`: one "
        "WebDataset shard (`<key>.png`, `<key>.cls`, `<key>.json` with model, seed and index; nothing else, so "
        "`wds.WebDataset(url)` needs no handler; jobs write several shards and a manifest). `parquet`: columns "
        "image (PNG bytes), label, class_name, seed, index with the Hugging Face features, a row group per batch. "
        "`npz`: `images` and `labels`, limited in size because npz cannot stream."
    ),
    response_class=StreamingResponse,
    responses={200: {"content": {t: {"schema": {"type": "string", "format": "binary"}} for t in MEDIA_TYPES.values()},
                     "description": "the archive"}, **ERRORS},
    dependencies=[Depends(require_json)],
)
async def export_dataset(body: Annotated[DatasetRequest, Body(openapi_examples=EXAMPLES)], repository: RepositoryDep,
                         settings: SettingsDep, name: ModelName, request: Request, caller: CallerDep
                         ) -> StreamingResponse:
    # the export finishes on this version even if the model is reloaded
    served = repository.acquire(name, caller.models_of)
    try:
        plan = plan_samples(served.model, *export_limit(settings, body.format), per_class=body.per_class, n=body.n,
                            label=body.label, seed=body.seed, truncation=body.truncation, filters=body.filters())
        request.state.n = len(plan)
        stream = stream_export(served, plan, body.format, settings)
        _, first = await anext(stream)  # errors before the first byte still become proper HTTP answers
    except BaseException:
        await repository.release(served)
        raise

    async def archive() -> AsyncIterator[bytes]:
        try:
            yield first
            async for _, chunk in stream:
                yield chunk
        finally:
            await stream.aclose()  # a client that went away stops the generation
            await repository.release(served)

    filename = f"{name}-seed{plan.seed}.{body.format}"
    return StreamingResponse(archive(), media_type=MEDIA_TYPES[body.format], headers={
        "Content-Disposition": f'attachment; filename="{filename}"', "X-Seed": str(plan.seed)})

"""`POST /v1/augment`: make an uploaded dataset bigger and balanced."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from app.api.deps import CallerDep, RepositoryDep, SettingsDep, require_api_key, require_multipart
from app.api.schemas import AugmentationsRequest, ErrorPublic, FormBool, FormInt
from app.core.sampling import MAX_SEED
from app.engine.augment import AugmentRequest, AugmentSpec, check_request, parse_upload, stream_augmented, zip_limits
from app.errors import InvalidInputError

router = APIRouter(prefix="/v1", tags=["datasets"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorPublic} for code in (401, 403, 404, 409, 413, 415, 422)}


@router.post(
    "/augment",
    summary="Augment an uploaded dataset",
    description=(
        "Upload a zip in ImageFolder layout (`<class>/<image>.png`, optionally inside one folder) or a flat folder "
        "with `labels.csv` (file_name, class_name). Each image gets `copies_per_image` augmented copies, and every "
        "class the model knows is filled with conditional samples up to `target_per_class` images in all. Class "
        "folders are matched to the model's class names exactly; a class the model does not know keeps its images "
        "and is reported in manifest.json, never guessed. Answers a streamed zip with originals, augmented copies "
        "and samples, `labels.csv` with a `source` column, and `manifest.json`."
    ),
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
                     "description": "the augmented dataset"}, **ERRORS},
    dependencies=[Depends(require_multipart("-F 'dataset=@data.zip'"))],
)
async def augment_dataset(
    repository: RepositoryDep,
    caller: CallerDep,
    settings: SettingsDep,
    dataset: Annotated[UploadFile, File(description="the dataset zip")],
    model: Annotated[str, Form(description="model that fills the classes", examples=["mnist-cgan"])],
    target_per_class: Annotated[FormInt, Form(ge=0, le=1_000_000, description="images per class in the answer")] = 0,
    copies_per_image: Annotated[FormInt, Form(ge=0, le=100, description="augmented copies of every image")] = 0,
    augmentations: Annotated[str, Form(description='JSON, e.g. {"rotation": 15, "translate": 0.1}')] = "{}",
    seed: Annotated[FormInt, Form(ge=0, le=MAX_SEED)] = 0,
    convert: Annotated[FormBool, Form(description="resize/convert images to the model's shape")] = False,
    include_originals: Annotated[FormBool, Form(description="put the uploaded images in the answer")] = True,
) -> StreamingResponse:
    try:
        spec = AugmentSpec(**AugmentationsRequest.model_validate_json(augmentations).model_dump())
    except ValidationError as exc:
        # an error about the whole value (invalid JSON, not an object) has no location to name
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"]
                             for e in exc.errors())
        raise InvalidInputError(f"augmentations: {problems}") from None
    request = AugmentRequest(spec, copies_per_image, target_per_class, seed, include_originals, convert)
    served = repository.acquire(model, caller.models_of)
    try:
        # the middleware has already bounded the whole body by SYNTHGEN_MAX_UPLOAD_BYTES
        upload = await served.on_cpu(parse_upload, await dataset.read(), served.model, convert, zip_limits(settings))
        check_request(upload, request, settings.max_augment_outputs)
    except BaseException:
        await repository.release(served)
        raise
    stream = stream_augmented(served, upload, request, settings)

    async def archive() -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()
            await repository.release(served)

    return StreamingResponse(archive(), media_type="application/zip",
                             headers={"Content-Disposition": f'attachment; filename="augmented-seed{seed}.zip"'})

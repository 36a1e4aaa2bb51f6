"""VAE operations: reconstruct uploads, interpolate between latents, inpaint masked pixels. GANs answer 409."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, File, Form, UploadFile
from fastapi.responses import Response

from app.api.deps import (
    CallerDep,
    ModelName,
    RepositoryDep,
    SettingsDep,
    require_api_key,
    require_json,
    require_multipart,
)
from app.api.responses import SAMPLE_RESPONSES, samples_response
from app.api.schemas import ErrorPublic, FormBool, FormInt, InterpolateRequest, OutputFormat
from app.engine import vae
from app.errors import InvalidInputError

router = APIRouter(prefix="/v1/models", tags=["vae"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorPublic} for code in (401, 403, 404, 409, 413, 415, 422)}
INTERPOLATE_EXAMPLES = {
    "morph": {"summary": "a 3 turning into an 8", "value": {"seed_a": 0, "seed_b": 1, "label_a": "3", "label_b": "8",
                                                          "steps": 10, "format": "png"}},
    "same class": {"summary": "two styles of a 5", "value": {"seed_a": 4, "seed_b": 9, "label_a": 5, "steps": 8}},
}
FormatForm = Annotated[OutputFormat, Form(description="png (one grid), json or npz")]
ConvertForm = Annotated[FormBool, Form(description="resize/convert uploads to the model's image shape; else a "
                                               "size mismatch is a 422")]


async def _read(uploads: list[UploadFile], default_name: str) -> list[vae.Upload]:
    """The files' names and bytes (the middleware has already bounded the whole body)."""
    return [(upload.filename or f"{default_name} {i}", await upload.read()) for i, upload in enumerate(uploads)]


def _split_labels(labels: str | None) -> list[str | int] | None:
    return [part.strip() for part in labels.split(",")] if labels and labels.strip() else None


@router.post("/{name}/reconstruct", summary="Reconstruct images", response_class=Response,
             description="Upload PNG/JPEG images; each is encoded and decoded (the posterior mean). `labels`: one "
                         "class for all or one per image, comma-separated; omitted → the best-fitting class.",
             responses={**SAMPLE_RESPONSES, **ERRORS},
             dependencies=[Depends(require_multipart("-F 'files=@digit.png' -F 'files=@other.png'", ("files",)))])
async def reconstruct_images(repository: RepositoryDep, settings: SettingsDep, name: ModelName, caller: CallerDep,
                             files: Annotated[list[UploadFile], File(description="PNG or JPEG images")],
                             labels: Annotated[str | None, Form(description="e.g. 7 or 1,4,4")] = None,
                             convert: ConvertForm = False, format: FormatForm = "png") -> Response:
    if len(files) > settings.max_upload_files:
        raise InvalidInputError(f"{len(files)} files is over the limit of {settings.max_upload_files} per request")
    async with repository.serving(name, caller.models_of) as served:
        vae.require_vae(served.model)
        images = await vae.decode_uploads(served, await _read(files, "file"), convert, settings.max_image_pixels)
        samples = await vae.reconstruct(served, images, _split_labels(labels))
    return await samples_response(samples, format)


@router.post("/{name}/interpolate", summary="Interpolate between two latents", response_class=Response,
             description="Decodes `steps` points on the straight line from the latent of (seed_a, index 0) to that "
                         "of (seed_b, index 0); a conditional VAE also morphs label_a into label_b.",
             responses={**SAMPLE_RESPONSES, **ERRORS}, dependencies=[Depends(require_json)])
async def interpolate_samples(body: Annotated[InterpolateRequest, Body(openapi_examples=INTERPOLATE_EXAMPLES)],
                              repository: RepositoryDep, name: ModelName, caller: CallerDep) -> Response:
    async with repository.serving(name, caller.models_of) as served:
        samples = await vae.interpolate(served, body.seed_a, body.seed_b, body.label_a, body.label_b, body.steps)
    return await samples_response(samples, body.format)


@router.post("/{name}/inpaint", summary="Fill missing pixels", response_class=Response,
             description="Upload an image and a mask of the same size (white = missing). The gaps are filled by "
                         "iterating encode/decode while the known pixels stay clamped.",
             responses={**SAMPLE_RESPONSES, **ERRORS},
             dependencies=[Depends(require_multipart("-F 'image=@digit.png' -F 'mask=@mask.png'"))])
async def inpaint_images(repository: RepositoryDep, settings: SettingsDep, name: ModelName, caller: CallerDep,
                         image: Annotated[UploadFile, File(description="the damaged image (PNG/JPEG)")],
                         mask: Annotated[UploadFile, File(description="white where pixels are missing")],
                         label: Annotated[str | None,
                                          Form(description="class; omitted → the best-fitting class")] = None,
                         iterations: Annotated[FormInt, Form(ge=1, le=500)] = 60,
                         convert: ConvertForm = False, format: FormatForm = "png") -> Response:
    async with repository.serving(name, caller.models_of) as served:
        vae.require_vae(served.model)
        pixels = await vae.decode_uploads(served, await _read([image], "image"), convert,
                                          settings.max_image_pixels)
        holes = await vae.decode_uploads(served, await _read([mask], "mask"), convert, settings.max_image_pixels,
                                         mask=True)
        samples = await vae.inpaint(served, pixels[0], holes[0], label, iterations)
    return await samples_response(samples, format)

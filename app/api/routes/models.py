"""The model repository over HTTP: list, describe, load (or reload) and unload."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from app.api.card_page import card_page
from app.api.deps import Caller, CallerDep, ModelName, RepositoryDep, SettingsDep, require_admin, require_api_key
from app.api.disconnect import unless_disconnected
from app.api.page_security import card_headers
from app.api.schemas import ErrorPublic, ModelDetailPublic, ModelPublic, ModelsPublic
from app.engine.cards import card_images
from app.engine.repository import ModelEntry, ModelRepository, visible
from app.errors import ConflictError

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require_api_key)],
                   responses={code: {"model": ErrorPublic} for code in (401, 403, 422)})


PRIVATE_CONFIG = ("trained_by", "training_job")  # who trained a model, and how: for that key and admins only


def model_public(repository: ModelRepository, entry: ModelEntry, dtype: str, detail: bool = False,
                 caller: Caller | None = None) -> ModelPublic | ModelDetailPublic:
    fields: dict = {"name": entry.base_name, "version": entry.version, "versions": repository.versions(entry.name),
                    "status": entry.status, "error": entry.error, "kind": None}
    model = entry.model
    if model is not None:
        height, width, channels = model.image_shape
        fields.update(kind=model.kind, height=height, width=width, channels=channels,
                      class_names=model.class_names, device=str(model.device),
                      dtype=dtype if model.device.type == "cuda" else "float32",
                      quality=model.card.get("metrics", {}))
        if detail:
            config = model.config
            if caller is not None and not caller.is_admin and config.get("trained_by") != caller.owner:
                config = {key: value for key, value in config.items() if key not in PRIVATE_CONFIG}
            return ModelDetailPublic(**fields, config=config, card=model.card)
    return ModelDetailPublic(**fields) if detail else ModelPublic(**fields)


@router.get("", summary="List models", response_model=ModelsPublic,
            description="Every model of the repository with its status, shape, classes and quality summary; a "
                        "versioned model (trained through the API) once, as its newest version, with `versions`.")
async def list_models(repository: RepositoryDep, settings: SettingsDep, caller: CallerDep) -> ModelsPublic:
    repository.discover()
    newest = {repository.get(entry.base_name).name for entry in repository.entries.values()}
    shown = sorted(name for name in newest if visible(repository.entries[name], caller.models_of))
    return ModelsPublic(models=[model_public(repository, repository.entries[key], settings.dtype) for key in shown])


@router.get("/{name}", summary="Describe a model", response_model=ModelDetailPublic,
            description="The model's summary (with its versions) plus its whole config.json and card.json; "
                        "`name@version` describes one version.",
            responses={404: {"model": ErrorPublic}})
async def get_model(repository: RepositoryDep, settings: SettingsDep, name: ModelName,
                    caller: CallerDep) -> ModelDetailPublic:
    return model_public(repository, repository.get(name, caller.models_of), settings.dtype, detail=True,
                        caller=caller)


@router.get("/{name}/card", summary="A model's quality card", response_model=None,
            description="The card as JSON (default) or, with `format=html`, a self-contained report: the TSTR "
                        "protocol, per-class figures, privacy, calibration, a sample grid and the nearest-training-"
                        "neighbour grid.",
            responses={200: {"content": {"application/json": {}, "text/html": {}}}, 404: {"model": ErrorPublic},
                       409: {"model": ErrorPublic}})
async def get_model_card(request: Request, repository: RepositoryDep, name: ModelName, caller: CallerDep,
                         format: Annotated[Literal["json", "html"], Query(description="json or html")] = "json"
                         ) -> Response:
    async with repository.serving(name, caller.models_of) as served:
        if format == "json":
            return JSONResponse(served.model.card)
        images = await unless_disconnected(request, card_images(served, repository.settings))
    return HTMLResponse(card_page(name, served.model.card, images.samples_png, images.neighbours_png, images.note),
                        headers=card_headers())


@router.post("/{name}/load", summary="Load or reload a model", response_model=ModelPublic,
             description="Needs an admin key. Loads the model folder from disk (again), replacing the loaded version "
                         "once the new one loaded; exports and jobs already running finish on the version they began "
                         "with. A checkpoint that fails to load answers 409 with the reason; a model that was "
                         "serving keeps serving its previous version, and the other models are not affected.",
             responses={404: {"model": ErrorPublic}, 409: {"model": ErrorPublic}},
             dependencies=[Depends(require_admin)])
async def load_model(repository: RepositoryDep, settings: SettingsDep, name: ModelName) -> ModelPublic:
    entry = await repository.load(name)
    if entry.error:
        raise ConflictError(f"model {name!r} failed to load: {entry.error}")
    return model_public(repository, entry, settings.dtype)


@router.delete("/{name}", summary="Unload a model", response_model=ModelPublic,
               description="Stops the model's worker and frees its memory; waiting requests, exports and jobs fail at "
                           "once with 409. The folder stays "
                           "on disk; POST .../load brings it back. Needs an admin key.",
               responses={404: {"model": ErrorPublic}}, dependencies=[Depends(require_admin)])
async def unload_model(repository: RepositoryDep, settings: SettingsDep, name: ModelName) -> ModelPublic:
    return model_public(repository, await repository.unload(name), settings.dtype)

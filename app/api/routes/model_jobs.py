"""`/v1/trainings` over HTTP: upload your images, get a versioned model with its quality card; each API key sees only
its own. The server's side of these jobs (queue, plans, child processes): no training code is imported here."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from fastapi.responses import FileResponse, JSONResponse

from app.api.deps import (
    CallerDep,
    RepositoryDep,
    SettingsDep,
    StoreDep,
    TrainingId,
    WebhooksDep,
    WorkerDep,
    require_api_key,
    require_form,
)
from app.api.schemas import ErrorPublic, FormBool, FormFloat, FormInt, TrainingPublic, TrainingsPublic
from app.core.imagefolder import DecodedFolder, FolderLimits, decode_image_folder
from app.core.safezip import read_zip
from app.core.sampling import MAX_SEED
from app.engine.augment import check_class_name, zip_limits
from app.engine.jobstore import Job, JobLimits
from app.engine.model_jobs import (
    EVALUATED,
    TRAINING_RESERVED_BYTES,
    check_model_name,
    check_validation_set,
    load_dataset_file,
    plan_training,
    remove_unused_datasets,
    save_dataset,
    trainings_dir,
    use_dataset,
)
from app.engine.repository import MODEL_NAME, validate_model_name
from app.errors import InvalidInputError, NotFoundError
from app.settings import Settings

router = APIRouter(prefix="/v1/trainings", tags=["trainings"], dependencies=[Depends(require_api_key)],
                   responses={code: {"model": ErrorPublic} for code in (401, 403, 422)})
_TRAINING = "#/paths/~1v1~1trainings~1{training_id}"
LINKS = {name: {"operationRef": f"{_TRAINING}{path}/{method}", "parameters": {"training_id": "$response.body#/id"}}
         for name, path, method in (("GetTraining", "", "get"), ("DeleteTraining", "", "delete"))}


def _time(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def training_public(job: Job) -> TrainingPublic:
    progress, request = job.progress or {}, job.request
    first = next(iter(request["recipes"]))
    return TrainingPublic(
        id=job.id, name=job.model, state=job.state, stage=progress.get("stage", "queued"),
        arch=progress.get("arch"), epoch=progress.get("epoch") or 0,
        epochs=progress.get("epochs") or request["recipes"][first]["epochs"], step=progress.get("step") or 0,
        steps_per_epoch=progress.get("steps_per_epoch"), epochs_done=job.done, epochs_total=job.total,
        losses=progress.get("losses") or {}, eta_s=progress.get("eta_seconds"),
        elapsed_s=progress.get("elapsed_seconds"),
        warnings=request["warnings"], dataset_id=request["dataset_id"], dataset=request["dataset"],
        val_dataset_id=request.get("val_dataset_id"), val_dataset=request.get("val_dataset"),
        recipes=request["recipes"], gates=request["gates"], candidates=progress.get("candidates") or {},
        chosen=progress.get("chosen"), gate_failures=progress.get("gate_failures") or [], model=progress.get("model"),
        error=job.error, samples_url=f"/v1/trainings/{job.id}/samples.png", card_url=f"/v1/trainings/{job.id}/card",
        tensorboard_logdir=f"trainings/{job.id}/tensorboard", created_at=_time(job.created_at),
        started_at=_time(job.started_at), finished_at=_time(job.finished_at))


def _decode_upload(data: bytes, settings: Settings, convert: bool, source: str = "upload") -> DecodedFolder:
    entries, _ = read_zip(io.BytesIO(data), zip_limits(settings), name=source)
    for class_name in entries:
        if class_name:
            check_class_name(class_name)
    limits = FolderLimits(max_pixels=settings.max_training_pixels, pixels_setting="SYNTHGEN_MAX_TRAINING_PIXELS",
                          max_images=settings.max_training_images, min_per_class=settings.min_images_per_class,
                          max_decoded_bytes=settings.max_training_decoded_bytes)
    return decode_image_folder(entries, source, limits, convert)


@router.post(
    "", status_code=202, summary="Train a model on your images", response_model=TrainingPublic,
    description=(
        "Upload a zip in ImageFolder layout (`<class>/<image>.png`, optionally inside one folder), or name a dataset "
        "uploaded before (`dataset_id`), and a model `name`. Trains a `gan`, a `vae`, or both (`auto`, keeping the "
        "one with the better TSTR on the validation split) with settings chosen from the data's size (DiffAugment "
        "for small datasets; every setting can be overridden within limits). The validation split is a random "
        "`val_fraction` of the dataset, or a validation set of its own (`val_dataset`, a zip of the same classes "
        "and size, or `val_dataset_id`): images from elsewhere (other people, cameras or sites) judge how the "
        "samples train a classifier for images the model never saw; all of the dataset then trains. The model is "
        "evaluated into a quality card and, if it passes the gates you give (`min_tstr`, `min_tstr_ratio` = TSTR / "
        "real-data accuracy), registers it as the next version of `name` and loads it. Runs in the background "
        "under the job system (resumed from its last epoch if its worker dies); answers 202 with the training and "
        "its `Location`. Refused with 422 naming the file and the fix: mixed sizes or colour modes (or send "
        "`convert=true`), unreadable files, classes with too few images, too many images or pixels, a validation "
        "set with other classes, another size, or images of the dataset."),
    responses={202: {"description": "the training, queued", "links": LINKS},
               **{code: {"model": ErrorPublic} for code in (404, 409, 413, 415, 429, 507)}},
    dependencies=[Depends(require_form)],
)
async def create_training(
    response: Response, settings: SettingsDep, store: StoreDep, worker: WorkerDep, caller: CallerDep,
    repository: RepositoryDep, webhooks: WebhooksDep,
    name: Annotated[str, Form(description="the model's name; a training adds a version to a model you trained",
                              pattern=MODEL_NAME.pattern, examples=["my-shoes"])],
    dataset: Annotated[UploadFile | None, File(description="an ImageFolder zip")] = None,
    dataset_id: Annotated[str | None, Form(description="instead of a zip: the dataset_id of an earlier training")
                          ] = None,
    val_dataset: Annotated[UploadFile | None, File(description="validation images apart from the dataset, as an "
                                                   "ImageFolder zip of the same classes and size")] = None,
    val_dataset_id: Annotated[str | None, Form(description="instead of a validation zip: the val_dataset_id of "
                                               "an earlier training")] = None,
    arch: Annotated[Literal["gan", "vae", "auto"], Form(description="auto: both, keep the better")] = "auto",
    epochs: Annotated[FormInt | None, Form(ge=1, description="default: chosen from the data's size")] = None,
    batch_size: Annotated[FormInt | None, Form(ge=2, le=1024)] = None,
    val_fraction: Annotated[FormFloat | None, Form(ge=0.05, le=0.5, description="default: 0.2 under 5,000 images, "
                                                   "else 0.1")] = None,
    hyperparameters: Annotated[str, Form(description='JSON, e.g. {"g_channels": 64, "diff_augment": ""}; with auto, '
                                         'per architecture: {"gan": {...}, "vae": {...}}')] = "{}",
    seed: Annotated[FormInt, Form(ge=0, le=MAX_SEED)] = 0,
    convert: Annotated[FormBool, Form(description="resize and convert images to the most common size and colour "
                                      "mode instead of refusing them")] = False,
    min_tstr: Annotated[FormFloat | None, Form(ge=0, le=1, description="gate: TSTR accuracy on the validation "
                                               "split")] = None,
    min_tstr_ratio: Annotated[FormFloat | None, Form(ge=0, le=2, description="gate: TSTR / real-data accuracy "
                                                     "on the validation split")] = None,
    tune: Annotated[FormBool, Form(description="before the card, choose how widely default draws spread "
                                   "(latent_scale) on the validation split, as `synthgen tune` does: TSTR at six "
                                   "scales, scales that mislabel excluded; a few minutes more")] = False,
    eval_per_class: Annotated[FormInt, Form(ge=10, le=1000, description="synthetic samples per class the card "
                                            "is computed on")] = 1000,
    callback_url: Annotated[str | None, Form(max_length=2048, description="POSTed the training when it succeeds or "
                                             "fails, signed as job webhooks are (GET /v1/webhooks/secret)")] = None,
) -> TrainingPublic:
    validate_model_name(name)  # the pattern alone lets `a..b` through, which no model route would then accept
    if (dataset is None) == (dataset_id is None):
        raise InvalidInputError("send either a `dataset` zip or the `dataset_id` of an earlier upload")
    if val_dataset is not None and val_dataset_id is not None:
        raise InvalidInputError("send either a `val_dataset` zip or the `val_dataset_id` of an earlier upload, not "
                                "both")
    if epochs is not None and epochs > settings.max_training_epochs:
        raise InvalidInputError(f"epochs {epochs} is over the limit of {settings.max_training_epochs} "
                                "(SYNTHGEN_MAX_TRAINING_EPOCHS)")
    try:
        overrides: dict[str, Any] = json.loads(hyperparameters)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"hyperparameters: not valid JSON ({exc})") from None
    if not isinstance(overrides, dict):
        raise InvalidInputError('hyperparameters: a JSON object, e.g. {"g_channels": 64}')
    if callback_url is not None:
        await asyncio.to_thread(webhooks.policy.check, callback_url)
    await asyncio.to_thread(check_model_name, settings, repository.settings.models_dir, name, caller.owner)
    loop = asyncio.get_running_loop()
    if dataset is not None:  # the middleware has already bounded the whole body by SYNTHGEN_MAX_UPLOAD_BYTES
        folder = await loop.run_in_executor(repository.cpu, _decode_upload, await dataset.read(), settings, convert)
    else:
        stored = await asyncio.to_thread(use_dataset, settings, caller.owner, dataset_id)
        folder = await asyncio.to_thread(load_dataset_file, stored)
    val_folder, val_stored = None, None
    if val_dataset is not None:
        val_folder = await loop.run_in_executor(repository.cpu, _decode_upload, await val_dataset.read(), settings,
                                                convert, "val_dataset")
    elif val_dataset_id is not None:
        val_stored = await asyncio.to_thread(use_dataset, settings, caller.owner, val_dataset_id)
        val_folder = await asyncio.to_thread(load_dataset_file, val_stored)
    if val_folder is not None:
        await loop.run_in_executor(repository.cpu, check_validation_set, folder, val_folder)
    recipes, warnings = plan_training(folder, arch, {"epochs": epochs, "batch_size": batch_size,
                                                     "val_fraction": val_fraction, "hyperparameters": overrides},
                                      val_folder)
    written: list[Path] = []  # uploads are stored only once every check passed, and removed if the job is refused
    try:
        if dataset is not None:
            dataset_id, stored, new = await asyncio.to_thread(save_dataset, settings, caller.owner, folder)
            written += [stored] if new else []
        if val_dataset is not None:
            val_dataset_id, val_stored, new = await asyncio.to_thread(save_dataset, settings, caller.owner, val_folder)
            written += [val_stored] if new else []
        height, width, channels = folder.images.shape[1:]
        request = {
            "arch": arch, "seed": seed, "dataset_id": dataset_id, "eval_per_class": eval_per_class, "tune": tune,
            "dataset_file": str(stored.relative_to(settings.data_dir)),
            "dataset": {"images": len(folder.images), "classes": folder.class_names, "per_class": folder.counts(),
                        "height": height, "width": width, "channels": channels},
            "val_dataset_id": val_dataset_id,
            "val_dataset_file": str(val_stored.relative_to(settings.data_dir)) if val_stored else None,
            "val_dataset": {"images": len(val_folder.images), "per_class": val_folder.counts()} if val_folder else None,
            "recipes": recipes, "warnings": warnings,
            "gates": {"min_tstr": min_tstr, "min_tstr_ratio": min_tstr_ratio}, "callback_url": callback_url}
        job = await asyncio.to_thread(store.create, name, request, sum(r["epochs"] for r in recipes.values()),
                                      "model", caller.owner, TRAINING_RESERVED_BYTES,
                                      JobLimits.from_settings(settings), "training")
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    if worker is not None:
        worker.wake()
    response.headers["Location"] = f"/v1/trainings/{job.id}"
    return training_public(job)


@router.get("", summary="List your trainings", response_model=TrainingsPublic,
            description="The trainings of the calling API key, newest first.")
async def list_trainings(store: StoreDep, caller: CallerDep,
                         limit: Annotated[int, Query(ge=1, le=1000, description="most trainings listed")] = 100
                         ) -> TrainingsPublic:
    jobs = await asyncio.to_thread(store.list, caller.owner, limit, "training")
    return TrainingsPublic(trainings=[training_public(job) for job in jobs])


@router.get("/{training_id}", summary="Training state", response_model=TrainingPublic,
            responses={404: {"model": ErrorPublic}},
            description="State, stage, epoch and step, latest losses, ETA, warnings, the candidates' figures and, "
                        "once promoted, the model (`name@version`).")
async def get_training(training_id: TrainingId, store: StoreDep, caller: CallerDep) -> TrainingPublic:
    return training_public(await asyncio.to_thread(store.get, training_id, caller.owner, "training"))


def _stage_folder(settings: Settings, job: Job, evaluated: bool = False) -> Path:
    """The architecture's folder whose files to show: the chosen one, else the one in work (with `evaluated`, the
    last one evaluated)."""
    progress, work = job.progress or {}, trainings_dir(settings) / job.id
    if progress.get("chosen"):
        return work / progress["chosen"]
    if evaluated:
        done = [arch for arch in job.request["recipes"] if (work / arch / EVALUATED).exists()]
        return work / (done[-1] if done else next(iter(job.request["recipes"])))
    return work / (progress.get("arch") or next(iter(job.request["recipes"])))


@router.get("/{training_id}/samples.png", summary="The latest sample grid", response_class=FileResponse,
            description="The sample grid drawn after the last epoch of the architecture in work (or of the one "
                        "chosen): a row per class, named, in label order.",
            responses={200: {"content": {"image/png": {}}, "description": "a row of samples per class, named"},
                       404: {"model": ErrorPublic}})
async def get_training_samples(training_id: TrainingId, store: StoreDep, caller: CallerDep, settings: SettingsDep
                               ) -> FileResponse:
    job = await asyncio.to_thread(store.get, training_id, caller.owner, "training")
    grids = sorted((_stage_folder(settings, job) / "samples").glob("epoch_*.png"))
    if not grids:
        raise NotFoundError(f"training {training_id} has no sample grid yet; one is drawn after every epoch")
    return FileResponse(grids[-1], media_type="image/png")


@router.get("/{training_id}/card", summary="The trained model's quality card", response_class=JSONResponse,
            responses={404: {"model": ErrorPublic}},
            description="The card of the model this training chose (also when it failed its gates and was not "
                        "promoted), or of the candidate evaluated last.")
async def get_training_card(training_id: TrainingId, store: StoreDep, caller: CallerDep, settings: SettingsDep
                            ) -> JSONResponse:
    job = await asyncio.to_thread(store.get, training_id, caller.owner, "training")
    folder = _stage_folder(settings, job, evaluated=True)
    if not (folder / EVALUATED).exists():
        raise NotFoundError(f"training {training_id} has no card yet; it is written once the model is evaluated")
    return JSONResponse(json.loads(await asyncio.to_thread((folder / "card.json").read_text)))


@router.delete("/{training_id}", status_code=204, summary="Cancel and delete a training",
               responses={404: {"model": ErrorPublic}},
               description="Stops a queued or running training and deletes it, its working files and the "
                           "datasets it was given (unless another training uses them); a model it already promoted "
                           "stays.")
async def delete_training(training_id: TrainingId, store: StoreDep, worker: WorkerDep, caller: CallerDep,
                          settings: SettingsDep) -> Response:
    job = await asyncio.to_thread(store.get, training_id, caller.owner, "training")
    if worker is not None:  # a training running in another process stops at its next lease renewal
        await worker.cancel(training_id)
    await asyncio.to_thread(store.delete, training_id)
    files = [job.request[key] for key in ("dataset_file", "val_dataset_file") if job.request.get(key)]
    await asyncio.to_thread(remove_unused_datasets, settings, store, 0, files)
    return Response(status_code=204)

"""Asynchronous dataset jobs: submit, list, poll, download (with HTTP Range), cancel and delete; each API key sees
only its own jobs."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from typing import IO, Annotated

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from app.api.deps import (
    CallerDep,
    JobId,
    RepositoryDep,
    SettingsDep,
    StoreDep,
    WebhooksDep,
    WorkerDep,
    require_api_key,
    require_json,
)
from app.api.responses import open_file_response
from app.api.schemas import ErrorPublic, JobFilePublic, JobPublic, JobRequest, JobsPublic
from app.engine.exports import MEDIA_TYPES, export_limit
from app.engine.jobs import estimate_bytes
from app.engine.jobstore import Job, JobLimits, JobStore
from app.engine.plans import plan_samples
from app.engine.states import JobState
from app.errors import ConflictError, InvalidInputError, NotFoundError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)],
                   responses={code: {"model": ErrorPublic} for code in (401, 403, 422)})
MAX_SHARDS = 10_000  # files in one tar job's result
# OpenAPI links: what a client (or a stateful fuzzer) may do with the id a submission returns
_JOB = "#/paths/~1v1~1jobs~1{job_id}"
LINKS = {name: {"operationRef": f"{_JOB}{path}/{method}", "parameters": {"job_id": "$response.body#/id"}}
         for name, path, method in (("GetJob", "", "get"), ("GetResult", "~1result", "get"),
                                    ("DeleteJob", "", "delete"))}
EXAMPLES = {"balanced": {"summary": "1,000 images of every digit as an ImageFolder zip",
                         "value": {"model": "mnist-cgan", "per_class": 1000, "seed": 0, "format": "zip"}}}


def _time(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def _media_type(name: str, job: Job) -> str:
    return "application/json" if name.endswith(".json") else MEDIA_TYPES[job.format]


def job_public(job: Job, files: list[tuple[str, int]] | None = None) -> JobPublic:
    """The job as the API shows it; `files` (name, size) once it succeeded."""
    succeeded = job.state == JobState.SUCCEEDED
    fields = {name: getattr(job, name) for name in JobPublic.model_fields if hasattr(job, name)}
    fields.update(created_at=_time(job.created_at), started_at=_time(job.started_at),
                  finished_at=_time(job.finished_at))
    listed = [JobFilePublic(name=name, bytes=size, media_type=_media_type(name, job),
                            url=f"/v1/jobs/{job.id}/files/{name}") for name, size in files or []]
    return JobPublic(**fields, files=listed if succeeded else [],
                     result_url=f"/v1/jobs/{job.id}/result" if succeeded and job.format != "tar" else None)


def job_with_files(store: JobStore, job: Job) -> JobPublic:
    """Blocking (lists the result's files): call it off the event loop."""
    return job_public(job, store.files(job) if job.state == JobState.SUCCEEDED else None)


@router.post("", status_code=202, summary="Submit a dataset job", response_model=JobPublic,
             description="Queues a dataset export that runs in the background and persists across restarts; the "
                         "job belongs to the API key that submitted it. Answers 202 with the job and its `Location`; "
                         "poll it, then download the result. Refused at once with 429 when too many jobs are queued "
                         "(in all or for this key) and 507 when its result could pass a disk quota. With a "
                         "`callback_url`, the job is POSTed there when it succeeds or fails (see GET "
                         "/v1/webhooks/secret).",
             responses={202: {"description": "the job, queued", "links": LINKS},
                        **{code: {"model": ErrorPublic} for code in (404, 409, 413, 415, 429, 507)}},
             dependencies=[Depends(require_json)])
async def create_dataset_job(body: Annotated[JobRequest, Body(openapi_examples=EXAMPLES)], response: Response,
                             repository: RepositoryDep, settings: SettingsDep, store: StoreDep, worker: WorkerDep,
                             caller: CallerDep, webhooks: WebhooksDep, request: Request) -> JobPublic:
    model = repository.ready_model(body.model, caller.models_of).model
    if body.callback_url is not None:
        await asyncio.to_thread(webhooks.policy.check, body.callback_url)
    plan = plan_samples(model, *export_limit(settings, body.format), per_class=body.per_class, n=body.n,
                        label=body.label, seed=body.seed, truncation=body.truncation, filters=body.filters())
    request.state.n = len(plan)
    if body.format == "tar" and math.ceil(len(plan) / body.shard_size) > MAX_SHARDS:
        raise InvalidInputError(f"{len(plan)} samples in shards of {body.shard_size} would make more than "
                                f"{MAX_SHARDS} shards; raise shard_size")
    reserved = estimate_bytes(plan, model, body.format, body.shard_size, settings.max_batch_size)
    job = await asyncio.to_thread(store.create, model.name, {**body.model_dump(), "seed": plan.seed}, len(plan),
                                  body.format, caller.owner, reserved, JobLimits.from_settings(settings))
    if worker is not None:
        worker.wake()
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_public(job)


@router.get("", summary="List your jobs", response_model=JobsPublic,
            description="The jobs of the calling API key, newest first.")
async def list_dataset_jobs(store: StoreDep, caller: CallerDep,
                            limit: Annotated[int, Query(ge=1, le=1000, description="most jobs listed")] = 100
                            ) -> JobsPublic:
    def listed() -> list[JobPublic]:  # one thread hop for the query and every job's file listing
        return [job_with_files(store, job) for job in store.list(caller.owner, limit)]

    return JobsPublic(jobs=await asyncio.to_thread(listed))


@router.get("/{job_id}", summary="Job state", response_model=JobPublic, responses={404: {"model": ErrorPublic}},
            description="State (queued, running, succeeded, failed), progress, ETA and error.")
async def get_dataset_job(job_id: JobId, store: StoreDep, caller: CallerDep) -> JobPublic:
    job = await asyncio.to_thread(store.get, job_id, caller.owner, "dataset")
    return await asyncio.to_thread(job_with_files, store, job)


@router.get("/{job_id}/result", summary="Download a job's archive", response_class=StreamingResponse,
            description="The finished archive of a zip, parquet or npz job (a tar job's shards are in its `files`). "
                        "Supports `Range: bytes=START-[END]` (or `bytes=-N`, the last N bytes) so a broken download "
                        "resumes. A download that started is served whole even if the job is deleted or expires "
                        "meanwhile.",
            responses={200: {"content": {t: {"schema": {"type": "string", "format": "binary"}}
                                         for t in MEDIA_TYPES.values()}, "description": "the archive"},
                       206: {"description": "a range"}, 404: {"model": ErrorPublic}, 409: {"model": ErrorPublic},
                       416: {"model": ErrorPublic}})
async def download_job_result(job_id: JobId, store: StoreDep, caller: CallerDep, request: Request) -> StreamingResponse:
    job = await _finished(store, job_id, caller.owner)
    if job.format == "tar":
        raise ConflictError(f"job {job_id} wrote WebDataset shards; download each of its `files` from "
                            f"/v1/jobs/{job_id}/files/<name>")
    names = [name for name, _ in await asyncio.to_thread(store.files, job) if name != "manifest.json"]
    if not names:
        raise NotFoundError(f"no result for job {job_id}; it was deleted or expired")
    return await _file_response(store, job, names[0], request)


@router.get("/{job_id}/files/{file_name}", summary="Download one file of a job's result",
            response_class=StreamingResponse,
            description="One of the files listed in the finished job's `files`: a WebDataset shard, the manifest "
                        "sidecar, or the archive. Supports `Range` like the result.",
            responses={200: {"content": {t: {"schema": {"type": "string", "format": "binary"}}
                                         for t in {*MEDIA_TYPES.values(), "application/json"}},
                             "description": "the file"},
                       206: {"description": "a range"}, 404: {"model": ErrorPublic}, 409: {"model": ErrorPublic},
                       416: {"model": ErrorPublic}})
async def download_job_file(job_id: JobId, file_name: str, store: StoreDep, caller: CallerDep, request: Request
                            ) -> StreamingResponse:
    job = await _finished(store, job_id, caller.owner)
    return await _file_response(store, job, file_name, request)


# HEAD (size and Range support, for download tools) answers as GET does, without the body; not a separate
# operation in the schema
for _path, _download in (("/{job_id}/result", download_job_result), ("/{job_id}/files/{file_name}", download_job_file)):
    router.add_api_route(_path, _download, methods=["HEAD"], include_in_schema=False)


async def _finished(store: JobStore, job_id: str, owner: str) -> Job:
    job = await asyncio.to_thread(store.get, job_id, owner, "dataset")
    if job.state != JobState.SUCCEEDED:
        raise ConflictError(f"job {job_id} is {job.state}" + (f" ({job.error})" if job.error else "")
                            + "; its result is ready once it succeeded")
    return job


async def _file_response(store: JobStore, job: Job, name: str, request: Request) -> Response:
    """The file streamed through this server (with Range), or a redirect to the object store's presigned URL when
    SYNTHGEN_RESULTS_REDIRECT is on."""
    def opened() -> tuple[IO[bytes], int, str | None]:
        handle, size = store.open_file(job, name)
        return handle, size, store.storage.url(job.id, name)

    handle, size, url = await asyncio.to_thread(opened)
    if url is not None:
        handle.close()
        return RedirectResponse(url, status_code=307)
    return open_file_response(handle, size, _media_type(name, job), name, request.headers.get("range"),
                              head=request.method == "HEAD")


@router.delete("/{job_id}", status_code=204, summary="Cancel and delete a job", responses={404: {"model": ErrorPublic}},
               description="Stops a queued or running job and deletes it and its files.")
async def delete_dataset_job(job_id: JobId, store: StoreDep, worker: WorkerDep, caller: CallerDep) -> Response:
    await asyncio.to_thread(store.get, job_id, caller.owner, "dataset")
    if worker is not None:  # a job running in another process stops at its next lease renewal
        await worker.cancel(job_id)
    await asyncio.to_thread(store.delete, job_id)
    return Response(status_code=204)

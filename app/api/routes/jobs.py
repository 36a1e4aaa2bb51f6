"""Asynchronous dataset jobs: submit, list, poll, download (with HTTP Range), cancel and delete; each API key sees
only its own jobs."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse

from app.api.deps import (
    CallerDep,
    JobId,
    RepositoryDep,
    RunnerDep,
    SettingsDep,
    StoreDep,
    require_api_key,
    require_json,
)
from app.api.responses import open_file_response
from app.api.schemas import ErrorPublic, JobPublic, JobRequest, JobsPublic
from app.engine.exports import MEDIA_TYPES, export_limit
from app.engine.jobs import Job
from app.engine.plans import plan_samples
from app.engine.states import JobState
from app.errors import ConflictError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)],
                   responses={code: {"model": ErrorPublic} for code in (401, 403, 422)})
# OpenAPI links: what a client (or a stateful fuzzer) may do with the id a submission returns
_JOB = "#/paths/~1v1~1jobs~1{job_id}"
LINKS = {name: {"operationRef": f"{_JOB}{path}/{method}", "parameters": {"job_id": "$response.body#/id"}}
         for name, path, method in (("GetJob", "", "get"), ("GetResult", "~1result", "get"),
                                    ("DeleteJob", "", "delete"))}
EXAMPLES = {"balanced": {"summary": "1,000 images of every digit as an ImageFolder zip",
                         "value": {"model": "mnist-cgan", "per_class": 1000, "seed": 0, "format": "zip"}}}


def job_public(job: Job) -> JobPublic:
    url = f"/v1/jobs/{job.id}/result" if job.state == JobState.SUCCEEDED else None
    fields = {name: getattr(job, name) for name in JobPublic.model_fields if hasattr(job, name)}
    return JobPublic(**fields, result_url=url)


@router.post("", status_code=202, summary="Submit a dataset job", response_model=JobPublic,
             description="Queues a dataset export that runs in the background and persists across restarts; the "
                         "job belongs to the API key that submitted it. Answers 202 with the job and its `Location`; "
                         "poll it, then download the result. Refused at once with 429 when too many jobs are queued "
                         "(in all or for this key) and 507 when its result could pass a disk quota.",
             responses={202: {"description": "the job, queued", "links": LINKS},
                        **{code: {"model": ErrorPublic} for code in (404, 409, 413, 415, 429, 507)}},
             dependencies=[Depends(require_json)])
async def submit_job(body: Annotated[JobRequest, Body(openapi_examples=EXAMPLES)], response: Response,
                     repository: RepositoryDep, settings: SettingsDep, runner: RunnerDep,
                     caller: CallerDep) -> JobPublic:
    model = repository.ready_model(body.model).model
    plan = plan_samples(model, *export_limit(settings, body.format), per_class=body.per_class, n=body.n,
                        label=body.label, seed=body.seed, truncation=body.truncation, filters=body.filters())
    job = await runner.submit(model, {**body.model_dump(), "seed": plan.seed}, plan, body.format, caller.owner)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_public(job)


@router.get("", summary="List your jobs", response_model=JobsPublic,
            description="The jobs of the calling API key, newest first.")
async def list_jobs(store: StoreDep, caller: CallerDep,
                    limit: Annotated[int, Query(ge=1, le=1000, description="most jobs listed")] = 100) -> JobsPublic:
    jobs = await asyncio.to_thread(store.list, caller.owner, limit)
    return JobsPublic(jobs=[job_public(job) for job in jobs])


@router.get("/{job_id}", summary="Job state", response_model=JobPublic, responses={404: {"model": ErrorPublic}},
            description="State (queued, running, succeeded, failed), progress, ETA and error.")
async def get_job(job_id: JobId, store: StoreDep, caller: CallerDep) -> JobPublic:
    return job_public(await asyncio.to_thread(store.get, job_id, caller.owner))


@router.get("/{job_id}/result", summary="Download a job's archive", response_class=StreamingResponse,
            description="The finished archive. Supports `Range: bytes=START-[END]` so a broken download resumes. "
                        "A download that started is served whole even if the job is deleted or expires meanwhile.",
            responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}, 206: {"description": "a range"},
                       404: {"model": ErrorPublic}, 409: {"model": ErrorPublic}, 416: {"model": ErrorPublic}})
async def get_result(job_id: JobId, store: StoreDep, caller: CallerDep, request: Request) -> StreamingResponse:
    job = await asyncio.to_thread(store.get, job_id, caller.owner)
    if job.state != JobState.SUCCEEDED:
        raise ConflictError(f"job {job_id} is {job.state}" + (f" ({job.error})" if job.error else "")
                            + "; its result is ready once it succeeded")
    handle = await asyncio.to_thread(store.open_result, job)
    size = os.fstat(handle.fileno()).st_size
    filename = f"{job.model}-seed{job.request['seed']}.{job.format}"
    return open_file_response(handle, size, MEDIA_TYPES[job.format], filename, request.headers.get("range"))


@router.delete("/{job_id}", status_code=204, summary="Cancel and delete a job", responses={404: {"model": ErrorPublic}},
               description="Stops a queued or running job and deletes it and its files.")
async def delete_job(job_id: JobId, store: StoreDep, runner: RunnerDep, caller: CallerDep) -> Response:
    await asyncio.to_thread(store.get, job_id, caller.owner)
    await runner.cancel(job_id)
    await asyncio.to_thread(store.delete, job_id)
    return Response(status_code=204)

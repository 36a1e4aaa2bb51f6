"""Asynchronous dataset jobs: submit, poll, download (with HTTP Range), cancel and delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends
from fastapi.responses import FileResponse, Response

from app.api.deps import JobId, RepositoryDep, RunnerDep, SettingsDep, StoreDep, require_api_key, require_json
from app.api.schemas import ErrorPublic, JobPublic, JobRequest
from app.engine.exports import MEDIA_TYPES, export_limit
from app.engine.jobs import Job, estimate_bytes
from app.engine.plans import plan_samples
from app.engine.states import JobState
from app.errors import ConflictError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)],
                   responses={code: {"model": ErrorPublic} for code in (401, 403, 404, 422)})
EXAMPLES = {"balanced": {"summary": "1,000 images of every digit as an ImageFolder zip",
                         "value": {"model": "mnist-cgan", "per_class": 1000, "seed": 0, "format": "zip"}}}


def job_public(job: Job) -> JobPublic:
    url = f"/v1/jobs/{job.id}/result" if job.state == JobState.SUCCEEDED else None
    return JobPublic(**{k: v for k, v in vars(job).items()}, eta_s=job.eta_s, result_url=url)


@router.post("", status_code=202, summary="Submit a dataset job", response_model=JobPublic,
             description="Queues a dataset export that runs in the background and persists across restarts. "
                         "Answers 202 with the job and its `Location`; poll it, then download the result. "
                         "A job that would pass the disk quota is refused with 507.",
             responses={409: {"model": ErrorPublic}, 507: {"model": ErrorPublic}},
             dependencies=[Depends(require_json)])
async def submit_job(body: Annotated[JobRequest, Body(openapi_examples=EXAMPLES)], response: Response,
                     repository: RepositoryDep, settings: SettingsDep, store: StoreDep,
                     runner: RunnerDep) -> JobPublic:
    model = repository.ready_model(body.model).model
    plan = plan_samples(model, per_class=body.per_class, n=body.n, label=body.label, seed=body.seed,
                        truncation=body.truncation, filters=body.filters(),
                        max_samples=export_limit(settings, body.format), scope=f"one {body.format} export")
    runner.check_quota(estimate_bytes(plan, model.image_shape, body.format))
    job = store.create(model.name, {**body.model_dump(), "seed": plan.seed}, len(plan), body.format)
    runner.submit(job, plan)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_public(job)


@router.get("/{job_id}", summary="Job state", response_model=JobPublic,
            description="State (queued, running, succeeded, failed), progress, ETA and error.")
async def get_job(job_id: JobId, store: StoreDep) -> JobPublic:
    return job_public(store.get(job_id))


@router.get("/{job_id}/result", summary="Download a job's archive", response_class=FileResponse,
            description="The finished archive. Supports `Range: bytes=START-` so a broken download resumes.",
            responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}, 206: {"description": "a range"},
                       409: {"model": ErrorPublic}})
async def get_result(job_id: JobId, store: StoreDep) -> FileResponse:
    job = store.get(job_id)
    if job.state != JobState.SUCCEEDED:
        raise ConflictError(f"job {job_id} is {job.state}" + (f" ({job.error})" if job.error else "")
                            + "; its result is ready once it succeeded")
    filename = f"{job.model}-seed{job.request['seed']}.{job.format}"
    return FileResponse(store.result_path(job), media_type=MEDIA_TYPES[job.format], filename=filename)


@router.delete("/{job_id}", status_code=204, summary="Cancel and delete a job",
               description="Stops a queued or running job and deletes it and its files.")
async def delete_job(job_id: JobId, store: StoreDep, runner: RunnerDep) -> Response:
    store.get(job_id)
    await runner.cancel(job_id)
    store.delete(job_id)
    return Response(status_code=204)

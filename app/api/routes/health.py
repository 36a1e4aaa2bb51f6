"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import MetricsDep, RepositoryDep, StoreDep
from app.api.schemas import LivePublic, ReadyPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness", description="200 while the process runs.", response_model=LivePublic)
@router.head("/healthz", include_in_schema=False)  # probes that only look at the status
async def check_liveness() -> LivePublic:
    return LivePublic()


@router.get("/readyz", summary="Readiness", response_model=ReadyPublic,
            description="200 only when every model that should serve is loaded and its worker runs; else 503 "
                        "naming what is not ready.",
            responses={503: {"model": ReadyPublic, "description": "not ready; `problems` says why"}})
async def check_readiness(repository: RepositoryDep) -> JSONResponse:
    problems = repository.not_ready(public=True)  # no key needed: models trained through the API go unnamed
    body = ReadyPublic(ready=not problems, problems=problems,
                       models={n: e.status for n, e in repository.entries.items() if e.owner is None})
    return JSONResponse(body.model_dump(), status_code=503 if problems else 200)


@router.get("/metrics", summary="Prometheus metrics", description="Prometheus text exposition format.",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def get_metrics(metrics: MetricsDep, store: StoreDep) -> Response:
    metrics.set_queue(await asyncio.to_thread(store.queue_stats))
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

"""Shared dependencies as `Annotated` aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.errors import AuthError, UnsupportedMediaTypeError
from app.jobs import JobRunner, JobStore
from app.metrics import Metrics
from app.repository import ModelRepository
from app.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_repository(request: Request) -> ModelRepository:
    return request.app.state.repository


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_store(request: Request) -> JobStore:
    return request.app.state.jobs


def get_runner(request: Request) -> JobRunner:
    return request.app.state.job_runner


SettingsDep = Annotated[Settings, Depends(get_settings)]
RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
StoreDep = Annotated[JobStore, Depends(get_store)]
RunnerDep = Annotated[JobRunner, Depends(get_runner)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With API keys configured, every /v1 route needs `Authorization: Bearer <key>` (401 without, 403 wrong)."""
    if not settings.api_keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing API key: send the header 'Authorization: Bearer <key>'", 401)
    # compare against every key, always, in constant time
    matches = [hmac.compare_digest(token.encode(), key.encode()) for key in settings.api_keys]
    if not any(matches):
        raise AuthError("the API key is not valid", 403)


def require_json(request: Request) -> None:
    """JSON routes refuse other content types with 415 (FastAPI would otherwise guess)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaTypeError(f"send the body as JSON with 'Content-Type: application/json', not "
                                        f"{content_type or 'no content type'!r}")

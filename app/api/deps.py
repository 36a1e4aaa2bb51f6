"""Shared dependencies as `Annotated` aliases."""

from __future__ import annotations

import hmac
import math
import time
from typing import Annotated

from fastapi import Depends, Path, Request

from app.engine.jobs import JOB_ID, JobRunner, JobStore
from app.engine.metrics import Metrics
from app.engine.repository import MODEL_NAME, ModelRepository
from app.errors import InvalidApiKeyError, MissingApiKeyError, RateLimitedError, UnsupportedMediaTypeError
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


ModelName = Annotated[str, Path(description="a model's name (GET /v1/models lists them)", pattern=MODEL_NAME.pattern,
                                openapi_examples={"GAN": {"value": "mnist-cgan"}, "VAE": {"value": "mnist-cvae"}})]
JobId = Annotated[str, Path(description="the id POST /v1/jobs returned", pattern=JOB_ID.pattern)]

SettingsDep = Annotated[Settings, Depends(get_settings)]
RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
StoreDep = Annotated[JobStore, Depends(get_store)]
RunnerDep = Annotated[JobRunner, Depends(get_runner)]


class RateLimiter:
    """A token bucket per caller: `rate` requests a second, up to `burst` at once."""

    def __init__(self, rate: float, burst: int, max_callers: int = 10_000) -> None:
        self.rate, self.burst, self.max_callers = rate, burst, max_callers
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, caller: str) -> None:
        now = time.monotonic()
        tokens, last = self._buckets.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[caller] = (tokens, now)
            raise RateLimitedError(f"rate limit of {self.rate:g} requests a second exceeded; slow down",
                                   retry_after_s=max(1, math.ceil((1 - tokens) / self.rate)))
        self._buckets[caller] = (tokens - 1, now)
        if len(self._buckets) > self.max_callers:  # forget callers whose bucket has refilled
            self._buckets = {k: v for k, v in self._buckets.items() if v[0] + (now - v[1]) * self.rate < self.burst}


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With API keys configured, every /v1 route needs `Authorization: Bearer <key>` (401 without, 403 wrong);
    with a rate limit, each key (or client address) gets 429 with Retry-After beyond it."""
    caller = f"address:{request.client.host if request.client else 'unknown'}"
    if settings.api_keys:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise MissingApiKeyError("missing API key: send the header 'Authorization: Bearer <key>'")
        # compare against every key, always, in constant time
        matches = [hmac.compare_digest(token.encode(), key.encode()) for key in settings.api_keys]
        if not any(matches):
            raise InvalidApiKeyError("the API key is not valid")
        caller = f"key:{matches.index(True)}"  # the key's position, never the key itself
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is not None:
        limiter.take(caller)


def require_json(request: Request) -> None:
    """JSON routes refuse other content types with 415 (FastAPI would otherwise guess)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaTypeError(f"send the body as JSON with 'Content-Type: application/json', not "
                                        f"{content_type or 'no content type'!r}")

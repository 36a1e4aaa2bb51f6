"""Shared dependencies as `Annotated` aliases. All are `async def`: FastAPI runs a plain `def` dependency in its
thread pool, a thread hop per dependency per request, and none of these blocks."""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Path, Request

from app.engine.jobs import JobWorker
from app.engine.jobstore import JOB_ID, JobStore
from app.engine.metrics import Metrics
from app.engine.repository import MODEL_REF, ModelRepository
from app.engine.webhooks import WebhookSender
from app.errors import (
    ForbiddenError,
    InvalidApiKeyError,
    InvalidInputError,
    MissingApiKeyError,
    RateLimitedError,
    UnsupportedMediaTypeError,
)
from app.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_repository(request: Request) -> ModelRepository:
    return request.app.state.repository


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_store(request: Request) -> JobStore:
    return request.app.state.jobs


async def get_worker(request: Request) -> JobWorker | None:
    """This process's job worker (None with SYNTHGEN_RUN_JOBS=false: a separate worker runs the jobs)."""
    return request.app.state.job_worker


async def get_webhooks(request: Request) -> WebhookSender:
    return request.app.state.webhooks


ModelName = Annotated[str, Path(description="a model's name (GET /v1/models lists them)", pattern=MODEL_REF.pattern,
                                openapi_examples={"GAN": {"value": "mnist-cgan"}, "VAE": {"value": "mnist-cvae"}})]
JobId = Annotated[str, Path(description="the id POST /v1/jobs returned", pattern=JOB_ID.pattern)]
TrainingId = Annotated[str, Path(description="the id POST /v1/trainings returned", pattern=JOB_ID.pattern)]

SettingsDep = Annotated[Settings, Depends(get_settings)]
RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
StoreDep = Annotated[JobStore, Depends(get_store)]
WorkerDep = Annotated[JobWorker | None, Depends(get_worker)]
WebhooksDep = Annotated[WebhookSender, Depends(get_webhooks)]


class RateLimiter:
    """A token bucket per caller: `rate` requests a second, up to `burst` at once."""

    def __init__(self, rate: float, burst: int, max_callers: int = 10_000, what: str = "requests") -> None:
        self.rate, self.burst, self.max_callers, self.what = rate, burst, max_callers, what
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, caller: str) -> float:
        """The caller's tokens now; RateLimitedError when under one."""
        now = time.monotonic()
        tokens, last = self._buckets.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        self._buckets[caller] = (tokens, now)
        if len(self._buckets) > self.max_callers:  # forget callers whose bucket has refilled
            self._buckets = {k: v for k, v in self._buckets.items() if v[0] + (now - v[1]) * self.rate < self.burst}
        if tokens < 1:
            raise RateLimitedError(f"rate limit of {self.rate:g} {self.what} a second exceeded; slow down",
                                   retry_after_s=max(1, math.ceil((1 - tokens) / self.rate)))
        return tokens

    def take(self, caller: str) -> None:
        tokens = self.check(caller)
        self._buckets[caller] = (tokens - 1, time.monotonic())


@dataclass(frozen=True)
class Caller:
    """Who is calling: `owner` names the API key (a fingerprint, never the key; "" in open mode) and owns the jobs
    it creates; `role` is admin or user; `bucket` keys its rate limits."""

    owner: str
    role: Literal["admin", "user"]
    bucket: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def models_of(self) -> str | None:
        """Whose models trained through the API it may see and use: its own; every key's (None) for an admin."""
        return None if self.is_admin else self.owner


def key_fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def authenticate(request: Request, settings: Settings) -> Caller:
    """The caller a request's API key names (401 without one, 403 for a wrong one; failures rate-limited per
    address); everyone is an admin in open mode."""
    address = f"address:{request.client.host if request.client else 'unknown'}"
    if settings.open_access:
        return Caller("", "admin", address)
    failures: RateLimiter = request.app.state.auth_failures
    failures.check(address)  # before comparing: a rate-limited guess is not even tried
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        failures.take(address)
        raise MissingApiKeyError("missing API key: send the header 'Authorization: Bearer <key>'")
    # compare against every key, always, in constant time
    roles = [("admin", key) for key in settings.admin_api_keys] + [("user", key) for key in settings.api_keys]
    matches = [hmac.compare_digest(token.encode(), key.encode()) for _, key in roles]
    if not any(matches):
        failures.take(address)
        raise InvalidApiKeyError("the API key is not valid")
    owner = key_fingerprint(token)
    return Caller(owner, roles[matches.index(True)][0], f"key:{owner}")  # type: ignore[arg-type]


async def require_api_key(request: Request, settings: SettingsDep) -> Caller:
    """With API keys configured, every /v1 route needs `Authorization: Bearer <key>` (401 without, 403 wrong; failed
    attempts are rate-limited per address); with a rate limit, each key (or client address) gets 429 beyond it."""
    caller = authenticate(request, settings)
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is not None:
        limiter.take(caller.bucket)
    return caller


CallerDep = Annotated[Caller, Depends(require_api_key)]


async def require_admin(caller: CallerDep) -> Caller:
    """Operations on the shared model repository need an admin key (everyone is admin in open mode)."""
    if not caller.is_admin:
        raise ForbiddenError("this operation needs an API key with the admin role (SYNTHGEN_ADMIN_API_KEYS)")
    return caller


def require_content_type(*allowed: str, how: str, repeatable: tuple[str, ...] | None = None
                         ) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing a body of another content type with 415, saying `how` to send it (FastAPI would
    otherwise guess, and a JSON body on a form route would read as missing fields). With `repeatable` (a form
    route), a part or field sent twice is refused unless it is named there: the route would silently read one."""

    async def check(request: Request) -> None:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() not in allowed:
            raise UnsupportedMediaTypeError(f"send the body {how}, not {content_type or 'no content type'!r}")
        if repeatable is not None:
            form = await request.form()  # parsed already for the route: the same form
            for key in form:
                if key not in repeatable and len(form.getlist(key)) > 1:
                    raise InvalidInputError(f"{key} is sent {len(form.getlist(key))} times; send it once")

    return check


require_json = require_content_type("application/json", how="as JSON with 'Content-Type: application/json'")


def require_multipart(example: str, repeatable: tuple[str, ...] = ()) -> Callable[[Request], Awaitable[None]]:
    """A multipart-only route's check; `example` shows its file parts in curl's words, `repeatable` the parts that
    may come more than once."""
    return require_content_type("multipart/form-data", how=f"as multipart/form-data with the file(s) as parts (curl "
                                f"{example}, httpx files=...)", repeatable=repeatable)


require_form = require_content_type("multipart/form-data", "application/x-www-form-urlencoded",
                                    how="as multipart/form-data (curl -F 'dataset=@data.zip', httpx files=...)",
                                    repeatable=())

"""The one place where exceptions become HTTP status codes. Every error body is `{"detail": ..., "request_id": ...}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import (
    AuthError,
    CheckpointError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    QuotaExceededError,
    RateLimitedError,
    RequestTimeoutError,
    SynthgenError,
    UnsupportedMediaTypeError,
)

log = logging.getLogger("synthgen.api")

STATUS_BY_ERROR: list[tuple[type[Exception], int]] = [
    (PayloadTooLargeError, 413),
    (UnsupportedMediaTypeError, 415),
    (InvalidInputError, 422),
    (NotFoundError, 404),
    (ConflictError, 409),
    (RateLimitedError, 429),
    (OverloadedError, 503),
    (RequestTimeoutError, 504),
    (QuotaExceededError, 507),
    (CheckpointError, 500),
    (SynthgenError, 500),
]


def error_response(request: Request, status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    return JSONResponse({"detail": detail, "request_id": request_id}, status_code=status, headers=headers)


def _location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SynthgenError)
    async def synthgen_error(request: Request, exc: SynthgenError) -> JSONResponse:
        if isinstance(exc, AuthError):
            headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
            return error_response(request, exc.status_code, str(exc), headers)
        status = next(code for cls, code in STATUS_BY_ERROR if isinstance(exc, cls))
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, OverloadedError) else None
        if status >= 500:
            log.error("request failed: %s", exc)
        return error_response(request, status, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            if error.get("type") == "json_invalid":
                problems.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})")
            else:
                problems.append(f"{_location(tuple(error.get('loc', ())))}: {error.get('msg')}")
        return error_response(request, 422, "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

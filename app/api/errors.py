"""The one place where exceptions become HTTP answers. Every error body is `{"detail": ..., "request_id": ...}`."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from app.errors import (
    CheckpointError,
    ClientDisconnectedError,
    ConflictError,
    ForbiddenError,
    InvalidApiKeyError,
    InvalidInputError,
    MissingApiKeyError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    QualityGateError,
    QuotaExceededError,
    RangeNotSatisfiableError,
    RateLimitedError,
    RequestTimeoutError,
    SlowRequestError,
    SynthgenError,
    UnsupportedMediaTypeError,
)

log = logging.getLogger("synthgen.api")

# The first class an error is an instance of gives its status, so subclasses come before their bases.
STATUS_BY_ERROR: list[tuple[type[SynthgenError], int]] = [
    (PayloadTooLargeError, 413),
    (SlowRequestError, 408),
    (RangeNotSatisfiableError, 416),
    (UnsupportedMediaTypeError, 415),
    (InvalidInputError, 422),
    (MissingApiKeyError, 401),
    (InvalidApiKeyError, 403),
    (ForbiddenError, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (QualityGateError, 409),
    (RateLimitedError, 429),
    (ClientDisconnectedError, 499),  # nginx's "client closed request": only logs and metrics see it
    (OverloadedError, 503),
    (RequestTimeoutError, 504),
    (QuotaExceededError, 507),
    (CheckpointError, 500),
    (SynthgenError, 500),
]


def status_and_headers(exc: SynthgenError) -> tuple[int, dict[str, str] | None]:
    status = next(code for cls, code in STATUS_BY_ERROR if isinstance(exc, cls))
    if isinstance(exc, OverloadedError):
        return status, {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, MissingApiKeyError):
        return status, {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, RangeNotSatisfiableError):
        return status, {"Content-Range": f"bytes */{exc.size}"}
    return status, None


def error_response(request: Request, status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    return JSONResponse({"detail": detail, "request_id": request_id}, status_code=status, headers=headers)


def synthgen_error_response(request: Request, exc: SynthgenError) -> JSONResponse:
    status, headers = status_and_headers(exc)
    if status >= 500:
        log.error("request failed: %s", exc)
    return error_response(request, status, str(exc), headers)


async def send_error(send: Send, exc: SynthgenError, request_id: str) -> None:
    """Answer with an error from raw ASGI (the middleware, outside FastAPI's exception handlers)."""
    status, headers = status_and_headers(exc)
    body = json.dumps({"detail": str(exc), "request_id": request_id}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


_NAMES = {  # what a name that misses its pattern should look like, in words
    "name": "1-64 letters, digits and '._-', starting with a letter or digit; with @N for a version where a model is "
            "named (mnist-cgan, my-shoes@2)",
    "model": "1-64 letters, digits and '._-', starting with a letter or digit, with @N for a version (mnist-cgan@1)",
}


def _location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SynthgenError)
    async def synthgen_error(request: Request, exc: SynthgenError) -> JSONResponse:
        return synthgen_error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            if error.get("type") == "json_invalid":
                problems.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})")
            elif error.get("type") == "string_pattern_mismatch" and error.get("loc", ())[-1] in _NAMES:
                problems.append(f"{_location(tuple(error['loc']))}: {_NAMES[error['loc'][-1]]}")
            else:
                problems.append(f"{_location(tuple(error.get('loc', ())))}: {error.get('msg')}")
        return error_response(request, 422, "; ".join(problems))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # a bug: logged with its traceback, answered without internals
        log.exception("unexpected error", exc_info=exc)
        return error_response(request, 500, "internal error; the request id identifies it in the server's log")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8): a validation problem
            return error_response(request, 422, f"the body could not be parsed ({exc.detail}); send UTF-8 JSON "
                                  "(integers of at most 4,300 digits, nested at most a few hundred levels), or "
                                  "multipart form data for uploads")
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":  # no route matched
            detail = "no such route; the routes are listed at /docs (GET /openapi.json)"
        return error_response(request, exc.status_code, detail, getattr(exc, "headers", None))

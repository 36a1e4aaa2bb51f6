"""Typed errors carrying what the server said: its `detail`, the HTTP `status` and the `request_id` to quote."""

from __future__ import annotations

import httpx


class SynthgenError(Exception):
    """The server answered with an error (or a job failed)."""

    def __init__(self, status: int, detail: str, request_id: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}" + (f" (request {request_id})" if request_id else ""))
        self.status, self.detail, self.request_id = status, detail, request_id


class InvalidRequestError(SynthgenError):
    """400, 413, 415, 416, 422: the request itself is wrong; the detail says what to fix."""


class AuthenticationError(SynthgenError):
    """401 or 403: a missing or wrong API key."""


class NotFoundError(SynthgenError):
    """404: no such model or job."""


class ConflictError(SynthgenError):
    """409: valid, but not now (a model not loaded, a job not finished, a GAN asked for a VAE operation)."""


class RateLimitedError(SynthgenError):
    """429, still refused after the retries."""


class OverloadedError(SynthgenError):
    """503 (or 504), still refused after the retries."""


class ServerError(SynthgenError):
    """Any other 5xx."""


class JobFailedError(SynthgenError):
    """A job ended in the `failed` state; the detail is its error."""


_BY_STATUS = {401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError, 409: ConflictError,
              429: RateLimitedError, 503: OverloadedError, 504: OverloadedError}


def error_for(response: httpx.Response) -> SynthgenError:
    """The typed error of a (read) error response."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    detail = str(body.get("detail") or response.text or response.reason_phrase)
    request_id = body.get("request_id") or response.headers.get("x-request-id")
    status = response.status_code
    default = ServerError if status >= 500 else InvalidRequestError
    return _BY_STATUS.get(status, default)(status, detail, request_id)

"""One ASGI middleware: request id, body-size limit and read timeout, a bound on uploads in work, metrics and one
structured log line per request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import authenticate
from app.api.errors import send_error
from app.engine.metrics import Metrics
from app.errors import AuthError, OverloadedError, PayloadTooLargeError, RateLimitedError, SlowRequestError
from app.settings import Settings

log = logging.getLogger("synthgen.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_UPLOAD_ROUTES = re.compile(r"^/v1/.*/(reconstruct|inpaint)$|^/v1/augment$|^/v1/trainings$")


class UploadGate:
    """Bounds the uploads in work (their bodies, decompression and decoding are what costs memory and CPU):
    `per_client` at once per API key or address (429 beyond), `total` at once (wait up to `wait_s`, then 503)."""

    def __init__(self, total: int, per_client: int, wait_s: float = 30.0) -> None:
        self.per_client, self.wait_s = per_client, wait_s
        self._slots = asyncio.Semaphore(total)
        self._by_client: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def admit(self, client: str) -> AsyncIterator[None]:
        if self._by_client.get(client, 0) >= self.per_client:
            raise RateLimitedError(f"{self.per_client} uploads of yours are in work (SYNTHGEN_MAX_UPLOADS_PER_CLIENT); "
                                   "send the next once one finished", retry_after_s=1)
        self._by_client[client] = self._by_client.get(client, 0) + 1
        try:
            try:
                async with asyncio.timeout(self.wait_s):  # not wait_for: it can lose an acquired slot
                    await self._slots.acquire()
            except TimeoutError:
                raise OverloadedError("the server is busy with other uploads; retry shortly", retry_after_s=5) from None
            try:
                yield
            finally:
                self._slots.release()
        finally:
            self._by_client[client] -= 1
            if not self._by_client[client]:
                del self._by_client[client]


def _uploader(scope: Scope, settings: Settings) -> str:
    """Whom an upload counts against: its API key, checked before a byte of the body is read (a made-up key gets
    401/403, not a slot), else, in open mode, the client address."""
    return authenticate(Request(scope), settings).bucket


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.uploads = UploadGate(settings.max_concurrent_uploads, settings.max_uploads_per_client)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else os.urandom(16).hex()
        scope.setdefault("state", {})["request_id"] = request_id
        upload = bool(_UPLOAD_ROUTES.match(scope["path"]))
        limit = self.settings.max_upload_bytes if upload else self.settings.max_body_bytes
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            admitted = self.uploads.admit(_uploader(scope, self.settings)) if upload else contextlib.nullcontext()
            async with admitted:
                body = await _read_body(receive, limit, headers.get("content-length", ""),
                                        self.settings.body_timeout_s)
                if body is None:
                    status = 499  # the client went away before sending its body: not a server error
                    return
                replayed = False

                async def replay() -> Message:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_with_id)
        except (PayloadTooLargeError, SlowRequestError, OverloadedError, AuthError) as exc:
            if not response_started:
                await send_error(send_with_id, exc, request_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request_done(route, status, elapsed)
            state = scope.get("state", {})
            if log.isEnabledFor(logging.INFO):
                log.info({"request_id": request_id, "method": scope["method"], "route": route, "path": scope["path"],
                          "model": scope.get("path_params", {}).get("name"), "samples": state.get("n"),
                          "status": status, "latency_ms": round(elapsed * 1000, 2)})


async def _read_body(receive: Receive, limit: int, content_length: str, timeout_s: float) -> bytes | None:
    """The whole body within `timeout_s`, refusing (by Content-Length, then by counting) more than `limit` bytes."""
    too_large = PayloadTooLargeError(f"the request body is over the limit of {limit} bytes; send less (the limit is "
                                     "the SYNTHGEN_MAX_BODY_BYTES / SYNTHGEN_MAX_UPLOAD_BYTES setting)")
    if content_length.isdigit() and int(content_length) > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                body += message.get("body", b"")
                if len(body) > limit:
                    raise too_large
                if not message.get("more_body", False):
                    return bytes(body)
    except TimeoutError:
        raise SlowRequestError(f"the request body did not arrive within {timeout_s:g} s (the SYNTHGEN_BODY_TIMEOUT_S "
                               "setting); send it faster or send less") from None

"""One ASGI middleware: request id, body-size limit, metrics and one structured log line per request."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import send_error
from app.engine.metrics import Metrics
from app.errors import PayloadTooLargeError
from app.settings import Settings

log = logging.getLogger("synthgen.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_UPLOAD_ROUTES = re.compile(r"^/v1/.*/(reconstruct|inpaint)$|^/v1/augment$")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        limit = self.settings.max_upload_bytes if _UPLOAD_ROUTES.match(scope["path"]) else self.settings.max_body_bytes
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
            body = await _read_body(receive, limit, headers.get("content-length", ""))
            if body is None:
                return  # the client went away before sending its body
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_with_id)
        except PayloadTooLargeError as exc:
            if not response_started:
                await send_error(send_with_id, exc, request_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(elapsed)
            state = scope.get("state", {})
            if log.isEnabledFor(logging.INFO):
                log.info(json.dumps({"request_id": request_id, "method": scope["method"], "route": route,
                                     "path": scope["path"], "model": scope.get("path_params", {}).get("name"),
                                     "n": state.get("n"), "status": status, "latency_ms": round(elapsed * 1000, 2)}))


async def _read_body(receive: Receive, limit: int, content_length: str) -> bytes | None:
    """The whole body, refusing (by Content-Length, then by counting) more than `limit` bytes."""
    too_large = PayloadTooLargeError(f"the request body is over the limit of {limit} bytes; send less (the limit is "
                                     "the SYNTHGEN_MAX_BODY_BYTES / SYNTHGEN_MAX_UPLOAD_BYTES setting)")
    if content_length.isdigit() and int(content_length) > limit:
        raise too_large
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            raise too_large
        if not message.get("more_body", False):
            return bytes(body)

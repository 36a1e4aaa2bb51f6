"""A fast lane for the hottest route: a well-formed `POST /v1/models/{name}/generate` (JSON body that validates) is
answered here, in pure ASGI, skipping FastAPI's routing, dependency solving and body parsing, which under load cost a
one-sample request about as much as its share of a batched forward pass. Anything else, refusals of malformed
requests included, goes down the full stack, so answers read the same either way; the route's own handler does the
work in both."""

from __future__ import annotations

import re

from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import require_api_key, require_json
from app.api.errors import synthgen_error_response
from app.api.routes import generate
from app.api.schemas import GenerateRequest
from app.engine.repository import MODEL_REF
from app.errors import SynthgenError

_GENERATE = re.compile(rf"^/v1/models/({MODEL_REF.pattern.strip('^$')})/generate$")


class FastLane:
    """Pure ASGI middleware, inside the one that reads the body and counts requests."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # the route this lane stands in for (logs and metrics name it)
        self.route = next(r for r in generate.router.routes if getattr(r, "name", "") == "generate_samples")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _GENERATE.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        message = await receive()  # the whole body: the outer middleware read it
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return message
            return await receive()

        request = Request(scope, replay)
        try:
            await require_json(request)
            body = GenerateRequest.model_validate_json(message.get("body", b""))
        except (SynthgenError, ValidationError):
            await self.app(scope, replay, send)  # the full stack words the refusal
            return
        scope["route"], scope["path_params"] = self.route, {"name": match[1]}
        try:
            caller = await require_api_key(request, scope["app"].state.settings)
            response = await generate.answer(request, body, match[1], caller)
        except SynthgenError as exc:
            response = synthgen_error_response(request, exc)
        await response(scope, replay, send)

"""Sample generation: `POST /v1/models/{name}/generate`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import Response

from app.api.deps import Caller, CallerDep, ModelName, require_api_key, require_json
from app.api.disconnect import unless_disconnected
from app.api.responses import SAMPLE_RESPONSES, samples_response
from app.api.schemas import ErrorPublic, GenerateRequest
from app.engine import generation
from app.engine.generation import INLINE_SAMPLES
from app.engine.plans import plan_samples
from app.engine.repository import ModelRepository
from app.settings import Settings

router = APIRouter(prefix="/v1/models", tags=["generate"], dependencies=[Depends(require_api_key)])

GENERATE_EXAMPLES = {
    "grid": {"summary": "a PNG grid of 16 sevens", "value": {"n": 16, "label": "7", "seed": 0, "format": "png"}},
    "mixed": {"summary": "a PNG grid, classes drawn at random", "value": {"n": 64, "format": "png"}},
    "npz": {"summary": "arrays for a pipeline", "value": {"n": 100, "seed": 42, "format": "npz"}},
    "json": {"summary": "base64 PNGs in JSON", "value": {"n": 4, "label": 3, "seed": 1, "format": "json"}},
}
ERRORS = {code: {"model": ErrorPublic} for code in (401, 403, 404, 409, 413, 415, 422, 503, 504)}


@router.post(
    "/{name}/generate",
    summary="Generate samples",
    description=(
        "Generates `n` samples through the model's micro-batcher. A sample is a pure function of (model, seed, "
        "index): the same request gives the same pixels whether it ran alone or packed with others. "
        "`format=png` returns one grid image (Swagger UI shows it), `npz` the arrays `images` and `labels`, "
        "`json` a base64 PNG per sample. The seed used is echoed in `X-Seed`. "
        "A full queue answers 503 with Retry-After; a request waiting past the timeout answers 504."
    ),
    response_class=Response,
    responses={**SAMPLE_RESPONSES, **ERRORS},
    dependencies=[Depends(require_json)],
)
async def generate_samples(body: Annotated[GenerateRequest, Body(openapi_examples=GENERATE_EXAMPLES)], request: Request,
                           name: ModelName, caller: CallerDep) -> Response:
    return await answer(request, body, name, caller)


async def answer(request: Request, body: GenerateRequest, name: str, caller: Caller) -> Response:
    """The answer to a valid generate request (authenticated, body validated): the route's and the fast lane's."""
    repository: ModelRepository = request.app.state.repository
    settings: Settings = request.app.state.settings
    request.state.n = body.n
    async with repository.serving(name, caller.models_of) as served:
        plan = plan_samples(served.model, n=body.n, label=body.label, seed=body.seed, truncation=body.truncation,
                            filters=body.filters(), max_samples=settings.max_samples_per_request,
                            scope="one request (SYNTHGEN_MAX_SAMPLES_PER_REQUEST; use a dataset export for more)")
        work = generation.generate_samples(served, plan, settings)
        # a small request is done in milliseconds: watching its connection would cost more than it could save
        samples = await (work if body.n <= INLINE_SAMPLES else unless_disconnected(request, work))
    return await samples_response(samples, body.format)

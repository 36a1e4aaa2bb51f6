"""The generate fast lane: well-formed requests skip FastAPI's routing and dependency solving, and every answer,
refusals included, is the one the full stack gives."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi.routing
import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.api.app import create_app
from app.api.fastlane import FastLane
from app.settings import Settings

pytestmark = pytest.mark.anyio
KEY = {"Authorization": "Bearer user-key-0123456789"}


@asynccontextmanager
async def client_for(models_dir: Path, fast_lane: bool) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(models_dir=models_dir, device="cpu", max_batch_wait_ms=2, data_dir=models_dir.parent / "data",
                        api_keys=["user-key-0123456789"], max_samples_per_request=50)
    app = create_app(settings)
    if not fast_lane:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not FastLane]
    async with LifespanManager(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                       base_url="http://test", timeout=60) as client:
        yield client


CASES = {
    "npz": dict(json={"n": 3, "seed": 5, "format": "npz"}, headers=KEY),
    "json": dict(json={"n": 2, "seed": 5, "label": "3", "format": "json"}, headers=KEY),
    "png": dict(json={"n": 4, "seed": 5, "format": "png"}, headers=KEY),
    "filters, no evaluator": dict(json={"n": 2, "seed": 1, "min_confidence": 0.2, "format": "npz"}, headers=KEY),
    "no key": dict(json={"n": 1}),
    "wrong key": dict(json={"n": 1}, headers={"Authorization": "Bearer nope"}),
    "unknown model": dict(json={"n": 1}, headers=KEY, model="nope"),
    "too many": dict(json={"n": 51}, headers=KEY),
    "unknown label": dict(json={"n": 1, "label": "cat"}, headers=KEY),
    "bad field": dict(json={"n": 0, "colour": "red"}, headers=KEY),
    "not json": dict(content=b"{n: 1", headers={**KEY, "Content-Type": "application/json"}),
    "form": dict(data={"n": "1"}, headers=KEY),
    "query": dict(json={"n": 1, "seed": 2, "format": "npz"}, headers=KEY, params={"x": "1"}),
}


async def _answers(models_dir: Path, fast_lane: bool) -> dict[str, tuple[int, dict[str, str], bytes]]:
    out = {}
    async with client_for(models_dir, fast_lane) as client:
        for name, case in CASES.items():
            case = dict(case)
            response = await client.post(f"/v1/models/{case.pop('model', 'digits-gan')}/generate", **case)
            headers = {k: v for k, v in response.headers.items() if k not in ("x-request-id", "content-length")}
            body = response.content
            if headers.get("content-type") == "application/json" and response.status_code >= 400:
                body = response.json()["detail"].encode()
            out[name] = response.status_code, headers, body
    return out


async def test_answers_are_those_of_the_full_stack(models_dir: Path) -> None:
    fast, full = await _answers(models_dir, True), await _answers(models_dir, False)
    assert {name: status for name, (status, _, _) in fast.items()} == {
        "npz": 200, "json": 200, "png": 200, "filters, no evaluator": 422, "no key": 401, "wrong key": 403,
        "unknown model": 404, "too many": 422, "unknown label": 422, "bad field": 422, "not json": 422, "form": 415,
        "query": 200}
    for name in CASES:
        assert fast[name] == full[name], name


async def test_well_formed_requests_skip_dependency_solving(models_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    solved: list[str] = []
    original = fastapi.routing.solve_dependencies

    async def counting(*args, **kwargs):
        solved.append(kwargs["request"].url.path)
        return await original(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    async with client_for(models_dir, True) as client:
        ok = await client.post("/v1/models/digits-gan/generate", json={"n": 2, "format": "npz"}, headers=KEY)
        assert ok.status_code == 200 and ok.headers["x-request-id"] and ok.headers["x-seed"]
        assert solved == []  # the lane answered
        refused = await client.post("/v1/models/digits-gan/generate", json={"n": 0}, headers=KEY)
        assert refused.status_code == 422 and solved == ["/v1/models/digits-gan/generate"]  # the full stack did
        metrics = (await client.get("/metrics")).text
        for status in ("200", "422"):  # counted under the route either way
            assert f'synthgen_requests_total{{route="/v1/models/{{name}}/generate",status="{status}"}} 1.0' in metrics

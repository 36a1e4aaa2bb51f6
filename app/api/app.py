"""The FastAPI application: settings, device worker, model repository, middleware, error mapping and routes."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from app import __version__
from app.api.deps import RateLimiter
from app.api.errors import install_error_handlers
from app.api.fastlane import FastLane
from app.api.logs import configure_logging
from app.api.middleware import RequestContextMiddleware
from app.api.page_security import gallery_headers
from app.api.routes import augment, datasets, generate, health, jobs, model_jobs, models, vae
from app.api.routes import webhooks as webhook_routes
from app.core.device import resolve_device
from app.engine.jobs import JobWorker, worker_name
from app.engine.jobstore import JobStore
from app.engine.metrics import Metrics
from app.engine.model_jobs import remove_unused_datasets
from app.engine.remote_models import model_settings
from app.engine.repository import ModelRepository
from app.engine.results import result_storage
from app.engine.webhooks import UrlPolicy, WebhookSender, load_master_secret
from app.settings import Settings

log = logging.getLogger("synthgen.app")
STATIC = Path(__file__).resolve().parent.parent / "static"
DESCRIPTION = """Synthetic image datasets from trained GAN and VAE checkpoints.

Concurrent requests are packed into batches per model; a sample is a pure function of (model, seed, index).
Try **POST /v1/models/{name}/generate** with `format=png` to see a grid of samples."""


async def _expire_jobs(store: JobStore, settings: Settings, every_s: float = 30.0) -> None:
    """Delete finished jobs and their results once past their TTL, and training datasets no training has used for
    as long."""
    while True:
        await asyncio.to_thread(store.expire, settings.job_ttl_s)
        await asyncio.to_thread(remove_unused_datasets, settings, store, settings.job_ttl_s)
        await asyncio.sleep(every_s)


_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _standard_bounds(node: object) -> None:
    """Bounds of form fields whose type carries a validator come out of FastAPI as pydantic's `ge`/`le`; JSON Schema
    (Swagger UI, client generators) reads `minimum`/`maximum`."""
    if isinstance(node, dict):
        if node.get("type") in ("integer", "number"):
            for pydantic_name, json_name in _BOUNDS.items():
                if pydantic_name in node:
                    node[json_name] = node.pop(pydantic_name)
        for value in node.values():
            _standard_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _standard_bounds(value)


def _json_first(schema: dict) -> dict:
    """Answers with several media types list application/json first: client generators type a response by its
    first media type, and JSON is the one with a schema."""
    for operation in (op for path in schema["paths"].values() for op in path.values()):
        for response in operation.get("responses", {}).values():
            content = response.get("content", {})
            if "application/json" in content:
                response["content"] = {"application/json": content["application/json"], **content}
    return schema


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; models load in the lifespan (at start-up), on the device's single worker thread."""
    settings = settings or Settings()
    configure_logging(settings.log_level)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        device = resolve_device(settings.device)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"synthgen-{device.type}")
        cpu = ThreadPoolExecutor(max_workers=settings.cpu_workers, thread_name_prefix="synthgen-codec")
        served = await asyncio.to_thread(model_settings, settings)
        repository = ModelRepository(served, device, executor, cpu, metrics)
        app.state.repository = repository
        if not served.models_dir.is_dir():
            log.warning("the model repository %s does not exist (SYNTHGEN_MODELS_DIR): only models trained through "
                        "the API will be served", served.models_dir)
        if settings.open_access:
            log.warning("no API keys are configured: anyone who can reach this server may use every operation "
                        "(set SYNTHGEN_API_KEYS and SYNTHGEN_ADMIN_API_KEYS to require keys)")
        store = await asyncio.to_thread(JobStore, settings.data_dir, settings.database_url,
                                        result_storage(settings, settings.data_dir))
        master = await asyncio.to_thread(load_master_secret, settings.webhook_secret and
                                         settings.webhook_secret.get_secret_value(), settings.data_dir)
        webhooks = WebhookSender(master, UrlPolicy(settings.webhook_allow_hosts), settings.webhook_max_attempts,
                                 settings.webhook_backoff_s, settings.webhook_timeout_s)

        async def announce(job_id: str) -> None:
            job = await asyncio.to_thread(store.get, job_id)
            url = job.request.get("callback_url")
            if url and job.kind == "training":
                webhooks.send(url, job.owner, f"training.{job.state}",
                              model_jobs.training_public(job).model_dump(mode="json"))
            elif url:
                public = await asyncio.to_thread(jobs.job_with_files, store, job)
                webhooks.send(url, job.owner, f"job.{job.state}", public.model_dump(mode="json"))

        worker = JobWorker(store, repository, settings, worker_name(settings), metrics, on_finished=announce) \
            if settings.run_jobs else None
        app.state.jobs, app.state.job_worker, app.state.webhooks = store, worker, webhooks
        housekeeping = [asyncio.create_task(_expire_jobs(store, settings)),
                        asyncio.create_task(repository.supervise())]
        await repository.load_all()
        # Everything alive now (torch, the app, the models) lives as long as the process: out of the collector's
        # sight, a full collection no longer walks it (its pauses made p99 latencies of 40-230 ms under load)
        gc.collect()
        gc.freeze()
        if worker is not None:  # only now: a job claimed while its model still loaded would fail (409)
            housekeeping.append(asyncio.create_task(worker.run()))
        try:
            yield
        finally:
            for task in housekeeping:
                task.cancel()
            if worker is not None:
                await worker.close()
            await webhooks.close()
            await repository.close()
            await asyncio.to_thread(store.close)
            executor.shutdown(wait=True, cancel_futures=True)
            cpu.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="synthgen", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, generate_unique_id_function=lambda route: route.name)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    gallery_security = gallery_headers((STATIC / "gallery" / "index.html").read_text())

    @app.get("/", include_in_schema=False)
    async def gallery() -> FileResponse:
        return FileResponse(STATIC / "gallery" / "index.html", headers=gallery_security)

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        # Swagger UI from the package, not a CDN: /docs works on hosts without internet access.
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="synthgen API",
                                   swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger-ui/swagger-ui.css",
                                   swagger_favicon_url="/static/swagger-ui/favicon-32x32.png")

    app.state.settings = settings
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            _standard_bounds(_json_first(default_openapi()))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.metrics = metrics
    if settings.rate_limit_per_s:
        app.state.rate_limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    app.state.auth_failures = RateLimiter(settings.auth_failures_per_s, 10, what="failed authentications")
    install_error_handlers(app)

    for module in (health, models, generate, vae, datasets, jobs, model_jobs, webhook_routes, augment):
        app.include_router(module.router)
    app.add_middleware(FastLane)  # inside RequestContextMiddleware: it reads the body and counts the request
    app.add_middleware(RequestContextMiddleware, settings=settings, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID", "Range"],
                           expose_headers=["X-Request-ID", "X-Seed", "X-Rejected", "Retry-After", "Location",
                                           "Content-Disposition", "Content-Range", "Accept-Ranges"])
    return app

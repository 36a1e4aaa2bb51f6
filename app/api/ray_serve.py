"""synthgen on Ray Serve: the same FastAPI app (routes, micro-batchers, filters, encoders, lifespan) built on every
replica of a Serve deployment, with Serve's autoscaling on ongoing requests. Ray is imported only here.

    serve run app.api.ray_serve:build models_dir=/models num_gpus=1 max_replicas=8

Arguments (`key=value`): `num_gpus`, `num_cpus` (per replica), `min_replicas`, `max_replicas`,
`target_ongoing_requests`, `max_ongoing_requests`; any other key is a setting (`models_dir=/models` becomes
`SYNTHGEN_MODELS_DIR`)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from app.api.app import create_app
from app.settings import Settings

SERVE_OPTIONS = {"num_gpus": 0.0, "num_cpus": 1.0, "min_replicas": 1, "max_replicas": 4,
                 "target_ongoing_requests": 64, "max_ongoing_requests": 1024}


def _asgi_app() -> FastAPI:
    """Run on each replica: the app from the replica's SYNTHGEN_* environment."""
    return create_app(Settings())


def build(args: dict[str, Any]) -> Application:
    """The Serve application (`serve run app.api.ray_serve:build key=value …`)."""
    options = {key: type(default)(args.get(key, default)) for key, default in SERVE_OPTIONS.items()}
    settings = {f"SYNTHGEN_{key.upper()}": str(value) for key, value in args.items() if key not in SERVE_OPTIONS}
    settings.setdefault("SYNTHGEN_RUN_JOBS", "false")  # jobs run in `synthgen worker`s; replicas serve requests
    Settings(**{key.removeprefix("SYNTHGEN_").lower(): value for key, value in settings.items()})  # fail here, early
    ingress = serve.ingress(_asgi_app)(type("Synthgen", (), {"__doc__": "synthgen's FastAPI app on one replica"}))
    deployment = serve.deployment(
        ingress, name="synthgen", max_ongoing_requests=options["max_ongoing_requests"],
        autoscaling_config={"min_replicas": options["min_replicas"], "max_replicas": options["max_replicas"],
                            "target_ongoing_requests": options["target_ongoing_requests"]},
        ray_actor_options={"num_gpus": options["num_gpus"], "num_cpus": options["num_cpus"],
                           "runtime_env": {"env_vars": settings}})
    return deployment.bind()

"""The container files: compose keys that matter, and the Dockerfile's contract (the image itself is built and
smoke-tested by `make docker-check`, which replays deploy/install.sh in a fresh virtual environment)."""

from __future__ import annotations

import yaml

from tests.conftest import ROOT


def test_compose_profiles_select_services_without_surprises() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    # every service is behind a profile: `--profile cpu` never starts the GPU service, and the reverse
    assert {name: service["profiles"] for name, service in services.items()} == {
        "api-gpu": ["gpu"], "api-cpu": ["cpu"], "prometheus": ["monitoring"],
        **{name: ["scale"] for name in ("postgres", "minio", "setup", "api-scale", "worker", "proxy")}}
    gpu, cpu = services["api-gpu"], services["api-cpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "deploy" not in cpu
    assert gpu["build"]["args"]["VARIANT"] == "cuda" and cpu["build"]["args"]["VARIANT"] == "cpu"
    assert gpu["environment"]["SYNTHGEN_DEVICE"] == "${SYNTHGEN_DEVICE:-cuda}"
    assert cpu["environment"]["SYNTHGEN_DEVICE"] == "${SYNTHGEN_DEVICE:-cpu}"
    published = [service["ports"][0].rsplit(":", 1)[0] for service in services.values() if "ports" in service]
    assert len(set(published)) == len(published)  # no two services publish the same host port
    for service in (gpu, cpu):
        env = service["environment"]
        # the README's defaults unless the operator overrides them
        assert env["SYNTHGEN_DTYPE"] == "${SYNTHGEN_DTYPE:-float32}"
        assert env["SYNTHGEN_MAX_BATCH_SIZE"] == "${SYNTHGEN_MAX_BATCH_SIZE:-256}"
        assert all(key.startswith("SYNTHGEN_") for key in env)
        assert service["restart"] == "unless-stopped" and "/readyz" in " ".join(service["healthcheck"]["test"])
        assert "./models:/srv/synthgen/models:ro" in service["volumes"]
        assert "synthgen-data:/srv/synthgen/data" in service["volumes"]
        assert service["networks"]["default"]["aliases"] == ["synthgen"]
    assert "synthgen-data" in compose["volumes"]
    # Prometheus discovers the services that run by their shared alias: no target for one that was not started
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics" and "static_configs" not in scrape
    assert scrape["dns_sd_configs"] == [{"names": ["synthgen"], "type": "A", "port": 8000}]
    workers = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"][1]
    assert workers["dns_sd_configs"][0]["names"] == ["synthgen-worker"]
    readme = (ROOT / "README.md").read_text()
    assert "docker compose --profile gpu up -d" in readme and "docker compose --profile cpu up -d" in readme
    assert "docker compose --profile scale up -d" in readme


def test_the_scale_profile_runs_apart_on_postgresql_and_object_storage() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    api, worker = services["api-scale"], services["worker"]
    assert api["deploy"]["replicas"] == 2 and worker["deploy"]["replicas"] == 2 and "ports" not in api
    assert "--no-jobs" in api["command"] and worker["command"][:2] == ["synthgen", "worker"]
    for service in (api, worker, services["setup"]):
        env = service["environment"]
        assert env["SYNTHGEN_DATABASE_URL"].startswith("postgresql://") and "@postgres/" in env["SYNTHGEN_DATABASE_URL"]
        assert env["SYNTHGEN_RESULTS_URL"].startswith("s3://") and env["SYNTHGEN_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "synthgen db upgrade" in services["setup"]["command"][-1]
    assert api["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    # trainings: workers train on the API's uploads and promote models the API replicas serve, in the data volume
    assert all("synthgen-data:/srv/synthgen/data" in service["volumes"] for service in (api, worker))
    assert "api-scale:8000" in (ROOT / "deploy" / "nginx.conf").read_text()


def test_dockerfile_contract() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in dockerfile  # not root
    assert "HEALTHCHECK" in dockerfile and "/readyz" in dockerfile
    assert 'CMD ["synthgen", "serve", "--host", "0.0.0.0"' in dockerfile
    assert "sh deploy/install.sh" in dockerfile and "COPY models ./models" in dockerfile
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[0] == "*" or "*" in ignore  # everything is excluded unless listed
    assert "models/*/training_state.*" in ignore


def test_every_setting_is_documented_in_the_readme() -> None:
    from app.settings import Settings

    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`SYNTHGEN_{name.upper()}`" not in readme]
    assert not missing, f"document these settings in the README: {missing}"

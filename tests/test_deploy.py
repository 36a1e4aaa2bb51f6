"""The container files: compose keys that matter, and the Dockerfile's contract (the image itself is built and
smoke-tested by `make docker-check`, which replays deploy/install.sh in a fresh virtual environment)."""

from __future__ import annotations

import yaml

from tests.conftest import ROOT


def test_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    api = services["api"]
    device = api["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert api["build"]["args"]["VARIANT"] == "cuda" and api["environment"]["SYNTHGEN_DEVICE"].endswith("cuda}")
    for name in ("api", "api-cpu"):
        service = services[name]
        assert service["ports"] == ["${SYNTHGEN_PORT:-8000}:8000"]
        assert service["restart"] == "unless-stopped"
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        assert "./models:/srv/synthgen/models:ro" in service["volumes"]
        assert "synthgen-data:/srv/synthgen/data" in service["volumes"]
        assert all(key.startswith("SYNTHGEN_") for key in service["environment"])
    assert services["api-cpu"]["profiles"] == ["cpu"] and services["api-cpu"]["build"]["args"]["VARIANT"] == "cpu"
    assert "deploy" not in services["api-cpu"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert "synthgen-data" in compose["volumes"]
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics"


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

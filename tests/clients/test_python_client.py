"""The Python client as a pipeline gets it: `pip install ./clients/python` into a fresh virtual environment (no
torch, no server code), then its own tests against a real server process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

CLIENT = ROOT / "clients" / "python"


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("client-venv")
    source = venv / "source"  # pip builds in the source folder: a copy keeps the checkout clean
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "tests"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", str(source), "pytest", "anyio"],
                         capture_output=True, text=True, timeout=300)
    if pip.returncode != 0 and "Could not find a version" in pip.stderr + pip.stdout:
        pytest.skip(f"the package index cannot be reached to build a fresh environment: {pip.stderr[-300:]}")
    assert pip.returncode == 0, pip.stderr[-2000:]
    return venv


def test_client_installs_without_torch_or_the_server(fresh_venv: Path) -> None:
    installed = subprocess.run([fresh_venv / "bin" / "python", "-m", "pip", "list", "--format=freeze"],
                               capture_output=True, text=True, check=True).stdout.lower()
    assert "synthgen-client==" in installed
    assert "torch" not in installed and "fastapi" not in installed and "synthgen==" not in installed


def test_client_suite_passes_against_a_real_server(fresh_venv: Path, server: tuple[str, int]) -> None:
    url, _ = server
    run = subprocess.run([fresh_venv / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(CLIENT / "tests")], cwd=fresh_venv, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SYNTHGEN_TEST_URL": url, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-1000:]

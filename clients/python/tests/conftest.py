"""The client's tests talk to a real synthgen server named by SYNTHGEN_TEST_URL (the server's own suite starts one
with tiny 8×8 digit models `digits-gan` and `digits-vae` and runs these tests in a fresh virtual environment)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def url() -> str:
    value = os.environ.get("SYNTHGEN_TEST_URL")
    if not value:
        pytest.skip("no server: set SYNTHGEN_TEST_URL to a running synthgen server with digits-gan and digits-vae")
    return value


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

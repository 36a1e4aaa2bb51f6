"""The allocator settings every `synthgen` command applies first."""

from __future__ import annotations

import platform

import pytest

from app.core.allocator import tune_allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's; elsewhere tuning is a no-op")
def test_tune_allocator_applies_on_glibc() -> None:
    assert tune_allocator() is True


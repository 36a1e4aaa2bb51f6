"""Range requests on downloads (RFC 9110): one range served, what the server ignores sent whole, and 416 only for a
range that cannot be satisfied."""

from __future__ import annotations

import pytest

from app.api.responses import byte_range
from app.errors import RangeNotSatisfiableError


@pytest.mark.parametrize(("header", "span"), [
    (None, None),
    ("bytes=0-", (0, 100)),
    ("bytes=10-19", (10, 20)),
    ("bytes=90-500", (90, 100)),
    ("bytes=-30", (70, 100)),  # the last 30 bytes
    ("bytes=-500", (0, 100)),
    ("items=0-1", None),  # another unit: ignored, the whole file
    ("bytes=0-1,5-6", None),  # several ranges: ignored
    ("bytes=9-3", None),  # invalid: ignored
    ("bytes=-", None),
    ("nonsense", None),
])
def test_a_range_is_served_or_ignored(header: str | None, span: tuple[int, int] | None) -> None:
    assert byte_range(header, 100) == span


@pytest.mark.parametrize(("header", "size"), [("bytes=100-", 100), ("bytes=-0", 100), ("bytes=0-", 0),
                                              ("bytes=-5", 0)])
def test_a_range_that_cannot_be_satisfied_is_refused(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiableError) as refused:
        byte_range(header, size)
    assert refused.value.size == size

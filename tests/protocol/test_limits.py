"""Limits: what a peer may make us hold; validated when built."""

from __future__ import annotations

import pytest

from vsock_async import Limits, UsageError
from vsock_async.protocol.limits import U32_MAX


@pytest.mark.parametrize("field", ["max_command", "max_stdout", "max_stderr"])
@pytest.mark.parametrize("value", [True, False, -1, U32_MAX + 1, 1.0, "1", None])
def test_anything_but_an_int_in_u32_range_is_refused(field: str, value: object) -> None:
    """Found: Limits(True) was accepted as a limit of one byte."""
    with pytest.raises(UsageError, match=f"Limits.{field} must be an int"):
        Limits(**{field: value})  # type: ignore[arg-type]


def test_the_whole_u32_range_is_accepted() -> None:
    assert Limits(0, 0, 0) == Limits(max_command=0, max_stdout=0, max_stderr=0)
    assert Limits(max_stdout=U32_MAX).max_stdout == U32_MAX

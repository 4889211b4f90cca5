"""One rule for timeouts, in every place one is given: the library, the control API, the CLI
and the agent.

- ``None`` (JSON ``null``, ``none`` on a command line): no deadline, wait forever.
- A finite number of seconds ``>= 0``: that long. ``0`` is no time at all: a call
  given 0 s never sends its command (it raises its timeout error at once).
- :data:`DEFAULT`: whatever default the owner of the call has (a channel's, a
  daemon's ``--default-timeout``); only the library and the API take it.

Anything else (a negative or non-finite number, NaN, a bool, a string in the
library, an integer too large for a float) is a :class:`~vsock_async.errors.UsageError`
naming the setting. docs/usage.md ("Deadlines") says the same for users.
"""

from __future__ import annotations

import asyncio
import enum
import math
from typing import Final

from .errors import UsageError

__all__ = [
    "DEFAULT",
    "DEFAULT_TIMEOUT",
    "Timeout",
    "check_timeout",
    "deadline_after",
    "parse_timeout",
    "remaining",
    "resolve_timeout",
]

DEFAULT_TIMEOUT: Final = 30.0
"""The library's default deadline for a command, in seconds."""


class _Default(enum.Enum):
    DEFAULT = "DEFAULT"

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default.DEFAULT
"""Stands for "the owner's default timeout" in signatures."""

Timeout = float | None | _Default
"""What a ``timeout=`` parameter takes: seconds, ``None`` for none, or :data:`DEFAULT`."""

_NONE_WORDS: Final = frozenset({"none", "null", "never"})


def check_timeout(value: object, what: str = "timeout") -> float | None:
    """``value`` as seconds (a float) or ``None``; :class:`UsageError` for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{what} must be a number of seconds >= 0 or None, not {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        raise UsageError(f"{what} of {value} seconds is too large to be a deadline") from None
    if not math.isfinite(seconds) or seconds < 0:  # NaN fails isfinite too
        raise UsageError(
            f"{what} must be a finite number of seconds >= 0 or None (no deadline), not {value!r}"
        )
    return seconds


def resolve_timeout(value: Timeout, default: float | None, what: str = "timeout") -> float | None:
    """``value`` checked, with :data:`DEFAULT` replaced by ``default``."""
    if value is DEFAULT:
        return default
    return check_timeout(value, what)


def parse_timeout(text: str, what: str = "timeout") -> float | None:
    """A timeout as text (command line, query string): seconds, or ``none`` for no deadline."""
    stripped = text.strip()
    if stripped.lower() in _NONE_WORDS:
        return None
    if not stripped.isascii():  # float() takes other scripts' digits; a deadline never does
        raise UsageError(f"{what} {text!r} is not a number of seconds (or 'none')")
    try:
        number = float(stripped)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number of seconds (or 'none')") from None
    return check_timeout(number, what)


def deadline_after(timeout: float | None) -> float | None:
    """The running loop's time ``timeout`` seconds from now, or ``None`` for no deadline."""
    if timeout is None:
        return None
    return asyncio.get_running_loop().time() + timeout


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` on the running loop (never negative), or ``None``."""
    if deadline is None:
        return None
    return max(0.0, deadline - asyncio.get_running_loop().time())

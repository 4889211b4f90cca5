"""Close callbacks, held without a list while there is only one (the usual case).

Every connection and channel holds its close callbacks for as long as it lives; with
thousands of guests connected, a list per holder is one more object for each full
collection of the cyclic GC to walk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["Held", "add", "each"]

T = TypeVar("T")

Held = Callable[[T], None] | list[Callable[[T], None]] | None
"""No callback, the only one, or a list of them in the order they were added."""


def add(held: Held[T], callback: Callable[[T], None]) -> Held[T]:
    """``held`` with ``callback`` added last."""
    if held is None:
        return callback
    if isinstance(held, list):
        held.append(callback)
        return held
    return [held, callback]


def each(held: Held[T]) -> list[Callable[[T], None]]:
    """The callbacks in ``held``, in order."""
    if held is None:
        return []
    return held if isinstance(held, list) else [held]

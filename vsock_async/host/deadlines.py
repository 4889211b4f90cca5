"""``Deadlines``: one loop timer for the deadlines of many channels' v1 calls.

Each channel keeps its own calls' deadlines (:class:`~vsock_async.host.channel.GuestChannel`:
the oldest in two attributes, any others in a dict), and the book only the channels that may
have one pending and a timer for the earliest. The timer is left armed when calls finish
first. When it fires it asks each channel to fail its calls whose deadline has passed
(:meth:`Watcher._deadlines_passed`), drops the channels with none left, and re-arms itself for
the earliest one left, so each deadline still fires at its own time, never before. A channel
whose connection is gone leaves the book at once (:meth:`Deadlines.discard`): the book must
not keep it alive until the timer fires.

So a call that answers within its timeout costs the book nothing: no entry to make or drop,
the timer armed once per timeout period rather than once per call, and a channel with no call
in flight holds no timer. A server shares one book among all its channels, so thousands of
idle guests are not thousands of armed timers (each a handle, a bound method, an argument
tuple and a context for every full collection of the cyclic GC to walk, and an entry in the
loop's heap).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Deadlines", "Watcher", "loop_clock"]


class Watcher(Protocol):
    """A channel whose calls have deadlines."""

    def _deadlines_passed(self, now: float) -> float:
        """Fail every pending call whose deadline is at or before ``now`` (``loop.time()``);
        return the earliest deadline left, ``math.inf`` when none is (the book then drops
        this watcher until it is added again)."""


def loop_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """``loop.time``, or ``time.monotonic`` itself where that is all it does (every loop
    that keeps asyncio's own ``time()``): the same clock, without a Python call."""
    time_of = getattr(type(loop), "time", None)
    return time.monotonic if time_of is asyncio.BaseEventLoop.time else loop.time


class Deadlines:
    """The channels that may have a call with a deadline pending, and one timer for the
    earliest deadline."""

    __slots__ = ("_timer", "_watchers", "next", "now")

    def __init__(self) -> None:
        self.now: Callable[[], float] | None = None
        """The loop's clock (:func:`loop_clock`), once :meth:`use_clock_of` was called."""
        self.next = math.inf
        """When the timer fires (``loop.time()``); ``math.inf`` while there is none. A
        deadline before it needs :meth:`add`."""
        self._watchers: dict[Watcher, None] = {}  # in the order they were added
        self._timer: asyncio.TimerHandle | None = None

    def use_clock_of(self, loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
        """Set :attr:`now` to ``loop``'s clock (every watcher of a book is on one loop)."""
        self.now = loop_clock(loop)
        return self.now

    def add(self, watcher: Watcher, deadline: float, loop: asyncio.AbstractEventLoop) -> None:
        """Ask ``watcher`` about its deadlines when the timer fires, and have it fire by
        ``deadline``. A watcher calls this when it is not in the book (it was never added, or
        it said it had nothing left) or when ``deadline`` is before :attr:`next`."""
        self._watchers[watcher] = None
        if deadline < self.next:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._fire, loop)
            self.next = deadline

    def discard(self, watcher: Watcher) -> None:
        """Forget ``watcher`` (its calls are over: a channel whose connection is gone)."""
        self._watchers.pop(watcher, None)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self.next = math.inf
        now = loop.time()
        earliest = math.inf
        for watcher in list(self._watchers):
            left = watcher._deadlines_passed(now)
            if left == math.inf:
                del self._watchers[watcher]
            elif left < earliest:
                earliest = left
        if earliest < math.inf:
            self._timer = loop.call_at(earliest, self._fire, loop)
            self.next = earliest

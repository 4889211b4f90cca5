"""``Deadlines``: the deadlines of many v1 calls behind one loop timer.

The timer is armed for the earliest pending deadline and left armed when calls finish first.
When it fires it fails every call whose deadline has passed (through the channel that made
it) and re-arms itself for the earliest one left, so each deadline still fires at its own
time, never before. A stream of calls that answer within their timeout costs one timer per
timeout period instead of one per call, and a channel with no call in flight holds no timer:
a server shares one book among all its channels, so thousands of idle guests are not
thousands of armed timers (each a handle, a bound method, an argument tuple and a context for
every full collection of the cyclic GC to walk, and an entry in the loop's heap).
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol

from ..results import CommandResult

__all__ = ["Deadlines", "Watcher"]

ResultFuture = asyncio.Future[CommandResult]


class Watcher(Protocol):
    """What made a watched call: told when the call's deadline has passed."""

    def deadline_passed(self, future: ResultFuture) -> None:
        """``future``'s deadline has passed and it is not done: settle it now."""


class Deadlines:
    """Pending calls' deadlines (``loop.time()`` values) and one timer for the earliest."""

    __slots__ = ("_at", "_timer", "_timer_at", "_watchers")

    def __init__(self) -> None:
        self._at: dict[ResultFuture, float] = {}
        """Each pending call's deadline (``loop.time()``)."""
        self._watchers: dict[ResultFuture, Watcher] = {}
        """Who made each pending call."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # when the timer fires; inf while there is none

    def watch(self, future: ResultFuture, timeout: float, watcher: Watcher) -> None:
        """Tell ``watcher`` if ``future`` is still pending ``timeout`` seconds from now."""
        loop = future.get_loop()
        deadline = loop.time() + timeout
        self._at[future] = deadline
        self._watchers[future] = watcher
        if deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._fire, loop)
            self._timer_at = deadline

    def forget(self, future: ResultFuture) -> None:
        """``future`` is settled: drop its deadline (the timer stays armed, see above)."""
        self._at.pop(future, None)
        self._watchers.pop(future, None)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._timer_at = math.inf
        at = self._at
        if not at:
            return
        now = loop.time()
        # Earliest first, in the order the calls were made among equal deadlines.
        passed = sorted((d, i, f) for i, (f, d) in enumerate(at.items()) if d <= now)
        for _, _, future in passed:
            if not future.done():  # a result that came first wins
                self._watchers[future].deadline_passed(future)
        left = [d for d in at.values() if d > now]
        if left:
            self._timer_at = min(left)
            self._timer = loop.call_at(self._timer_at, self._fire, loop)

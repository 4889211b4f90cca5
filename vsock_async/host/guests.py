"""``Guest``: one guest, all its open connections, and calls spread over them.

A guest is known by a key: its CID on AF_VSOCK, a listener's label otherwise.
It may hold several connections (an agent started with ``--connections N``);
:meth:`Guest.run` takes any free one, so N calls run at once, and further
calls wait in FIFO order for the next connection to come free. A call never
moves to another connection once its command is sent: when a connection
drops, the calls on it fail with :class:`ConnectionClosed` and are never
replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ClosedLocally, CommandTimeout, ConnectionClosed, GuestBusy, VsockAsyncError
from ..protocol import PROBE_COMMAND
from ..results import CommandResult
from ..timeouts import DEFAULT, Timeout, check_timeout, remaining
from .channel import GuestChannel
from .commandline import CommandLike, compose_command

__all__ = ["Guest", "GuestEvent"]


@dataclass(frozen=True, slots=True)
class GuestEvent:
    """A connection of a guest came or went; what :meth:`CommandServer.subscribe` delivers.

    ``error`` says why a connection went (``None`` for ``"connected"``). After
    a ``"disconnected"`` event, ``guest.channels`` is empty if that was the
    guest's last connection.
    """

    kind: Literal["connected", "disconnected"]
    guest: Guest
    channel: GuestChannel
    error: VsockAsyncError | None = None


class Guest:
    """A handle on one guest: its open connections, and ``run``/``probe`` on any free one.

    The handle stays valid across reconnects: if the guest loses every
    connection and later dials in again while you still hold the handle, the
    same object serves the new connections.
    """

    __slots__ = (
        "__weakref__",
        "_channels",
        "_default_timeout",
        "_last_probe",
        "_leased",
        "_waiters",
        "key",
    )

    def __init__(self, key: Hashable, *, default_timeout: float | None) -> None:
        self.key: Any = key
        """The CID on AF_VSOCK, the listener's label otherwise."""
        self._default_timeout = default_timeout
        self._channels: list[GuestChannel] = []
        self._leased: set[int] = set()
        self._waiters: deque[asyncio.Future[GuestChannel]] = deque()
        self._last_probe: float | None = None

    def __repr__(self) -> str:
        return f"<Guest key={self.key!r} channels={len(self._channels)} busy={self.busy}>"

    # -- state ---------------------------------------------------------------------------

    @property
    def channels(self) -> list[GuestChannel]:
        """The guest's open connections, oldest first."""
        return [channel for channel in self._channels if not channel.closed]

    @property
    def connected(self) -> bool:
        """True while the guest holds at least one open connection."""
        return bool(self.channels)

    @property
    def connected_at(self) -> float | None:
        """When its oldest open connection arrived (``time.time()``), or None."""
        return min((channel.connected_at for channel in self.channels), default=None)

    @property
    def peer(self) -> Any:
        """The peer address of its newest open connection: ``(cid, port)`` on AF_VSOCK."""
        channels = self.channels
        return channels[-1].peer if channels else None

    @property
    def busy(self) -> bool:
        """True when no connection is free: a call now would wait (or raise with ``wait=False``)."""
        return self._free_channel() is None

    @property
    def waiting(self) -> int:
        """Calls waiting for a connection to come free."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    @property
    def last_probe(self) -> float | None:
        """When a probe last succeeded on any of its connections (``time.time()``), or None."""
        times = [c.last_probe for c in self._channels if c.last_probe is not None]
        if self._last_probe is not None:
            times.append(self._last_probe)
        return max(times, default=None)

    # -- calls ---------------------------------------------------------------------------

    async def run(
        self,
        command: CommandLike,
        *,
        timeout: Timeout = DEFAULT,
        check: bool = False,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> CommandResult:
        """Run ``command`` on a free connection; see :meth:`GuestChannel.run`.

        ``timeout`` covers waiting for a connection too. With ``wait=False``
        a call that finds every connection busy raises :class:`GuestBusy`
        instead of waiting. Raises :class:`ConnectionClosed` when the guest
        has no open connection, or loses its last one while the call waits.
        """
        line = compose_command(command, cwd=cwd, env=env)
        deadline, timeout = self._deadline(timeout)
        channel = await self._lease(line, timeout, deadline, wait)
        try:
            return await channel.run(line, timeout=remaining(deadline), check=check)
        finally:
            self._release(channel)

    async def probe(self, *, timeout: Timeout = DEFAULT, wait: bool = True) -> None:
        """Probe one free connection (``:`` must give exit 0, no output); see :meth:`run`."""
        deadline, timeout = self._deadline(timeout)
        channel = await self._lease(PROBE_COMMAND, timeout, deadline, wait)
        try:
            await channel.probe(timeout=remaining(deadline))
        finally:
            self._release(channel)
        self._last_probe = channel.last_probe

    async def aclose(self) -> None:
        """Close all its connections; their calls, and calls waiting here, get ConnectionClosed."""
        channels = self.channels
        for channel in channels:
            channel.connection.abort(
                ClosedLocally(f"connection {channel.id} of guest {self.key!r} was dropped")
            )
        self._fail_waiters()
        for channel in channels:
            await channel.wait_closed()

    # -- connection bookkeeping (called by the server) -------------------------------------

    def add_channel(self, channel: GuestChannel) -> None:
        """Serve calls on ``channel`` from now on; hand it to the longest waiting call."""
        self._channels.append(channel)
        self._hand_over(channel)

    def remove_channel(self, channel: GuestChannel) -> bool:
        """Forget a closed ``channel``; True if no connection is left, not even a closing one.

        Waiting calls fail as soon as no open connection is left.
        """
        with contextlib.suppress(ValueError):
            self._channels.remove(channel)
        self._leased.discard(channel.id)
        if not self.channels:
            self._fail_waiters()
        return not self._channels

    # -- scheduling ----------------------------------------------------------------------

    def _deadline(self, timeout: Timeout) -> tuple[float | None, float | None]:
        if timeout is DEFAULT:
            timeout = self._default_timeout
        else:
            check_timeout(timeout)
        if timeout is None:
            return None, None
        return asyncio.get_running_loop().time() + timeout, timeout

    def _free_channel(self) -> GuestChannel | None:
        for channel in self._channels:
            if (
                channel.id not in self._leased
                and not channel.closed
                and not channel.busy
                and not channel.queued
            ):
                return channel
        return None

    def _unleased_channel(self) -> GuestChannel | None:
        """An open connection busy with a call made on the channel itself, not through us.

        We learn nothing when such a call ends, so rather than wait for a
        hand-over that may never come, the call queues on that channel.
        """
        return min(
            (c for c in self.channels if c.id not in self._leased),
            key=lambda c: c.queued,
            default=None,
        )

    def _no_connection(self) -> ConnectionClosed:
        return ConnectionClosed(f"guest {self.key!r} has no open connection")

    async def _lease(
        self, line: bytes, timeout: float | None, deadline: float | None, wait: bool
    ) -> GuestChannel:
        """A connection reserved for one call: a free one now, or the next one to come free."""
        while True:
            if not self.channels:
                raise self._no_connection()
            if not self._waiters:
                channel = self._free_channel() or (self._unleased_channel() if wait else None)
                if channel is not None:
                    self._leased.add(channel.id)
                    return self._in_time(channel, line, timeout, deadline)
            if not wait:
                raise GuestBusy(
                    f"every connection of guest {self.key!r} is busy"
                    f" ({len(self.channels)} open, {self.waiting} calls waiting)"
                )
            waiter: asyncio.Future[GuestChannel] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                # Not wait_for: on 3.11 it swallows a cancel that lands as the hand-over does.
                async with asyncio.timeout_at(deadline):
                    channel = await waiter
            except TimeoutError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    channel = waiter.result()  # the hand-over won the race against the deadline
                else:
                    raise self._wait_timeout(line, timeout) from None
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._release(waiter.result())
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if not channel.closed:
                return self._in_time(channel, line, timeout, deadline)
            self._leased.discard(channel.id)

    def _in_time(
        self, channel: GuestChannel, line: bytes, timeout: float | None, deadline: float | None
    ) -> GuestChannel:
        """``channel``, unless the deadline has passed: a command sent now would only be cut off."""
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
            self._release(channel)
            raise self._wait_timeout(line, timeout)
        return channel

    def _wait_timeout(self, line: bytes, timeout: float | None) -> CommandTimeout:
        shown = line if len(line) <= 60 else line[:57] + b"..."
        return CommandTimeout(
            f"command {shown!r} timed out after {timeout:.3g} s waiting for a free"
            f" connection of guest {self.key!r}; it was never sent",
            CommandResult(b"", b"", None, timed_out=True),
        )

    def _release(self, channel: GuestChannel) -> None:
        self._leased.discard(channel.id)
        if not channel.closed:
            self._hand_over(channel)

    def _hand_over(self, channel: GuestChannel) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._leased.add(channel.id)
                waiter.set_result(channel)
                return

    def _fail_waiters(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self._no_connection())

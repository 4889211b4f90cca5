"""The host side of one connection in asyncio: a ``BufferedProtocol`` that is the v1 core.

:class:`~vsock_async.protocol.v1_host.HostConnectionV1` holds the rules (one
exchange at a time, the FIFO, a probe's zero output limits, which bytes are
a protocol error); :class:`GuestConnection` subclasses it and only adds the
socket and one future per call. The loop calls the core's own
``get_buffer()`` and ``buffer_updated()``, and the core's hooks act at once: a
result resolves its future in the read that completed it, a queued command's
frame goes to the transport, the connection's end fails the calls left. Reads
go straight into the decoder's memory (``recv_into``), so a large result is
assembled in place. Reading needs no pausing: the host only reads results it
asked for, each bounded by the limits, and any byte that arrives unasked fails
the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from ..errors import ConnectionLost, PeerError, VsockAsyncError
from ..protocol import Limits
from ..protocol.v1_host import ConnectionEnded, ConnectionState, HostConnectionV1, copy_error
from ..results import CommandResult
from . import _callbacks

logger = logging.getLogger("vsock_async")

ResultFuture = asyncio.Future[CommandResult]

_AWAITING = ConnectionState.AWAITING_RESULT
_CLOSED = ConnectionState.CLOSED


class GuestConnection(HostConnectionV1[ResultFuture], asyncio.BufferedProtocol):
    """One guest connection: the v1 core over a socket, one future per call.

    One object, not a protocol holding a core: the loop's every read then lands in the
    core without a call in between, and an idle connection is one object fewer for the
    cyclic GC to walk.
    """

    def __init__(self, limits: Limits, on_made: Callable[[GuestConnection], None] | None = None):
        super().__init__(limits, abandoned=asyncio.Future.done)
        self._on_made = on_made
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # An idle connection holds only what it must: with thousands of guests every object
        # here is one more for each full collection of the cyclic GC to walk. So no future
        # until someone waits for the end, and no list until someone asks to hear of it.
        self._gone = False  # the transport is torn down (or there never was one)
        self._lost: asyncio.Future[None] | None = None  # made by wait_closed()
        self._on_close: _callbacks.Held[GuestConnection] = None

    # -- asyncio.BufferedProtocol (get_buffer and buffer_updated are the core's) -----------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)
        on_made, self._on_made = self._on_made, None
        if on_made is not None:
            on_made(self)

    def eof_received(self) -> bool:
        self.receive_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_gone()
        reason = f": {exc}" if exc else ""
        self.close(ConnectionLost(f"the connection was lost{reason}"))
        held, self._on_close = self._on_close, None
        for callback in _callbacks.each(held):
            callback(self)

    # -- the core's hooks ----------------------------------------------------------------

    # A result goes to its future unless the caller gave it up (the core asks ``abandoned``,
    # Future.done, first): both in C, no Python call.
    result_received = staticmethod(asyncio.Future.set_result)  # type: ignore[assignment]

    def output_ready(self, data: bytes) -> None:
        """A queued command's turn came: write its frame."""
        assert self.transport is not None
        self.transport.write(data)

    def connection_ended(self, event: ConnectionEnded[ResultFuture]) -> None:
        """Fail the calls left with the error, each with a copy of its own, and tear the
        transport down."""
        error = event.error
        if isinstance(error, PeerError) and not self._gone:
            logger.info("closing guest connection %s: %s", self.peer, error)
        for future in event.unanswered:
            if not future.done():
                future.set_exception(copy_error(error))
        if self._gone:
            return
        if self.transport is not None:
            self.transport.abort()
        else:
            self._mark_gone()

    # -- exchanges -----------------------------------------------------------------------

    def exchange(self, command: bytes, probe: bool = False) -> ResultFuture:
        """Send ``command`` (or queue it); the future gets its result or the connection's error.

        ``probe=True``: the answer may hold no output. Raises :class:`UsageError`
        for a command above ``limits.max_command``, and the connection's error
        once it is closed.
        """
        future: ResultFuture = self._loop.create_future()
        frame = self.command_frame(future, command, probe)
        if frame:
            self.transport.write(frame)  # type: ignore[union-attr]  # set before any call
        return future

    @property
    def busy(self) -> bool:
        """True while an exchange is in flight."""
        return self.state is _AWAITING

    @property
    def closed(self) -> bool:
        """True once the connection has failed or been closed; it never reopens."""
        return self.state is _CLOSED

    def add_close_callback(self, callback: Callable[[GuestConnection], None]) -> None:
        """Call ``callback(self)`` once the connection is gone."""
        if self._gone:
            self._loop.call_soon(callback, self)
        else:
            self._on_close = _callbacks.add(self._on_close, callback)

    def abort(self, error: VsockAsyncError) -> None:
        """Close at once, failing the call in flight and every queued call with ``error``."""
        self.close(error)

    async def wait_closed(self) -> None:
        """Wait until the transport has been torn down."""
        if self._gone:
            return
        if self._lost is None:
            self._lost = self._loop.create_future()
        await asyncio.shield(self._lost)

    @property
    def peer(self) -> Any:
        """The peer address as the kernel reports it: ``(cid, port)`` on AF_VSOCK."""
        return self.transport.get_extra_info("peername") if self.transport else None

    def _mark_gone(self) -> None:
        self._gone = True
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

"""The host side of one connection in asyncio: a ``BufferedProtocol`` that feeds the v1 core.

:class:`~vsock_async.protocol.v1_host.HostConnectionV1` holds the rules (one
exchange at a time, the FIFO, a probe's zero output limits, which bytes are
a protocol error); this layer only moves bytes between it and the socket and
turns its events into futures. Reads go straight into the decoder's memory
(``recv_into``), so a large result is assembled in place. Reading needs no
pausing: the host only reads results it asked for, each bounded by the
limits, and any byte that arrives unasked fails the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from ..errors import ConnectionLost, PeerError, VsockAsyncError
from ..protocol import Limits
from ..protocol.v1_host import (
    ConnectionEnded,
    ConnectionState,
    HostConnectionV1,
    ResultReceived,
    copy_error,
)
from ..results import CommandResult
from . import _callbacks

logger = logging.getLogger("vsock_async")

ResultFuture = asyncio.Future[CommandResult]


class GuestConnection(asyncio.BufferedProtocol):
    """One guest connection: a v1 core over a socket, one future per call."""

    def __init__(self, limits: Limits, on_made: Callable[[GuestConnection], None] | None = None):
        self._on_made = on_made
        self._conn: HostConnectionV1[ResultFuture] = HostConnectionV1(
            limits, abandoned=asyncio.Future.done
        )
        # asyncio calls get_buffer() on every read: hand it the decoder's own, no call between
        self.get_buffer = self._conn.get_buffer  # type: ignore[method-assign]
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # An idle connection holds only what it must: with thousands of guests every object
        # here is one more for each full collection of the cyclic GC to walk. So no future
        # until someone waits for the end, and no list until someone asks to hear of it.
        self._gone = False  # the transport is torn down (or there never was one)
        self._lost: asyncio.Future[None] | None = None  # made by wait_closed()
        self._on_close: _callbacks.Held[GuestConnection] = None
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- asyncio.BufferedProtocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)
        on_made, self._on_made = self._on_made, None
        if on_made is not None:
            on_made(self)

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        conn = self._conn
        conn.buffer_updated(nbytes)
        event = conn.next_event()  # buffer_updated() gives at most one
        if event is None:  # most reads of a large result complete nothing
            return
        if isinstance(event, ResultReceived):
            future, result = event
            if not future.done():  # a caller that gave up has no use for it
                future.set_result(result)
            data = conn.data_to_send()  # the next queued command, if any
            if data:
                self._write(data)
        else:
            self._ended(event)

    def eof_received(self) -> bool:
        self._conn.receive_eof()
        self._settle()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_gone()
        reason = f": {exc}" if exc else ""
        self._conn.close(ConnectionLost(f"the connection was lost{reason}"))
        self._settle()
        held, self._on_close = self._on_close, None
        for callback in _callbacks.each(held):
            callback(self)

    # -- exchanges -----------------------------------------------------------------------

    def exchange(self, command: bytes, probe: bool = False) -> ResultFuture:
        """Send ``command`` (or queue it); the future gets its result or the connection's error.

        ``probe=True``: the answer may hold no output. Raises :class:`UsageError`
        for a command above ``limits.max_command``, and the connection's error
        once it is closed.
        """
        future: ResultFuture = self._loop.create_future()
        conn = self._conn
        conn.send_command(future, command, probe)  # events only come from the guest
        data = conn.data_to_send()
        if data:
            assert self.transport is not None
            self.bytes_sent += len(data)
            self.transport.write(data)
        return future

    def check_command(self, command: bytes) -> None:
        """Raise :class:`UsageError` if ``command`` is longer than ``limits.max_command``."""
        self._conn.check_command(command)

    def in_flight(self, future: ResultFuture) -> bool:
        """True if ``future``'s command has been sent and its result is awaited."""
        return self._conn.in_flight(future)

    def withdraw(self, future: ResultFuture) -> None:
        """Drop a queued command that was never sent (its caller gave up)."""
        self._conn.withdraw(future)

    def partial_output(self) -> tuple[bytes, bytes]:
        """What has arrived of the result being received."""
        return self._conn.partial_output()

    @property
    def limits(self) -> Limits:
        """The largest command sent and the largest stdout and stderr accepted."""
        return self._conn.limits

    @property
    def queued(self) -> int:
        """Calls waiting behind the one in flight."""
        return self._conn.queued

    @property
    def busy(self) -> bool:
        """True while an exchange is in flight."""
        return self._conn.state is ConnectionState.AWAITING_RESULT

    @property
    def closed(self) -> bool:
        """True once the connection has failed or been closed; it never reopens."""
        return self._conn.state is ConnectionState.CLOSED

    @property
    def error(self) -> VsockAsyncError | None:
        """Why the connection is closed, or None while it is open."""
        return self._conn.error

    def add_close_callback(self, callback: Callable[[GuestConnection], None]) -> None:
        """Call ``callback(self)`` once the connection is gone."""
        if self._gone:
            self._loop.call_soon(callback, self)
        else:
            self._on_close = _callbacks.add(self._on_close, callback)

    def abort(self, error: VsockAsyncError) -> None:
        """Close at once, failing the call in flight and every queued call with ``error``."""
        self._conn.close(error)
        self._settle()

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

    # -- the core's output ---------------------------------------------------------------

    def _settle(self) -> None:
        """Act on the event that ending the core gave (receive_eof() or close(), never a
        result); none if it had already ended."""
        event = self._conn.next_event()
        if event is not None:
            assert isinstance(event, ConnectionEnded)
            self._ended(event)

    def _mark_gone(self) -> None:
        self._gone = True
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.bytes_sent += len(data)
        self.transport.write(data)

    def _ended(self, event: ConnectionEnded[ResultFuture]) -> None:
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

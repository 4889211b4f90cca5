"""The host side of one connection: an ``asyncio.BufferedProtocol`` feeding the result decoder.

It owns the v1 rule of one exchange at a time: frames wait in a FIFO and
each is written only once the previous result is in. Reads go straight into
the decoder's memory (``recv_into``), so a large result is assembled in
place. Reading needs no pausing: the host only reads results it asked for,
each bounded by the limits, and any byte that arrives unasked is a protocol
error that closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from ..errors import ConnectionLost, PeerError, ProtocolError, VsockAsyncError
from ..protocol import PROBE_COMMAND, Limits, ResultDecoder, encode_command
from ..results import CommandResult

logger = logging.getLogger("vsock_async")

ResultFuture = asyncio.Future[CommandResult]

_PROBE_FRAME = encode_command(PROBE_COMMAND)


class GuestConnection(asyncio.BufferedProtocol):
    """One guest connection: sends command frames in order, resolves one future per result."""

    def __init__(self, limits: Limits, on_made: Callable[[GuestConnection], None] | None = None):
        self._limits = limits
        self._on_made = on_made
        self._decoder = ResultDecoder(limits)
        self._probing = False
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._current: ResultFuture | None = None
        self._queue: deque[tuple[bytes, ResultFuture]] = deque()
        self._error: VsockAsyncError | None = None
        self._lost = self._loop.create_future()
        self._on_close: list[Callable[[GuestConnection], None]] = []
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- asyncio.BufferedProtocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)
        if self._on_made is not None:
            self._on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        if self._current is None:
            self.abort(ProtocolError("the guest sent bytes while no command was pending"))
            return
        decoder = self._decoder
        try:
            decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.abort(exc)
            return
        result = decoder.next_event()
        if result is None:
            return
        current = self._current
        if decoder.in_frame or decoder.next_event() is not None:
            self.abort(ProtocolError("the guest sent bytes beyond the result of its command"))
            return
        self._current = None
        if not current.done():
            current.set_result(result)
        if self._queue:
            self._send_next()

    def eof_received(self) -> bool:
        self._decoder.receive_eof()
        if self._decoder.in_frame:
            held = self._decoder.bytes_in_frame()
            self.abort(
                ConnectionLost(f"the guest closed the connection after {held} bytes of a result")
            )
        else:
            self.abort(ConnectionLost("the guest closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            reason = f": {exc}" if exc else ""
            self._fail_all(ConnectionLost(f"the connection was lost{reason}"))
        if not self._lost.done():
            self._lost.set_result(None)
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback(self)

    # -- exchanges -----------------------------------------------------------------------

    def exchange(self, frame: bytes) -> ResultFuture:
        """Queue one command frame; the future gets its result (or the connection's error)."""
        if self._error is not None:
            raise _copy(self._error)
        future: ResultFuture = self._loop.create_future()
        if self._current is None:
            self._current = future
            self._write(frame)
        else:
            self._queue.append((frame, future))
        return future

    def in_flight(self, future: ResultFuture) -> bool:
        """True if ``future``'s frame has been sent and its result is awaited."""
        return future is self._current

    def withdraw(self, future: ResultFuture) -> None:
        """Drop a queued frame that was never sent (its caller gave up)."""
        for i, (_, queued) in enumerate(self._queue):
            if queued is future:
                del self._queue[i]
                return

    def partial_output(self) -> tuple[bytes, bytes]:
        """What has arrived of the result being received."""
        return self._decoder.partial_output()

    @property
    def queued(self) -> int:
        """Calls waiting behind the one in flight."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """True while an exchange is in flight."""
        return self._current is not None

    @property
    def closed(self) -> bool:
        """True once the connection has failed or been closed; it never reopens."""
        return self._error is not None

    @property
    def error(self) -> VsockAsyncError | None:
        """Why the connection is closed, or None while it is open."""
        return self._error

    def add_close_callback(self, callback: Callable[[GuestConnection], None]) -> None:
        """Call ``callback(self)`` once the connection is gone."""
        if self._lost.done():
            self._loop.call_soon(callback, self)
        else:
            self._on_close.append(callback)

    def abort(self, error: VsockAsyncError) -> None:
        """Close at once, failing the call in flight and every queued call with ``error``."""
        if self._error is None:
            if isinstance(error, PeerError):
                logger.info("closing guest connection %s: %s", self.peer, error)
            self._fail_all(error)
        if self.transport is not None:
            self.transport.abort()
        elif not self._lost.done():
            self._lost.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until the transport has been torn down."""
        await asyncio.shield(self._lost)

    @property
    def peer(self) -> Any:
        """The peer address as the kernel reports it: ``(cid, port)`` on AF_VSOCK."""
        return self.transport.get_extra_info("peername") if self.transport else None

    def _send_next(self) -> None:
        queue = self._queue
        while queue:
            frame, future = queue.popleft()
            if not future.done():
                self._current = future
                self._write(frame)
                return

    def _write(self, frame: bytes) -> None:
        assert self.transport is not None
        probe = frame == _PROBE_FRAME
        if probe is not self._probing:
            # A probe's answer must be empty: buffer none of it, so a hostile guest cannot
            # make the automatic probe of each new connection cost the full output limits.
            self._probing = probe
            limits = self._limits
            self._decoder.set_output_limits(
                *((0, 0) if probe else (limits.max_stdout, limits.max_stderr))
            )
        self.bytes_sent += len(frame)
        self.transport.write(frame)

    def _fail_all(self, error: VsockAsyncError) -> None:
        self._error = error
        current, self._current = self._current, None
        if current is not None and not current.done():
            current.set_exception(_copy(error))
        while self._queue:
            _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(_copy(error))


def _copy(error: VsockAsyncError) -> VsockAsyncError:
    """A fresh exception per waiter, so tracebacks of different callers never pile up on one."""
    clone = type(error).__new__(type(error))
    clone.__dict__.update(error.__dict__)
    clone.args = error.args
    return clone

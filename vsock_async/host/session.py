"""The host side of one protocol v2 connection in asyncio: a ``BufferedProtocol`` over
:class:`~vsock_async.protocol.v2.HostSession`.

The pure session holds the wire rules (frames, stream ids, credit in both
directions, limits); this layer moves bytes between it and the socket, routes
its events to the :class:`~vsock_async.host.process.Process` or the
:class:`~vsock_async.host.files.FileStream` of each stream, and turns the
connection's end into errors for everyone waiting. Reads go straight into the
session's decoder (``recv_into``). Per-stream credit bounds what the agent may
send; reading pauses only for an agent that keeps asking for answers (PING,
unknown frames) while it reads none of what we write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from ..errors import (
    ConnectionLost,
    PeerError,
    ProtocolError,
    SpawnFailed,
    Unsupported,
    VsockAsyncError,
)
from ..protocol import Limits
from ..protocol.v1_host import copy_error
from ..protocol.v2 import (
    Channel,
    Exited,
    FileResult,
    HelloAnswer,
    HostSession,
    Output,
    Pong,
    RequestFailed,
    Started,
    StdinCredit,
    StreamError,
    write_pieces,
)
from . import _callbacks

if TYPE_CHECKING:
    from .files import FileStream
    from .process import Process

logger = logging.getLogger("vsock_async")

_MAX_UNREAD_ANSWERS: Final = 64 * 1024
"""Bytes of answers the agent may ask for while our writes are paused before we stop reading it.

Our agent asks for none; a guest flooding PINGs it never reads would grow our write buffer
without end. The agent's output never counts: its credit bounds it, and pausing on it could
deadlock with an agent that stops reading while its own writes are paused.
"""

__all__ = ["SessionConnection"]


class SessionConnection(asyncio.BufferedProtocol):
    """One negotiated v2 connection: many process streams, each with its own credit.

    It takes over a transport that has finished the hello (see
    :mod:`vsock_async.host.negotiate`), so :meth:`connection_made` is called by
    whoever hands it over. Concurrent processes are limited to the agent's
    ``max_streams``; further ones wait for a free slot, first come first served.
    """

    def __init__(self, agent: HelloAnswer, *, limits: Limits, max_frame: int) -> None:
        self.agent = agent
        """What the agent announced in its hello: version, limits, capabilities."""
        self.limits = limits
        """The host's limits; :meth:`GuestChannel.run` caps captured output with them."""
        self._session = HostSession(agent, max_frame, stream_data=True)  # output pieces are copied
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._streams: dict[int, Process] = {}
        self._files: dict[int, FileStream] = {}
        self._file_slots = asyncio.Semaphore(agent.limits.max_files)
        self._used = 0  # stream slots taken, including ones handed to a waiter not yet resumed
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._error: VsockAsyncError | None = None
        # As for a v1 connection: no future until someone waits for the end, no list until
        # a second callback (each one more object for the cyclic GC, per idle guest).
        self._gone = False  # the transport is torn down (or there never was one)
        self._lost: asyncio.Future[None] | None = None  # made by wait_closed()
        self._on_close: _callbacks.Held[SessionConnection] = None
        self._write_paused = False
        self._answered_at_pause = 0  # the session's answers when our writes were paused
        self._read_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._dispatching = False
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return f"<SessionConnection peer={self.peer!r} streams={len(self._streams)}>"

    # -- asyncio.BufferedProtocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._session.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_received += nbytes
        try:
            self._session.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.abort(exc)
            return
        self._dispatch()
        if (
            self._write_paused
            and not self._read_paused
            and self._session.answered - self._answered_at_pause > _MAX_UNREAD_ANSWERS
        ):
            assert self.transport is not None
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._session.receive_eof()
        self._dispatch()
        self.abort(ConnectionLost("the guest closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            reason = f": {exc}" if exc else ""
            self._fail_all(ConnectionLost(f"the connection was lost{reason}"))
        self._wake_writers()
        self._mark_gone()
        held, self._on_close = self._on_close, None
        for callback in _callbacks.each(held):
            callback(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._answered_at_pause = self._session.answered

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        self._wake_writers()

    # -- state ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection has failed or been closed; it never reopens."""
        return self._error is not None

    @property
    def error(self) -> VsockAsyncError | None:
        """Why the connection is closed, or None while it is open."""
        return self._error

    @property
    def busy(self) -> bool:
        """True when every stream slot the agent allows is taken: a new process would wait."""
        return self._used >= self.agent.limits.max_streams

    @property
    def queued(self) -> int:
        """Processes waiting for a free stream slot."""
        return sum(1 for waiter in self._slot_waiters if not waiter.done())

    @property
    def streams(self) -> int:
        """Process streams open right now."""
        return len(self._streams)

    @property
    def files(self) -> int:
        """File streams open right now."""
        return len(self._files)

    @property
    def peer(self) -> Any:
        """The peer address as the kernel reports it: ``(cid, port)`` on AF_VSOCK."""
        return self.transport.get_extra_info("peername") if self.transport else None

    def add_close_callback(self, callback: Callable[[SessionConnection], None]) -> None:
        """Call ``callback(self)`` once the connection is gone."""
        if self._gone:
            self._loop.call_soon(callback, self)
        else:
            self._on_close = _callbacks.add(self._on_close, callback)

    async def wait_closed(self) -> None:
        """Wait until the transport has been torn down."""
        if self._gone:
            return
        if self._lost is None:
            self._lost = self._loop.create_future()
        await asyncio.shield(self._lost)

    def _mark_gone(self) -> None:
        self._gone = True
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def abort(self, error: VsockAsyncError) -> None:
        """Close at once: every process, slot waiter and ping of it fails with ``error``."""
        if self._error is None:
            if isinstance(error, PeerError):
                logger.info("closing guest connection %s: %s", self.peer, error)
            self._fail_all(error)
        if self.transport is not None:
            self.transport.abort()
        else:
            self._mark_gone()

    def require(self, capability: str, what: str) -> None:
        """Raise :class:`Unsupported` unless the agent announced ``capability``."""
        if capability not in self.agent.capabilities:
            announced = ", ".join(sorted(self.agent.capabilities)) or "none"
            raise Unsupported(
                f"the guest's agent ({self.agent.agent}) cannot {what}: it did not announce the"
                f" {capability!r} capability (it announced: {announced})"
            )

    # -- streams -------------------------------------------------------------------------

    async def open(
        self, process: Process, request: dict[str, Any], deadline: float | None = None
    ) -> None:
        """Start ``process`` with ``request`` on a new stream; return once it runs.

        Waits for a free stream slot first. With a ``deadline`` (the loop's time), the
        request's ``timeout`` is what is left of it once a slot is free, and
        :class:`TimeoutError` says nothing was left (the request was not sent). Raises
        :class:`SpawnFailed` when the agent cannot start it, and the connection's error
        if it closes. A cancel after the request went out sends CLOSE: nothing is left
        running.
        """
        await self.send_exec(process, request, deadline)
        try:
            await asyncio.shield(process._started)
        except asyncio.CancelledError:
            process._give_up()
            raise

    async def send_exec(
        self, process: Process, request: dict[str, Any], deadline: float | None = None
    ) -> None:
        """Send the EXEC of ``process`` on a new stream, once a stream slot is free; the
        agent's STARTED (or its refusal) arrives later, as ``process`` learns.

        What :meth:`open` does without waiting for STARTED (``deadline`` as there), for a
        caller that waits for the exit anyway (``run()``): one wakeup fewer per command.
        """
        self._check_open()
        await self._take_slot()
        try:
            self._check_open()
            if deadline is not None:
                left = deadline - self._loop.time()
                if left <= 0:
                    raise TimeoutError
                request["timeout"] = left
            stream = self._session.open_exec(request, request["window"])
        except BaseException:
            self._release_slot()
            raise
        process.stream = stream
        self._streams[stream] = process
        self._flush()

    async def open_file(self, transfer: FileStream, request: dict[str, Any], window: int) -> None:
        """Start the file operation ``request`` for ``transfer`` on a new stream.

        Waits for a free file slot (the agent's ``max_files``) and stream slot
        first; the stream holds both until its RESULT or ERROR arrives. Raises
        the connection's error if it closes.
        """
        self._check_open()
        await self._file_slots.acquire()
        try:
            self._check_open()
            await self._take_slot()
        except BaseException:
            self._file_slots.release()
            raise
        try:
            self._check_open()
            stream = self._session.open_file(request, window)
        except BaseException:
            self._release_slot()
            self._file_slots.release()
            raise
        transfer.stream = stream
        self._files[stream] = transfer
        self._flush()

    def send_commit(self, stream: int, sha256: str) -> None:
        """Queue COMMIT for the put on ``stream``, if it is still open."""
        if self._open_stream(stream):
            self._session.send_commit(stream, sha256)
            self._flush()

    def _end_file(self, stream: int) -> FileStream | None:
        """Forget the file stream ``stream``, which has ended, and free its slots."""
        transfer = self._files.pop(stream, None)
        if transfer is not None:
            self._release_slot()
            self._file_slots.release()
        return transfer

    # The core forgets a stream as it reads the stream's last frame, before its events are
    # dispatched: each request below first checks the stream is still open there.

    def stdin_credit(self, stream: int) -> int:
        """Bytes the agent will take into the stdin of ``stream`` now."""
        if not self._open_stream(stream):
            return 0
        return self._session.credit(stream, Channel.STDIN)

    def send_stdin(self, stream: int, data: bytes, end: bool) -> int:
        """Send what the agent's stdin credit allows of ``data`` (END after all of it, if
        ``end``); how many bytes went. ``data`` must not change afterwards (it is not copied)."""
        if not self._open_stream(stream):
            return 0
        accepted = self._session.send_stdin(stream, data, end)
        self._flush()
        return accepted

    def grant(self, stream: int, channel: Channel, n: int) -> None:
        """The application consumed ``n`` bytes of ``channel``: give the agent that credit."""
        if self._open_stream(stream):
            self._session.grant(stream, channel, n)
            self._flush()

    def send_signal(self, stream: int, signum: int) -> None:
        """Queue SIGNAL for the process group of ``stream``, if it still runs."""
        if self._open_stream(stream):
            self._session.send_signal(stream, signum)
            self._flush()

    def send_resize(self, stream: int, rows: int, cols: int) -> None:
        """Queue RESIZE for the terminal of ``stream``, if it still runs."""
        if self._open_stream(stream):
            self._session.send_resize(stream, rows, cols)
            self._flush()

    def send_close(self, stream: int) -> None:
        """Queue CLOSE for ``stream``, if it still runs: the agent stops it and still EXITs."""
        if self._open_stream(stream):
            self._session.send_close(stream)
            self._flush()

    def _open_stream(self, stream: int) -> bool:
        return (
            self._error is None
            and (stream in self._streams or stream in self._files)
            and stream in self._session.streams
        )

    async def ping(self) -> None:
        """One PING round trip; raises the connection's error if it closes first."""
        self._check_open()
        payload = os.urandom(8)
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._pings[payload] = waiter
        try:
            self._session.ping(payload)
            self._flush()
            await waiter
        finally:
            self._pings.pop(payload, None)

    async def writable(self) -> None:
        """Wait while the socket's send buffer is full (the transport paused writing)."""
        while self._write_paused and self._error is None:
            if self._writable is None or self._writable.done():
                self._writable = self._loop.create_future()
            await asyncio.shield(self._writable)
        if self._error is not None:
            raise copy_error(self._error)

    # -- stream slots ----------------------------------------------------------------------

    async def _take_slot(self) -> None:
        if not self._slot_waiters and self._used < self.agent.limits.max_streams:
            self._used += 1
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release_slot()  # handed over as we were cancelled: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._slot_waiters.remove(waiter)

    def _release_slot(self) -> None:
        self._used -= 1
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                self._used += 1
                waiter.set_result(None)
                return

    def _check_open(self) -> None:
        if self._error is not None:
            raise copy_error(self._error)

    # -- the session's output ------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand each event of the session to its process, then write what it queued."""
        session = self._session
        self._dispatching = True
        try:
            while (event := session.next_event()) is not None:
                if isinstance(event, Output):
                    owner = self._streams.get(event.stream) or self._files.get(event.stream)
                    if owner is not None:
                        owner._on_output(event.channel, event.data, event.end)
                elif isinstance(event, StdinCredit):
                    owner = self._streams.get(event.stream) or self._files.get(event.stream)
                    if owner is not None:
                        owner._on_stdin_credit()
                elif isinstance(event, Started):
                    process = self._streams.get(event.stream)
                    if process is not None:
                        process._on_started(event.pid)
                elif isinstance(event, Exited):
                    process = self._streams.pop(event.stream, None)
                    if process is not None:
                        self._release_slot()
                        process._on_exit(
                            event.exit_code, event.signal, event.timed_out, event.output_incomplete
                        )
                elif isinstance(event, FileResult):
                    transfer = self._end_file(event.stream)
                    if transfer is not None:
                        transfer._on_result(event.result)
                elif isinstance(event, StreamError):
                    self._stream_error(event)
                elif isinstance(event, Pong):
                    waiter = self._pings.get(bytes(event.payload))
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                elif isinstance(event, RequestFailed):
                    logger.warning(
                        "guest %s answered %s on stream %s with error %s: %s",
                        self.peer,
                        "a frame" if event.type is None else f"frame type {event.type:#04x}",
                        event.stream,
                        event.code,
                        event.message,
                    )
        finally:
            self._dispatching = False
        self._flush()

    def _stream_error(self, event: StreamError) -> None:
        """The agent refused an EXEC (nothing started) or a file operation failed: the stream
        is over."""
        transfer = self._end_file(event.stream)
        if transfer is not None:
            transfer._on_error(event.code, event.message, event.errno)
            return
        process = self._streams.pop(event.stream, None)
        if process is not None:
            self._release_slot()
            process._on_error(SpawnFailed(event.code, event.message, event.errno))

    def _flush(self) -> None:
        if self._dispatching or self.transport is None:
            return
        data = self._session.data_to_send()
        if data and self._error is None:
            for piece in write_pieces(data):  # payloads uncopied, small pieces joined
                self.bytes_sent += len(piece)
                self.transport.write(piece)

    def _wake_writers(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _fail_all(self, error: VsockAsyncError) -> None:
        self._error = error
        streams, self._streams = self._streams, {}
        for process in streams.values():
            process._on_connection_lost(error)
        files, self._files = self._files, {}
        for transfer in files.values():
            self._file_slots.release()  # a waiter for one wakes to the error
            transfer._on_connection_lost(error)
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(copy_error(error))
        for waiter in self._pings.values():
            if not waiter.done():
                waiter.set_exception(copy_error(error))

"""A guest process streamed to a control API client: over a WebSocket, or as a plain HTTP
stream, in the messages of :mod:`.exec_stream`.

The control API (:mod:`.control_api`) routes the request, checks it and starts
the process; this module moves bytes and messages until the process ends or the
client goes. Memory stays bounded both ways: output is read from the process only
as fast as the client's socket drains (aiohttp's writes wait above its buffer
limit, and unread output holds back the agent's credit), and stdin is read from
the client only once the previous message has gone to the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Final

from aiohttp import WSMessage, WSMsgType, web

from ..errors import StdinClosed, UsageError
from ..host.process import Process, ProcessReader, ProcessWriter
from .exec_stream import (
    CONTROL,
    STDERR,
    STDIN,
    STDOUT,
    ExecRequest,
    ExitStatus,
    Resize,
    SendSignal,
    data_message,
    frame,
    parse_client_message,
    split_data_message,
)
from .metrics import ServeMetrics

__all__ = [
    "ClientGone",
    "MessageGuard",
    "MessageTooBig",
    "exit_status",
    "limit_messages",
    "stream_http",
    "stream_websocket",
]

_CHUNK: Final = 64 * 1024
"""Output is read from the process and sent to the client this much at a time, at most."""
_CHANNEL_NAMES: Final = {STDIN: "stdin", STDOUT: "stdout", STDERR: "stderr"}


class ClientGone(Exception):
    """The client closed the WebSocket or the connection before the process ended."""


class MessageTooBig(Exception):
    """A client's WebSocket message over the daemon's limit: dropped unread."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a message of {size} bytes or more, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


# -- the size of the client's messages ---------------------------------------------------------
#
# aiohttp refuses a message over its max_msg_size by closing the connection at once, while the
# client may still be sending it: the client's write then fails (a broken pipe, a reset) and
# it never reads the 1009 close that was sent. So the frames are looked at before aiohttp
# parses them: an oversized message is dropped as it arrives, never held, aiohttp never sees
# it, and the handler closes with 1009 and a reason, reading on until the client's close.


class MessageGuard:
    """A client's WebSocket frames as they arrive (RFC 6455, 5.2), with each data message over
    ``limit`` bytes dropped; pure, no I/O, no copies but of a header split between reads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._header = bytearray()
        """The header of the next frame, while it is incomplete."""
        self._left = 0
        """Payload bytes of the current frame still to come."""
        self._passing = True
        """Whether the current frame goes on."""
        self._size = 0
        """Bytes of the current data message so far, its fragments summed."""
        self._dropping = False
        """The current data message is over the limit: its frames are dropped."""

    def feed(self, data: bytes) -> tuple[list[bytes], int | None]:
        """The pieces of ``data`` to pass on, in order; and the size, as far as known, of a
        message found over the limit in it (None if none was)."""
        pieces: list[bytes] = []
        too_big: int | None = None
        n = len(data)
        pos = 0
        run: int | None = 0 if self._left and self._passing else None  # the piece passing on
        header_at = 0
        while pos < n:
            if self._left:
                taken = min(self._left, n - pos)
                pos += taken
                self._left -= taken
                continue
            carried, header_at = len(self._header), pos
            while pos < n and len(self._header) < _header_size(self._header):
                taken = min(_header_size(self._header) - len(self._header), n - pos)
                self._header += data[pos : pos + taken]
                pos += taken
            if len(self._header) < _header_size(self._header):
                break  # the rest of the header comes with the next read
            header = bytes(self._header)
            self._header.clear()
            self._left = _payload_length(header)
            self._passing, found = self._admit(header[0] & 0x0F, self._left)
            too_big = too_big if found is None else found
            if self._passing and run is None:
                if carried:
                    pieces.append(header[:carried])
                run = header_at
            elif not self._passing and run is not None:
                pieces.append(data[run:header_at])
                run = None
        if run is not None:
            end = header_at if self._header else n
            if end > run:
                pieces.append(data if (run, end) == (0, n) else data[run:end])
        return pieces, too_big

    def _admit(self, opcode: int, length: int) -> tuple[bool, int | None]:
        """Whether a frame goes on, and the size of its message if that just went over."""
        if opcode > 2:  # control frames, and opcodes aiohttp refuses itself
            return True, None
        if opcode:  # text or binary: a new message
            self._size, self._dropping = 0, False
        if self._dropping:
            return False, None
        self._size += length
        if self._size <= self.limit:
            return True, None
        self._dropping = True
        return False, self._size


def _header_size(header: bytearray) -> int:
    """The size of a frame header of which ``header`` holds the start (2 until that is known)."""
    if len(header) < 2:
        return 2
    length, masked = header[1] & 0x7F, header[1] & 0x80
    extended = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + extended + (4 if masked else 0)


def _payload_length(header: bytes) -> int:
    length = header[1] & 0x7F
    if length < 126:
        return length
    return int.from_bytes(header[2:4] if length == 126 else header[2:10], "big")


class _GuardedReader:
    """aiohttp's WebSocket parser behind a :class:`MessageGuard`; an oversized message reaches
    the handler as an ERROR message holding :class:`MessageTooBig`."""

    def __init__(self, reader: Any, ws: web.WebSocketResponse, limit: int) -> None:
        self._reader = reader
        self._ws = ws
        self._guard = MessageGuard(limit)

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        pieces, too_big = self._guard.feed(data)
        for piece in pieces:
            eof, tail = self._reader.feed_data(piece)
            if eof:  # aiohttp's parser failed: it has told the handler and ends the connection
                return eof, tail
        if too_big is not None:
            error = MessageTooBig(too_big, self._guard.limit)
            queue = self._ws._reader  # what ws.receive() reads
            assert queue is not None
            queue.feed_data(WSMessage(WSMsgType.ERROR, error, None), 0)
        return False, b""

    def feed_eof(self) -> None:
        self._reader.feed_eof()


def limit_messages(ws: web.WebSocketResponse, request: web.Request, limit: int) -> bool:
    """Drop the client's messages over ``limit`` bytes as they arrive on the prepared ``ws``
    (whose ``max_msg_size`` must be above ``limit``): the handler receives an ERROR message
    holding :class:`MessageTooBig` instead, and the connection reads on.

    aiohttp has no public hook for this: its parser and message queue are reached through
    private attributes (checked with aiohttp 3.14). False if this aiohttp lacks them, the
    guard then not installed: aiohttp's own limit (``max_msg_size``) still refuses an
    oversized message, closing at once with 1009.
    """
    protocol = request.protocol
    parser = getattr(protocol, "_payload_parser", None)
    queue = getattr(ws, "_reader", None)
    if not (
        callable(getattr(parser, "feed_data", None)) and callable(getattr(queue, "feed_data", None))
    ):
        return False
    protocol._payload_parser = _GuardedReader(parser, ws, limit)
    return True


def exit_status(process: Process, started_at: float) -> ExitStatus:
    """How an exited process ended, as the ``exit`` message tells it."""
    signum = process.exit_signal
    code = process.returncode
    assert code is not None
    return ExitStatus(
        128 + signum if signum is not None else code,
        signum,
        timed_out=process.timed_out,
        output_incomplete=process.output_incomplete,
        duration=time.monotonic() - started_at,
    )


def _outputs(process: Process) -> list[tuple[int, ProcessReader]]:
    pairs = [(STDOUT, process.stdout), (STDERR, process.stderr)]
    return [(channel, reader) for channel, reader in pairs if reader is not None]


# -- WebSocket -------------------------------------------------------------------------------


async def stream_websocket(
    ws: web.WebSocketResponse,
    process: Process,
    request: ExecRequest,
    metrics: ServeMetrics,
    started_at: float,
) -> ExitStatus:
    """Relay between ``ws`` and ``process`` until the process has exited and all its output
    is sent; its status. The caller sends it and closes ``ws``.

    Raises :class:`ClientGone` when the client leaves first, :class:`UsageError` for a
    message the client may not send, and the connection's error if the guest fails.
    The caller stops the process on every way out.
    """
    outputs = asyncio.ensure_future(_send_outputs(ws, process, metrics, started_at))
    inputs = asyncio.ensure_future(_receive_inputs(ws, process, request, metrics))
    try:
        done, _ = await asyncio.wait({outputs, inputs}, return_when=asyncio.FIRST_COMPLETED)
        if outputs in done:
            return outputs.result()
        inputs.result()  # it only ends by raising
        raise AssertionError("the client's messages ended without an error")
    finally:
        for task in (outputs, inputs):
            task.cancel()
        await asyncio.gather(outputs, inputs, return_exceptions=True)


async def _send_outputs(
    ws: web.WebSocketResponse, process: Process, metrics: ServeMetrics, started_at: float
) -> ExitStatus:
    async def pump(channel: int, reader: ProcessReader) -> None:
        while data := await reader.read(_CHUNK):
            try:
                await ws.send_bytes(data_message(channel, data))
            except ConnectionResetError:  # aiohttp's own, once the client closed or left
                raise ClientGone from None
            metrics.exec_bytes.inc(_CHANNEL_NAMES[channel], len(data))

    await asyncio.gather(*(pump(channel, reader) for channel, reader in _outputs(process)))
    await process.wait()
    return exit_status(process, started_at)


async def _receive_inputs(
    ws: web.WebSocketResponse, process: Process, request: ExecRequest, metrics: ServeMetrics
) -> None:
    """Apply the client's messages to the process; raise ClientGone or UsageError at the end."""
    while True:
        message = await ws.receive()
        if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            raise ClientGone
        if message.type is WSMsgType.ERROR:
            if isinstance(message.data, MessageTooBig):
                raise message.data
            raise ClientGone from message.data
        if message.type is WSMsgType.BINARY:
            channel, data = split_data_message(message.data)
            if channel != STDIN:
                raise UsageError(f"a client sends data on channel {STDIN} (stdin), not {channel}")
            await _write_stdin(process, request, data)
            metrics.exec_bytes.inc("stdin", len(data))
            continue
        if message.type is not WSMsgType.TEXT:
            raise UsageError(f"unexpected WebSocket message of type {message.type.name}")
        command = parse_client_message(message.data)
        if isinstance(command, SendSignal):
            process.send_signal(command.signal)
        elif isinstance(command, Resize):
            if request.tty is None:
                raise UsageError("resize needs a process started with a tty")
            await process.resize(command.rows, command.cols)
        else:
            _stdin(process, request).write_eof()


def _stdin(process: Process, request: ExecRequest) -> ProcessWriter:
    stdin = process.stdin
    if stdin is None or not request.stdin:
        raise UsageError('stdin was not asked for: send "stdin": true in the request')
    return stdin


async def _write_stdin(process: Process, request: ExecRequest, data: memoryview) -> None:
    """Hand ``data`` to the process, then wait until the agent took it (one message at a time)."""
    stdin = _stdin(process, request)
    if not data or stdin.is_closing():  # the process ended: what it did not read is dropped
        return
    stdin.write(data)
    with contextlib.suppress(StdinClosed):
        await stdin.drain()


# -- plain HTTP ------------------------------------------------------------------------------


async def stream_http(
    response: web.StreamResponse, process: Process, metrics: ServeMetrics, started_at: float
) -> ExitStatus:
    """Write the process's output to a prepared chunked ``response`` as frames until it has
    exited; its status (the caller writes the ``exit`` frame)."""

    async def pump(channel: int, reader: ProcessReader) -> None:
        while data := await reader.read(_CHUNK):
            # One write per frame: aiohttp writes it whole before it waits to drain, so the
            # frames of stdout and stderr never interleave.
            await response.write(frame(channel, data))
            metrics.exec_bytes.inc(_CHANNEL_NAMES[channel], len(data))

    await asyncio.gather(*(pump(channel, reader) for channel, reader in _outputs(process)))
    await process.wait()
    return exit_status(process, started_at)


def control_frame(payload: bytes) -> bytes:
    """A control message of the plain HTTP stream (JSON text) as a frame."""
    return frame(CONTROL, payload)

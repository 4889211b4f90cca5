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
from typing import Final

from aiohttp import WSMsgType, web

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

__all__ = ["ClientGone", "exit_status", "stream_http", "stream_websocket"]

_CHUNK: Final = 64 * 1024
"""Output is read from the process and sent to the client this much at a time, at most."""
_CHANNEL_NAMES: Final = {STDIN: "stdin", STDOUT: "stdout", STDERR: "stderr"}


class ClientGone(Exception):
    """The client closed the WebSocket or the connection before the process ended."""


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

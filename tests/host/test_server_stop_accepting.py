"""Stopping a listener never strands a connection it had just accepted (CPython gh-109564).

asyncio accepts in a reader callback and builds the transport in a task one
loop iteration later; ``Server.close()`` in between makes that task fail, and
the accepted socket is left open with nobody reading it: the peer hangs until
its own timeout. Each test lands the stop at every point of that window.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from vsock_async import CommandServer
from vsock_async.serve.control_api import ControlAPI
from vsock_async.serve.metrics import ServeMetrics

from .test_server import closed_after_hello_at_most, first_reply

WINDOW = range(6)  # loop iterations between the connect and the stop: covers the accept window


def dial(path: str, data: bytes) -> socket.socket:
    """A connected, non-blocking Unix socket that has sent ``data``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(data)
    sock.setblocking(False)
    return sock


async def stop_after(iterations: int, stop: Callable[[], Awaitable[None]]) -> None:
    for _ in range(iterations):
        await asyncio.sleep(0)
    await stop()


@pytest.mark.asyncio
@pytest.mark.parametrize("iterations", WINDOW)
async def test_control_api_answers_or_refuses_a_client_that_came_as_it_stopped(
    tmp_path: Path, iterations: int
) -> None:
    path = str(tmp_path / "c.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)
    api = ControlAPI(CommandServer(), ServeMetrics())
    await api.start(listener)
    try:
        with dial(path, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") as sock:
            await stop_after(iterations, api.stop_accepting)
            reply = await first_reply(sock)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 200 ")
    finally:
        await api.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("iterations", WINDOW)
async def test_command_server_keeps_or_refuses_a_guest_that_came_as_it_stopped(
    tmp_path: Path, iterations: int
) -> None:
    path = str(tmp_path / "g.sock")
    server = CommandServer()
    await server.add_listener(f"unix:{path}")

    async def stop() -> None:
        server.stop_listening()

    try:
        with dial(path, b"") as sock:
            await stop_after(iterations, stop)
            channel = None
            for _ in WINDOW:
                await asyncio.sleep(0)
            if server.guests:
                (guest,) = server.guests
                (channel,) = guest.channels
            await server.aclose()
            # Kept or refused, the guest learns it is gone when the server closes.
            assert await closed_after_hello_at_most(sock)
            assert channel is None or channel.closed
    finally:
        await server.aclose()

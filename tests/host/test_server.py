"""CommandServer's own life: closing while guests dial in, a cancelled close and its retry,
an asyncio loop required, and what it logs about each connection."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

import vsock_async
from tests.fc_muxer import DialingGuest, GuestScript
from tests.host.test_guests import until
from vsock_async import ClosedLocally, CommandServer, GuestEvent, UsageError
from vsock_async.protocol.v2 import HELLO_PREFIX

LONG = 10.0  # a hang guard only: every wait below ends long before unless the code hangs
WINDOW = range(8)  # loop iterations between a connect and the close: covers the accept window


def raw_dial(address: str | tuple[str, int]) -> socket.socket:
    """A connected, non-blocking socket that says nothing, as a guest that just dialled in."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(address)
    sock.setblocking(False)
    return sock


async def first_reply(sock: socket.socket) -> bytes:
    """What the server side sends first: b"" once it closes or resets the connection."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 4096), LONG)
    except ConnectionResetError:
        return b""


async def closed_after_hello_at_most(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` having sent nothing but (perhaps) the one
    protocol hello a ``protocol="auto"`` server opens every connection with."""
    received = b""
    while chunk := await first_reply(sock):
        received += chunk
    if not received:
        return True
    length = int.from_bytes(received[:4], "big")
    return len(received) == 4 + length and received[4:].startswith(HELLO_PREFIX)


async def listening(tmp_path: Path, kind: str) -> tuple[CommandServer, str | tuple[str, int]]:
    if kind == "unix":
        path = str(tmp_path / "g.sock")
        return await vsock_async.listen(f"unix:{path}"), path
    server = await vsock_async.listen("tcp://127.0.0.1:0")
    host, port = server.sockets[0].getsockname()[:2]
    return server, (host, port)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("iterations", WINDOW)
async def test_a_guest_that_dials_as_aclose_starts_is_closed_with_the_rest(
    tmp_path: Path, kind: str, iterations: int
) -> None:
    server, address = await listening(tmp_path, kind)
    with raw_dial(address) as sock:
        for _ in range(iterations):
            await asyncio.sleep(0)
        async with asyncio.timeout(LONG):  # it hung on 3.12+ until the guest hung up
            await server.aclose()
        assert server.channels == []
        assert server.guests == []
        assert await closed_after_hello_at_most(sock)


@pytest.mark.asyncio
@pytest.mark.parametrize("iterations", WINDOW)
async def test_a_guest_that_dials_once_aclose_has_begun_is_refused(
    tmp_path: Path, iterations: int
) -> None:
    server, address = await listening(tmp_path, "tcp")
    closing = asyncio.ensure_future(server.aclose())
    for _ in range(iterations):
        await asyncio.sleep(0)
    try:
        sock = raw_dial(address)
    except ConnectionRefusedError:
        pass
    else:
        with sock:
            assert await closed_after_hello_at_most(sock)
    async with asyncio.timeout(LONG):
        await closing
    assert server.channels == []


@pytest.mark.asyncio
async def test_a_cancelled_aclose_leaves_nothing_open(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = await vsock_async.listen(f"unix:{path}", label="c")
    agent = DialingGuest(str(path), GuestScript())
    await agent.dial(2)
    try:
        await until(lambda: len(server.channels) == 2)
        channels = server.channels
        waiting = asyncio.ensure_future(server.wait_for_guest("other", timeout=LONG))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(server.aclose())
        await asyncio.sleep(0)  # aclose runs to its first await
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert server.closed
        assert not path.exists()
        assert all(channel.closed for channel in channels)
        with pytest.raises(ClosedLocally):
            await waiting
        await asyncio.sleep(0)
        assert all(sock.fileno() == -1 for sock in server.sockets), "listening sockets closed"
        async with asyncio.timeout(LONG):
            await server.aclose()
        assert server.channels == []
    finally:
        await agent.aclose()
        await server.aclose()


@pytest.mark.asyncio
async def test_a_retried_aclose_waits_for_what_the_cancelled_one_left(tmp_path: Path) -> None:
    path = tmp_path / "r.sock"
    server = await vsock_async.listen(f"unix:{path}", label="r")
    release = asyncio.Event()
    reported: list[int] = []

    async def on_event(event: GuestEvent) -> None:
        if event.kind == "disconnected":
            await release.wait()
            reported.append(event.channel.id)

    server.subscribe(on_event)
    agent = DialingGuest(str(path), GuestScript())
    await agent.dial(1)
    try:
        await server.wait_for_guest("r", timeout=LONG)
        closing = asyncio.ensure_future(server.aclose())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not closing.done(), "aclose waits for the disconnect callback"
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        retry = asyncio.ensure_future(server.aclose())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not retry.done(), "the retry waits for the callback still running"
        release.set()
        async with asyncio.timeout(LONG):
            await retry
        assert len(reported) == 1
    finally:
        release.set()
        await agent.aclose()
        await server.aclose()


# -- asyncio is required -------------------------------------------------------------------


def test_listen_without_an_asyncio_loop_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    steps = vsock_async.listen(f"unix:{path}").__await__()
    with pytest.raises(UsageError, match="running asyncio event loop"):
        steps.send(None)  # what trio does with it: no asyncio loop is running
    assert not path.exists(), "nothing bound, nothing left behind"


def test_connect_without_an_asyncio_loop_is_a_usage_error(tmp_path: Path) -> None:
    steps = vsock_async.connect(f"unix:{tmp_path}/none.sock").__await__()
    with pytest.raises(UsageError, match="running asyncio event loop"):
        steps.send(None)


def test_add_listener_without_an_asyncio_loop_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    steps = CommandServer().add_listener(f"unix:{path}").__await__()
    with pytest.raises(UsageError, match="anyio on the asyncio backend"):
        steps.send(None)
    assert not path.exists()


# -- logging -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_log_lines_name_a_unix_peer_without_an_empty_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "l.sock"
    with caplog.at_level(logging.INFO, "vsock_async"):
        async with vsock_async.listen(f"unix:{path}", label="l") as server:
            agent = DialingGuest(str(path), GuestScript())
            await agent.dial(1)
            try:
                await server.wait_for_guest("l", timeout=LONG)
            finally:
                await agent.aclose()
    connected = [r.message for r in caplog.records if " connected: channel" in r.message]
    assert len(connected) == 1
    assert "from ''" not in connected[0]
    assert f"on unix:{path}" in connected[0]


@pytest.mark.asyncio
async def test_log_lines_name_a_tcp_peer(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "vsock_async"):
        async with vsock_async.listen("tcp://127.0.0.1:0", label="t", protocol="v1") as server:
            host, port = server.sockets[0].getsockname()[:2]
            with raw_dial((host, port)) as sock:
                await server.wait_for_guest("t", timeout=LONG)
                local = sock.getsockname()
    (connected,) = [r.message for r in caplog.records if " connected: channel" in r.message]
    assert f"from {local[0]}:{local[1]}" in connected

"""The asyncio layer under a channel: GuestConnection over a real ``socket.socketpair()``.

The v1 rules themselves are tested without a loop in tests/protocol/test_v1_host.py; here
only what this layer adds: bytes between the socket and the core, futures, closing the
transport, close callbacks and counters.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from vsock_async import (
    ClosedLocally,
    CommandResult,
    ConnectionLost,
    FrameTooLarge,
    Limits,
    ProtocolError,
    UsageError,
)
from vsock_async.host.transport import GuestConnection
from vsock_async.protocol import encode_command, encode_result


@dataclass
class Pair:
    conn: GuestConnection
    guest: socket.socket  # the other end, non-blocking, driven with loop.sock_* calls

    async def read(self, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""
        while len(data) < n:
            chunk = await loop.sock_recv(self.guest, n - len(data))
            assert chunk, "the host closed the connection"
            data += chunk
        return data

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.guest, data)


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[Pair]:
    host_end, guest_end = socket.socketpair()
    guest_end.setblocking(False)
    loop = asyncio.get_running_loop()
    limits = Limits(max_command=64, max_stdout=1 << 20, max_stderr=16)
    _, conn = await loop.connect_accepted_socket(lambda: GuestConnection(limits), host_end)
    yield Pair(conn, guest_end)
    conn.abort(ClosedLocally("the test ended"))
    await conn.wait_closed()
    guest_end.close()


@pytest.mark.asyncio
async def test_exchange_writes_the_frame_and_resolves_with_the_result(pair: Pair) -> None:
    future = pair.conn.exchange(b"uname")
    assert await pair.read(9) == encode_command(b"uname")
    assert pair.conn.busy and pair.conn.in_flight(future)
    await pair.send(encode_result(b"Linux\n", b"", 0))
    assert await future == CommandResult(b"Linux\n", b"", 0)
    assert not pair.conn.busy
    assert (pair.conn.bytes_sent, pair.conn.bytes_received) == (9, 4 + 6 + 4 + 1)


@pytest.mark.asyncio
async def test_queued_exchanges_go_out_one_at_a_time(pair: Pair) -> None:
    first, second = pair.conn.exchange(b"one"), pair.conn.exchange(b"two")
    assert pair.conn.queued == 1
    assert await pair.read(7) == encode_command(b"one")
    await pair.send(encode_result(b"1", b"", 0))
    assert (await first).stdout == b"1"
    assert await pair.read(7) == encode_command(b"two")  # released by the first result
    await pair.send(encode_result(b"2", b"", 0))
    assert (await second).stdout == b"2"


@pytest.mark.asyncio
async def test_a_large_result_arrives_whole(pair: Pair) -> None:
    """Reads land in the decoder's memory (recv_into), a large body in its final object."""
    body = bytes(range(256)) * 4096  # 1 MiB, the limit
    future = pair.conn.exchange(b"big")
    await pair.read(7)
    await pair.send(encode_result(body, b"", 0))
    assert (await future).stdout == body


@pytest.mark.asyncio
async def test_a_command_above_max_command_raises_and_sends_nothing(pair: Pair) -> None:
    with pytest.raises(UsageError, match="max_command"):
        pair.conn.exchange(b"x" * 65)
    assert pair.conn.bytes_sent == 0 and not pair.conn.closed


@pytest.mark.asyncio
async def test_unasked_bytes_close_the_transport_and_are_logged(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    closed: list[GuestConnection] = []
    pair.conn.add_close_callback(closed.append)
    with caplog.at_level(logging.INFO, logger="vsock_async"):
        await pair.send(b"\0")
        await pair.conn.wait_closed()
    assert isinstance(pair.conn.error, ProtocolError)
    assert "no command was pending" in caplog.text
    assert closed == [pair.conn]
    assert await asyncio.get_running_loop().sock_recv(pair.guest, 1) == b""  # torn down


@pytest.mark.asyncio
async def test_output_above_the_limit_fails_the_call_and_closes(pair: Pair) -> None:
    future = pair.conn.exchange(b"x")
    queued = pair.conn.exchange(b"y")
    await pair.read(5)
    await pair.send(encode_result(b"", b"e" * 17, 0))  # stderr limit is 16
    for call in (future, queued):
        with pytest.raises(FrameTooLarge, match="stderr of 17 bytes"):
            await call
    await pair.conn.wait_closed()
    assert pair.conn.closed


@pytest.mark.asyncio
async def test_eof_in_the_middle_of_a_result_is_connection_lost(pair: Pair) -> None:
    future = pair.conn.exchange(b"x")
    await pair.read(5)
    await pair.send(encode_result(b"abc", b"", 0)[:6])
    pair.guest.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionLost, match="after 6 bytes of a result"):
        await future
    with pytest.raises(ConnectionLost):
        pair.conn.exchange(b"later")  # the error that closed it, a fresh copy


@pytest.mark.asyncio
async def test_abort_fails_every_call_with_its_error_and_closes_once(pair: Pair) -> None:
    closed: list[GuestConnection] = []
    pair.conn.add_close_callback(closed.append)
    calls = [pair.conn.exchange(b"x"), pair.conn.exchange(b"y")]
    pair.conn.abort(ClosedLocally("enough"))
    pair.conn.abort(ClosedLocally("twice"))
    errors = []
    for call in calls:
        with pytest.raises(ClosedLocally, match="enough") as info:
            await call
        errors.append(info.value)
    assert errors[0] is not errors[1]  # each caller gets its own exception object
    await pair.conn.wait_closed()
    assert closed == [pair.conn] and str(pair.conn.error) == "enough"
    late: list[GuestConnection] = []
    pair.conn.add_close_callback(late.append)
    await asyncio.sleep(0)
    assert late == [pair.conn]


@pytest.mark.asyncio
async def test_withdrawn_call_is_never_sent(pair: Pair) -> None:
    first = pair.conn.exchange(b"one")
    second = pair.conn.exchange(b"two")
    third = pair.conn.exchange(b"six")
    pair.conn.withdraw(second)
    await pair.read(7)
    await pair.send(encode_result(b"", b"", 0))
    await first
    assert await pair.read(7) == encode_command(b"six")
    await pair.send(encode_result(b"", b"", 6))
    assert (await third).exit_code == 6
    assert not second.done()  # its caller gave up on it; nothing resolves it

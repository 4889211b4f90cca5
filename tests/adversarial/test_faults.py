"""A guest that closes or resets at every byte offset of a result, or sends what was not asked."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from vsock_async import CommandServer, ConnectionClosed, PeerError, ProtocolError, listen
from vsock_async.protocol import encode_result

from .hostile import accept_guest, answer_for, dial_address

STDOUT, STDERR, EXIT = b"the answer", b"warn", 42
FRAME = encode_result(STDOUT, STDERR, EXIT)


async def fault_at(server: CommandServer, offset: int, how: str) -> None:
    """One guest sends ``FRAME[:offset]`` then closes (FIN) or resets (RST)."""
    address = dial_address(server)
    guest, channel = await accept_guest(server, address)
    run = asyncio.create_task(channel.run("q", timeout=5))
    await guest.read_command()
    if offset:
        await guest.send(FRAME[:offset])
    guest.reset() if how == "reset" else guest.close()
    try:
        result = await run
    except (ConnectionClosed, ProtocolError):
        pass
    else:
        # Only a complete frame may come back, and then only the right one.
        assert offset == len(FRAME), f"a result came back from {offset} of {len(FRAME)} bytes"
        assert (result.stdout, result.stderr, result.exit_code) == (STDOUT, STDERR, EXIT)
    await channel.wait_closed()
    assert channel.closed and channel not in server.channels
    with pytest.raises(PeerError):
        await channel.run("again", timeout=1)


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["close", "reset"])
async def test_fault_at_every_byte_of_a_result(socket_dir: str, how: str) -> None:
    address = "tcp://127.0.0.1:0" if how == "reset" else f"unix:{socket_dir}/g.sock"
    async with await listen(address, default_timeout=5, protocol="v1") as server:
        for offset in range(len(FRAME) + 1):
            await fault_at(server, offset, how)
        # The same guest dialling again gets a fresh, working channel.
        guest, channel = await accept_guest(server, dial_address(server))
        run = asyncio.create_task(channel.run("hello"))
        await guest.answer(*answer_for(await guest.read_command()))
        result = await run
        assert (result.stdout, result.stderr, result.exit_code) == answer_for(b"hello")
        assert server.channels == [channel]
        guest.close()


@pytest.mark.asyncio
async def test_bytes_nobody_asked_for_drop_the_guest(server: CommandServer) -> None:
    """Unsolicited bytes before any command: the channel closes and accept skips it."""
    address = dial_address(server)
    rogue, channel = await accept_guest(server, address)
    await rogue.send(encode_result(b"fake", b"", 0))
    assert await rogue.wait_closed_by_host() == b""
    await channel.wait_closed()
    with pytest.raises(PeerError):  # a closed channel refuses with the reason it closed
        await channel.run("x")
    assert isinstance(channel.error, ProtocolError)
    rogue.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("extra", [b"\0", encode_result(b"second", b"", 0)])
async def test_bytes_beyond_the_result_drop_the_guest(server: CommandServer, extra: bytes) -> None:
    """A guest answering twice cannot plant an answer for the next command."""
    guest, channel = await accept_guest(server, dial_address(server))
    run = asyncio.create_task(channel.run("one"))
    await guest.read_command()
    await guest.send(encode_result(b"first", b"", 0) + extra)
    with pytest.raises(ProtocolError):
        await run
    assert channel.closed
    guest.close()


@pytest.mark.asyncio
async def test_late_answer_after_a_timeout_is_never_read(server: CommandServer) -> None:
    """The answer to a timed-out command must never become the answer to the next one."""
    guest, channel = await accept_guest(server, dial_address(server))
    with pytest.raises(TimeoutError):
        await channel.run("slow", timeout=0.01)
    assert channel.closed
    await guest.read_command()
    with contextlib.suppress(ConnectionError):
        await guest.answer(b"late", b"", 0)
    with pytest.raises(ConnectionClosed):
        await channel.run("next")
    guest.close()

"""Slow and stuck guests: deadlines fire, and nobody else waits for them.

"Nothing else stalls" is asserted by count: a well-behaved bystander must
complete exchanges while the attack is in progress (the attacker waits for
the bystander's progress between its moves, so a server that blocked on the
attacker would deadlock instead of passing).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from vsock_async import (
    ClosedLocally,
    CommandResult,
    CommandServer,
    CommandTimeout,
    Limits,
    listen,
)
from vsock_async.protocol import encode_result

from .conftest import Scale
from .hostile import RawGuest, accept_guest, answer_for, bystander, dial_address


@pytest.mark.asyncio
async def test_trickled_result_arrives_whole_while_others_keep_going(
    server: CommandServer,
) -> None:
    address = dial_address(server)
    others = await bystander(server, address)
    attacker, channel = await accept_guest(server, address)
    run = asyncio.create_task(channel.run("slow", timeout=None))
    command = await attacker.read_command()
    frame = encode_result(*answer_for(command))
    await attacker.trickle(frame, between=others.progress)
    result = await run
    assert (result.stdout, result.stderr, result.exit_code) == answer_for(b"slow")
    assert others.completed >= len(frame)
    assert not channel.closed
    await others.stop()
    attacker.close()


@pytest.mark.asyncio
async def test_trickling_does_not_extend_the_deadline(unix_server: CommandServer) -> None:
    attacker, channel = await accept_guest(unix_server, dial_address(unix_server))
    run = asyncio.create_task(channel.run("slow", timeout=0.05))
    await attacker.read_command()
    frame = encode_result(b"s" * 10_000, b"", 0)
    trickle = asyncio.create_task(attacker.trickle(frame))
    with pytest.raises(CommandTimeout) as info:
        await run
    result = info.value.result
    assert result.timed_out and result.exit_code is None
    assert b"s" * len(result.stdout) == result.stdout
    assert channel.closed
    trickle.cancel()
    await asyncio.gather(trickle, return_exceptions=True)
    attacker.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("cut", [2, 4, 9, 13, 17])
async def test_half_a_frame_then_silence(server: CommandServer, scale: Scale, cut: int) -> None:
    """While the stalled exchange waits (no deadline), others complete; then a deadline fires."""
    address = dial_address(server)
    others = await bystander(server, address)
    attacker, channel = await accept_guest(server, address)
    frame = encode_result(b"hello", b"oops", 7)  # 4+5 + 4+4 + 1 = 18 bytes
    stalled = asyncio.create_task(channel.run("stall", timeout=None))
    await attacker.read_command()
    await attacker.send(frame[:cut])
    await others.progress(scale.slow_bystander_exchanges)
    assert not stalled.done() and channel.busy
    stalled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stalled
    assert channel.closed  # cancelled on the wire: the stream is out of step
    attacker.close()

    attacker, channel = await accept_guest(server, address)
    run = asyncio.create_task(channel.run("stall", timeout=0.02))
    await attacker.read_command()
    await attacker.send(frame[:cut])
    with pytest.raises(CommandTimeout) as info:
        await run
    stdout, stderr = info.value.result.stdout, info.value.result.stderr
    assert b"hello".startswith(stdout) and b"oops".startswith(stderr)
    assert channel.closed
    assert await attacker.wait_closed_by_host() == b""
    attacker.close()
    await others.progress(3)
    await others.stop()


@pytest_asyncio.fixture(params=["unix", "tcp"])
async def big_command_server(
    request: pytest.FixtureRequest, socket_dir: str
) -> AsyncIterator[CommandServer]:
    """A server that sends commands of up to 16 MiB (the default limit is 1 MiB)."""
    address = f"unix:{socket_dir}/guest.sock" if request.param == "unix" else "tcp://127.0.0.1:0"
    limits = Limits(max_command=16 * 1024 * 1024)
    async with await listen(address, default_timeout=5, limits=limits, protocol="v1") as srv:
        yield srv


@pytest.mark.asyncio
async def test_guest_that_never_reads(big_command_server: CommandServer, scale: Scale) -> None:
    """A command far larger than the socket buffers, to a guest that never reads it."""
    server = big_command_server
    address = dial_address(server)
    others = await bystander(server, address)
    attacker, channel = await accept_guest(server, address)
    big = "x" * (8 * 1024 * 1024)
    stuck = asyncio.create_task(channel.run(big, timeout=None))
    await others.progress(scale.slow_bystander_exchanges)
    assert not stuck.done()
    assert channel.connection.transport is not None
    assert channel.connection.transport.get_write_buffer_size() > 0  # the kernel is full
    timed = asyncio.create_task(channel.run("after", timeout=0.02))
    with pytest.raises(CommandTimeout) as info:
        await timed
    assert "never sent" in str(info.value) and not channel.closed  # queued calls just give up
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    assert channel.closed
    await channel.wait_closed()
    assert channel.connection.transport.get_write_buffer_size() == 0
    attacker.close()

    attacker, channel = await accept_guest(server, address)
    with pytest.raises(CommandTimeout):
        await channel.run(big, timeout=0.02)
    assert channel.closed
    attacker.close()
    await others.progress(3)
    await others.stop()


@pytest.mark.asyncio
async def test_many_stalled_guests_at_once(server: CommandServer, scale: Scale) -> None:
    """A slowloris: many guests each holding half a result; the server still serves."""
    address = dial_address(server)
    others = await bystander(server, address)
    stalled: list[tuple[RawGuest, asyncio.Task[CommandResult]]] = []
    for _ in range(scale.guests):
        attacker, channel = await accept_guest(server, address)
        task = asyncio.create_task(channel.run("stall", timeout=None))
        await attacker.read_command()
        await attacker.send(b"\0\0\0\x05he")
        stalled.append((attacker, task))
    await others.progress(scale.slow_bystander_exchanges)
    assert not any(task.done() for _, task in stalled)
    await others.stop()
    await server.aclose()
    for attacker, task in stalled:
        with pytest.raises(ClosedLocally, match="server is closing"):
            await task
        attacker.close()

"""Guests that announce more than they may send: refused before any memory is spent on them."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Iterator

import pytest

from vsock_async import CommandServer, CommandTimeout, FrameTooLarge
from vsock_async.protocol import encode_result

from .conftest import Scale
from .hostile import accept_guest, bomb_prefix, bystander, dial_address

MiB = 1024 * 1024


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    yield
    tracemalloc.stop()


def measure_from_here() -> int:
    """Start measuring the peak; returns the baseline to subtract."""
    tracemalloc.reset_peak()
    return tracemalloc.get_traced_memory()[0]


def peak_since(baseline: int) -> int:
    return tracemalloc.get_traced_memory()[1] - baseline


@pytest.mark.asyncio
@pytest.mark.parametrize("field", ["stdout", "stderr"])
@pytest.mark.usefixtures("traced")
async def test_four_gib_announcement_is_refused_and_the_guest_dropped(
    server: CommandServer, field: str
) -> None:
    address = dial_address(server)
    others = await bystander(server, address)
    await others.progress(3)
    attacker, channel = await accept_guest(server, address)

    baseline = measure_from_here()
    run = asyncio.create_task(channel.run("cat /dev/zero"))
    assert await attacker.read_command() == b"cat /dev/zero"
    head = b"" if field == "stdout" else encode_result(b"fine", b"", 0)[:8]
    await attacker.send(head + bomb_prefix(0xFFFF_FFFF) + b"\0" * 4096)
    with pytest.raises(FrameTooLarge) as info:
        await run
    assert peak_since(baseline) < 2 * MiB

    assert (info.value.what, info.value.length) == (field, 0xFFFF_FFFF)
    await channel.wait_closed()
    assert channel.closed and channel not in server.channels
    await attacker.wait_closed_by_host()
    attacker.close()
    await others.progress(3)
    assert not others.channel.closed
    await others.stop()


@pytest.mark.asyncio
@pytest.mark.usefixtures("traced")
async def test_announcement_below_the_limit_costs_only_what_arrives(
    unix_server: CommandServer,
) -> None:
    """64 MiB announced (the default limit), 1 MiB sent, then silence: memory follows the MiB."""
    address = dial_address(unix_server)
    attacker, channel = await accept_guest(unix_server, address)
    baseline = measure_from_here()
    run = asyncio.create_task(channel.run("yes", timeout=None))
    await attacker.read_command()
    sent = b"y" * MiB
    await attacker.send(bomb_prefix(64 * MiB) + sent)
    while channel.bytes_received < 4 + len(sent):  # noqa: ASYNC110 (no event to wait on)
        await asyncio.sleep(0.001)
    run.cancel()  # the caller gives up; the channel must close and free what it held
    with pytest.raises(asyncio.CancelledError):
        await run
    await channel.wait_closed()
    # Chunks at most twice what arrived, plus the caller-visible copy of the partial output.
    assert peak_since(baseline) < 6 * MiB
    attacker.close()


@pytest.mark.asyncio
async def test_partial_output_of_a_timed_out_bomb_is_what_arrived(
    unix_server: CommandServer,
) -> None:
    attacker, channel = await accept_guest(unix_server, dial_address(unix_server))
    run = asyncio.create_task(channel.run("yes", timeout=0.05))
    await attacker.read_command()
    await attacker.send(bomb_prefix(64 * MiB) + b"z" * 100_000)
    with pytest.raises(CommandTimeout) as info:
        await run
    assert info.value.result.stdout == b"z" * 100_000
    assert info.value.result.timed_out and info.value.result.exit_code is None
    assert channel.closed
    attacker.close()


@pytest.mark.asyncio
async def test_many_bombers_at_once_are_all_dropped(server: CommandServer, scale: Scale) -> None:
    address = dial_address(server)
    others = await bystander(server, address)
    attackers = [await accept_guest(server, address) for _ in range(scale.guests // 5)]
    runs = [asyncio.create_task(channel.run("x")) for _, channel in attackers]
    for attacker, _ in attackers:
        await attacker.read_command()
        await attacker.send(bomb_prefix())
    results = await asyncio.gather(*runs, return_exceptions=True)
    assert all(isinstance(r, FrameTooLarge) for r in results), results
    await others.progress(5)
    for attacker, channel in attackers:
        await channel.wait_closed()
        attacker.close()
    assert server.channels == [others.channel]
    await others.stop()

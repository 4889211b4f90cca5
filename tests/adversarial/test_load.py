"""Many guests, many commands at once: nothing lost, nothing mixed up, nothing hung, no leak.

Every guest answers with its own name and the exact command it received, so a
result delivered to the wrong caller, or for the wrong command, is caught.
Normal run: 50 guests x 20 commands; ``--soak``: 1,000 x 100.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import tracemalloc

import pytest

from vsock_async import CommandServer, GuestChannel, listen

from .conftest import Scale
from .hostile import RawGuest, answer_forever, open_fds

KiB = 1024


def named_answer(name: bytes):  # type: ignore[no-untyped-def]
    def answer(command: bytes) -> tuple[bytes, bytes, int]:
        return name + b"|" + command, command[::-1] + b"|" + name, (len(command) + len(name)) % 256

    return answer


async def drive(channel: GuestChannel, commands: int) -> tuple[bytes, int]:
    """Learn which guest is behind ``channel``, then check every answer it gives."""
    hello = await channel.run("who", timeout=30)
    name = hello.stdout.partition(b"|")[0]
    for k in range(commands):
        command = f"{name.decode()} command {k} of {channel.id}".encode()
        result = await channel.run(command, timeout=30)
        assert (result.stdout, result.stderr, result.exit_code) == named_answer(name)(command)
    return name, commands


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def load_round(server: CommandServer, scale: Scale) -> None:
    """Connect every guest, run every command and check each answer, then let all go."""
    address = server.sockets[0].getsockname()
    guests, channels = [], []
    for _ in range(scale.guests):  # one at a time: a Unix backlog holds only so many
        guests.append(await RawGuest.dial(address))
        channels.append(await server.accept(timeout=10))
    answering = [
        asyncio.create_task(answer_forever(g, named_answer(f"guest-{i}".encode())))
        for i, g in enumerate(guests)
    ]
    async with asyncio.timeout(30 + scale.guests * scale.commands / 200):
        done = await asyncio.gather(*(drive(c, scale.commands) for c in channels))

    assert len({name for name, _ in done}) == scale.guests  # each guest on its own channel
    assert sum(n for _, n in done) == scale.guests * scale.commands
    assert sum(len(g.commands) for g in guests) == scale.guests * (scale.commands + 1)

    for guest in guests:
        guest.close()
    for channel in channels:
        await channel.wait_closed()
    for task in answering:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert server.channels == []


def traced_now() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@pytest.mark.asyncio
async def test_many_guests_many_commands(socket_dir: str, scale: Scale) -> None:
    """Two rounds: the first grows the loop's and the server's tables to their working size,
    the second must leave memory where the first did (a leak grows with every round)."""
    raise_fd_limit(3 * scale.guests + 256)
    async with await listen(
        f"unix:{socket_dir}/load.sock", default_timeout=30, protocol="v1"
    ) as server:
        gc.collect()
        fds_before = open_fds()
        tracemalloc.start()
        try:
            await load_round(server, scale)
            await asyncio.sleep(0)
            after_first = traced_now()
            assert open_fds() == fds_before
            await load_round(server, scale)
            await asyncio.sleep(0)
            leaked = traced_now() - after_first
        finally:
            tracemalloc.stop()
        assert open_fds() == fds_before
        assert leaked < 32 * KiB, f"{leaked} more bytes held after the second round"

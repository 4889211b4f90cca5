"""One deadline timer for all of a server's v1 channels, over real Unix sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import vsock_async
from tests.guests import Answer, ScriptedGuest, Silent
from vsock_async import CommandTimeout, GuestChannel


async def _slow_or_silent(command: bytes) -> Answer:
    """``hang``: no answer; ``slow``: echoed after 0.15 s; anything else: echoed at once."""
    if command == b"hang":
        return Silent()
    if command == b"slow":
        await asyncio.sleep(0.15)
    return command, b"", 0


@pytest.mark.asyncio
async def test_each_channels_deadline_fires_for_its_own_calls_only(tmp_path: Path) -> None:
    """The shared timer is armed for the longest deadline first, re-armed for a shorter one
    of another channel, fails only that channel's call, and leaves the others running."""
    async with vsock_async.listen(f"unix:{tmp_path}/h.sock", protocol="v1") as server:
        guests = [ScriptedGuest(_slow_or_silent) for _ in range(3)]
        channels: list[GuestChannel] = []
        for guest in guests:
            await guest.connect(f"{tmp_path}/h.sock")
            channels.append(await server.accept(timeout=5))
        slow, hung, idle = channels
        long_call = asyncio.ensure_future(slow.run("slow", timeout=30))
        await asyncio.sleep(0)
        # A guard, not a measurement: were the timer left at 30 s, this would be TimeoutError.
        async with asyncio.timeout(10):
            with pytest.raises(CommandTimeout, match="closed"):
                await hung.run("hang", timeout=0.05)
        assert hung.closed
        assert not long_call.done()  # 0.05 s passed for all, but its own deadline is 30 s off
        assert (await long_call).stdout == b"slow"
        assert not slow.closed and not idle.closed
        assert (await idle.run("after", timeout=0.05)).stdout == b"after"
        for guest in guests:
            await guest.close()


@pytest.mark.asyncio
async def test_the_same_deadline_on_many_channels_fails_every_call(tmp_path: Path) -> None:
    """Calls on several channels whose deadlines pass in one firing of the timer all fail,
    each closing its own channel; a channel without a call stays open."""
    async with vsock_async.listen(f"unix:{tmp_path}/h.sock", protocol="v1") as server:
        guests = [ScriptedGuest(_slow_or_silent) for _ in range(4)]
        channels: list[GuestChannel] = []
        for guest in guests:
            await guest.connect(f"{tmp_path}/h.sock")
            channels.append(await server.accept(timeout=5))
        *hung, idle = channels
        outcomes = await asyncio.gather(
            *(c.run("hang", timeout=0.05) for c in hung), return_exceptions=True
        )
        assert all(isinstance(o, CommandTimeout) and o.sent for o in outcomes)
        assert all(c.closed for c in hung)
        assert not idle.closed
        assert (await idle.run("after", timeout=5)).stdout == b"after"
        for guest in guests:
            await guest.close()

"""One deadline timer for all of a server's v1 channels, over real Unix sockets."""

from __future__ import annotations

import asyncio
import gc
import math
import time
import weakref
from pathlib import Path

import pytest

import vsock_async
from tests.guests import Answer, ScriptedGuest, Silent
from vsock_async import CommandTimeout, GuestChannel
from vsock_async.host.deadlines import Deadlines


async def _slow_or_silent(command: bytes) -> Answer:
    """``hang``: no answer; ``slow``: echoed after 0.15 s; anything else: echoed at once."""
    if command == b"hang":
        return Silent()
    if command == b"slow":
        await asyncio.sleep(0.15)
    return command, b"", 0


async def _connected(
    server: vsock_async.CommandServer, path: str, n: int
) -> tuple[list[ScriptedGuest], list[GuestChannel]]:
    """``n`` guests answering as :func:`_slow_or_silent`, connected, and their channels."""
    guests = [ScriptedGuest(_slow_or_silent) for _ in range(n)]
    channels = []
    for guest in guests:
        await guest.connect(path)
        channels.append(await server.accept(timeout=5))
    return guests, channels


@pytest.mark.asyncio
async def test_each_channels_deadline_fires_for_its_own_calls_only(tmp_path: Path) -> None:
    """The shared timer is armed for the longest deadline first, re-armed for a shorter one
    of another channel, fails only that channel's call, and leaves the others running."""
    async with vsock_async.listen(f"unix:{tmp_path}/h.sock", protocol="v1") as server:
        guests, channels = await _connected(server, f"{tmp_path}/h.sock", 3)
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
        guests, channels = await _connected(server, f"{tmp_path}/h.sock", 4)
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


@pytest.mark.asyncio
async def test_a_queued_call_takes_the_place_of_the_one_before_and_its_deadline_fires(
    tmp_path: Path,
) -> None:
    """A channel keeps its oldest call's deadline apart and the others in a dict: when the
    oldest answers, the next moves up, and its deadline still fires on the wire."""
    release = asyncio.Event()

    async def held_or_silent(command: bytes) -> Answer:
        if command == b"held":
            await release.wait()
        return Silent() if command == b"hang" else (command, b"", 0)

    async with vsock_async.listen(f"unix:{tmp_path}/h.sock", protocol="v1") as server:
        guest = ScriptedGuest(held_or_silent)
        await guest.connect(f"{tmp_path}/h.sock")
        channel = await server.accept(timeout=5)
        first = asyncio.ensure_future(channel.run("held", timeout=30))
        second = asyncio.ensure_future(channel.run("hang", timeout=0.3))
        third = asyncio.ensure_future(channel.run("after", timeout=30))
        await asyncio.sleep(0)
        assert channel.queued == 2
        release.set()
        assert (await first).stdout == b"held"
        async with asyncio.timeout(10):  # a guard: a lost deadline would hang here
            with pytest.raises(CommandTimeout, match="closed") as info:
                await second
            with pytest.raises(vsock_async.ConnectionClosed, match="out of step"):
                await third
        assert info.value.sent and channel.closed
        await guest.close()


@pytest.mark.asyncio
async def test_a_channel_the_book_forgot_is_watched_again_on_its_next_call(
    tmp_path: Path,
) -> None:
    """After the timer fires with none of a channel's calls left, the book drops it; its next
    call with a deadline puts it back."""
    async with vsock_async.listen(f"unix:{tmp_path}/h.sock", protocol="v1") as server:
        guest = ScriptedGuest(_slow_or_silent)
        await guest.connect(f"{tmp_path}/h.sock")
        channel = await server.accept(timeout=5)
        assert (await channel.run("quick", timeout=0.02)).stdout == b"quick"
        await asyncio.sleep(0.1)  # the timer, armed for the quick call, fires with nothing left
        async with asyncio.timeout(10):
            with pytest.raises(CommandTimeout, match="closed"):
                await channel.run("hang", timeout=0.02)
        await guest.close()


@pytest.mark.asyncio
async def test_the_book_asks_each_watcher_never_early_and_forgets_those_with_none_left() -> None:
    """The book on its own, with watchers that record when they are asked: the timer never
    fires before the earliest deadline, is re-armed until every deadline is handled, and a
    watcher with none left is not asked again."""
    loop = asyncio.get_running_loop()
    book = Deadlines()
    assert book.use_clock_of(loop) is time.monotonic  # the default loop's own clock
    done = loop.create_future()

    class Recorder:
        def __init__(self, *deadlines: float) -> None:
            self.deadlines = sorted(deadlines)
            self.asked: list[float] = []

        def _deadlines_passed(self, now: float) -> float:
            self.asked.append(now)
            self.deadlines = [d for d in self.deadlines if d > now]
            if all(not w.deadlines for w in watchers) and not done.done():
                done.set_result(None)
            return self.deadlines[0] if self.deadlines else math.inf

    t = time.monotonic()
    watchers = [Recorder(t + 0.03, t + 0.09), Recorder(t + 0.01), Recorder(t + 0.05)]
    for watcher in watchers:
        book.add(watcher, watcher.deadlines[0], loop)
    assert book.next == t + 0.01
    async with asyncio.timeout(10):  # a guard: a timer not re-armed would leave this waiting
        await done
    assert min(min(w.asked) for w in watchers) >= t + 0.01  # never before the earliest
    assert len(watchers[1].asked) == 1  # its one deadline handled: forgotten
    assert len(watchers[0].asked) >= 2  # asked again for its second deadline
    assert book.next == math.inf  # nothing left: no timer


@pytest.mark.asyncio
async def test_a_closed_channel_is_not_kept_alive_by_the_book(tmp_path: Path) -> None:
    """The book holds a channel until its timer finds nothing left, which may be a whole
    timeout away; a channel whose connection is gone leaves it at once."""
    async with vsock_async.listen(f"unix:{tmp_path}/h.sock", protocol="v1") as server:
        guest = ScriptedGuest(_slow_or_silent)
        await guest.connect(f"{tmp_path}/h.sock")
        channel = await server.accept(timeout=5)
        assert (await channel.run("quick", timeout=60)).stdout == b"quick"  # timer: 60 s off
        await guest.close()
        await channel.wait_closed()
        await asyncio.sleep(0)  # the server hears of it and drops the channel
        assert server.channels == []
        gone = weakref.ref(channel)
        del channel
        gc.collect()
        assert gone() is None

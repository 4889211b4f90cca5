"""The guest registry of CommandServer: several listeners and guests on one server, several
connections per guest, FIFO hand-over, dropped connections, reconnects, events."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import Counter
from collections.abc import AsyncIterator, Hashable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import vsock_async
from tests.fc_muxer import DialingGuest, GuestScript
from vsock_async import (
    AcceptTimeout,
    CommandResult,
    CommandServer,
    CommandTimeout,
    ConnectionClosed,
    Guest,
    GuestBusy,
    GuestChannel,
    GuestEvent,
    UnknownGuest,
    UsageError,
)
from vsock_async.host.guests import guest_key


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[CommandServer]:
    async with vsock_async.listen(f"unix:{tmp_path}/a.sock", label="a") as srv:
        yield srv


async def dial(path: Path | str, count: int = 1, name: str = "guest") -> DialingGuest:
    guest = DialingGuest(str(path), GuestScript(name))
    await guest.dial(count)
    return guest


@pytest_asyncio.fixture
async def agent(server: CommandServer, tmp_path: Path) -> AsyncIterator[DialingGuest]:
    """One connection dialed to the ``server`` fixture's listener "a"."""
    dialing = await dial(tmp_path / "a.sock")
    try:
        yield dialing
    finally:
        await dialing.aclose()


@pytest_asyncio.fixture
async def guest(server: CommandServer, agent: DialingGuest) -> Guest:
    """The guest of the ``agent`` fixture's connection."""
    return await server.wait_for_guest("a", timeout=2)


async def occupy(guest: Guest, agent: DialingGuest, command: str) -> asyncio.Future[CommandResult]:
    """``command`` (a ``wait ...`` the script holds until released) started on ``guest``."""
    call = asyncio.ensure_future(guest.run(command, timeout=5))
    await agent.script.started.get()
    return call


async def until(condition: object, *, within: float = 2.0) -> None:
    """Let the loop run until ``condition()`` holds (connections land asynchronously)."""
    assert callable(condition)
    for _ in range(int(within / 0.001)):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"condition not met within {within} s")


@pytest.mark.asyncio
async def test_several_listeners_and_guests_on_one_server(tmp_path: Path) -> None:
    async with vsock_async.listen(f"unix:{tmp_path}/a.sock", label="a") as server:
        await server.add_listener(f"hvsock:{tmp_path}/vm-b.sock:1024", label="b")
        await server.add_listener(f"unix:{tmp_path}/c.sock")
        a = await dial(tmp_path / "a.sock", name="A")
        b = await dial(tmp_path / "vm-b.sock_1024", name="B")
        c = await dial(tmp_path / "c.sock", name="C")
        try:
            ga = await server.wait_for_guest("a", timeout=2)
            gb = await server.wait_for_guest("b", timeout=2)
            gc_ = await server.wait_for_guest(f"unix:{tmp_path}/c.sock", timeout=2)
            assert {g.key for g in server.guests} == {"a", "b", f"unix:{tmp_path}/c.sock"}
            assert (await ga.run("hi")).stdout == b"A:hi"
            assert (await gb.run("hi")).stdout == b"B:hi"
            assert (await gc_.run("hi")).stdout == b"C:hi"
            assert server.guest("b") is gb
            assert len(server.channels) == 3
        finally:
            for guest in (a, b, c):
                await guest.aclose()


@pytest.mark.asyncio
async def test_unknown_guest_is_a_clear_lookup_error(server: CommandServer) -> None:
    with pytest.raises(UnknownGuest, match="no guest 'nope' is connected") as info:
        server.guest("nope")
    assert isinstance(info.value, LookupError)


@pytest.mark.asyncio
async def test_wait_for_guest_returns_when_it_connects_and_times_out_otherwise(
    server: CommandServer, tmp_path: Path
) -> None:
    with pytest.raises(AcceptTimeout, match="guest 'a' did not connect"):
        await server.wait_for_guest("a", timeout=0.01)
    waiting = asyncio.ensure_future(server.wait_for_guest("a", timeout=2))
    await asyncio.sleep(0)
    guest = await dial(tmp_path / "a.sock")
    try:
        found = await waiting
        assert found.key == "a"
        assert found.connected
        assert found.connected_at is not None
    finally:
        await guest.aclose()


@pytest.mark.asyncio
async def test_label_is_refused_on_a_vsock_listener(server: CommandServer) -> None:
    with pytest.raises(UsageError, match="known by its CID"):
        await server.add_listener("vsock://any:0", label="x")


@pytest.mark.asyncio
async def test_connections_of_one_guest_run_commands_at_once(
    server: CommandServer, tmp_path: Path
) -> None:
    agent = await dial(tmp_path / "a.sock", count=3)
    try:
        await until(lambda: len(server.channels) == 3)
        guest = server.guest("a")
        assert len(guest.channels) == 3
        calls = [asyncio.ensure_future(guest.run(f"wait g{i}", timeout=5)) for i in range(3)]
        for _ in range(3):
            await asyncio.wait_for(agent.script.started.get(), 2)
        assert agent.script.running == 3
        assert guest.busy
        assert all(channel.busy for channel in guest.channels)
        for i in range(3):
            agent.script.release(f"g{i}".encode())
        results = await asyncio.gather(*calls)
        assert [r.stdout for r in results] == [f"guest:wait g{i}".encode() for i in range(3)]
        assert not guest.busy
    finally:
        await agent.aclose()


@pytest.mark.asyncio
async def test_calls_wait_fifo_for_the_next_free_connection(
    agent: DialingGuest, guest: Guest
) -> None:
    first = await occupy(guest, agent, "wait first")
    later = []
    for i in range(4):
        later.append(asyncio.ensure_future(guest.run(f"n{i}", timeout=5)))
        await asyncio.sleep(0)
    await until(lambda: guest.waiting == 4)
    with pytest.raises(GuestBusy, match="every connection of guest 'a' is busy"):
        await guest.run("never", wait=False)
    assert guest.channels[0].queued == 0, "waiting calls are held by the guest, not queued"
    agent.script.release(b"first")
    await first
    await asyncio.gather(*later)
    assert agent.script.commands == [b"wait first", b"n0", b"n1", b"n2", b"n3"]
    assert agent.script.max_running == 1


@pytest.mark.asyncio
async def test_timeout_while_waiting_leaves_the_connection_usable(
    agent: DialingGuest, guest: Guest
) -> None:
    first = await occupy(guest, agent, "wait first")
    with pytest.raises(CommandTimeout, match="waiting for a free connection") as info:
        await guest.run("late", timeout=0.01)
    assert info.value.result.timed_out
    assert guest.waiting == 0
    agent.script.release(b"first")
    await first
    assert (await guest.run("next", timeout=2)).stdout == b"guest:next"
    assert b"late" not in agent.script.commands


@pytest.mark.asyncio
async def test_a_timeout_after_waiting_for_a_connection_names_the_callers_timeout(
    agent: DialingGuest, guest: Guest
) -> None:
    first = await occupy(guest, agent, "wait first")
    late = asyncio.ensure_future(guest.run("wait never", timeout=0.05))
    await asyncio.sleep(0.03)  # the late call waits most of its time for the connection
    agent.script.release(b"first")
    await first
    with pytest.raises(CommandTimeout, match=r"after 0\.05 s") as info:
        await late
    assert info.value.result.timed_out


@pytest.mark.asyncio
async def test_a_dropped_connection_fails_its_calls_and_waiting_ones(
    server: CommandServer, agent: DialingGuest, guest: Guest
) -> None:
    in_flight = await occupy(guest, agent, "wait never")
    waiting = asyncio.ensure_future(guest.run("queued", timeout=5))
    await until(lambda: guest.waiting == 1)
    agent.drop()
    with pytest.raises(ConnectionClosed):
        await in_flight
    with pytest.raises(ConnectionClosed, match="no open connection"):
        await waiting
    assert b"queued" not in agent.script.commands
    await until(lambda: not server.guests)
    with pytest.raises(UnknownGuest):
        server.guest("a")
    with pytest.raises(ConnectionClosed, match="no open connection"):
        await guest.run("after", timeout=1)


@pytest.mark.asyncio
async def test_dropping_one_of_several_connections_keeps_the_guest_served(
    server: CommandServer, tmp_path: Path
) -> None:
    agent = await dial(tmp_path / "a.sock", count=2)
    try:
        await until(lambda: len(server.channels) == 2)
        guest = server.guest("a")
        in_flight = asyncio.ensure_future(guest.run("wait never", timeout=5))
        await agent.script.started.get()
        dropped = next(i for i, c in enumerate(guest.channels) if c.busy)
        agent.drop(dropped)
        with pytest.raises(ConnectionClosed):
            await in_flight
        await until(lambda: len(guest.channels) == 1)
        assert (await guest.run("still", timeout=2)).stdout == b"guest:still"
        assert agent.script.commands.count(b"wait never") == 1, "never replayed"
    finally:
        await agent.aclose()


@pytest.mark.asyncio
async def test_a_reconnecting_guest_is_served_on_its_new_connection(
    server: CommandServer, tmp_path: Path
) -> None:
    first = await dial(tmp_path / "a.sock", name="before")
    guest = await server.wait_for_guest("a", timeout=2)
    old_channel = guest.channels[0]
    first.drop()
    await until(lambda: not guest.connected)
    second = await dial(tmp_path / "a.sock", name="after")
    try:
        again = await server.wait_for_guest("a", timeout=2)
        assert again is guest, "a handle still held is revived by the reconnect"
        assert guest.channels[0] is not old_channel
        assert (await guest.run("x", timeout=2)).stdout == b"after:x"
    finally:
        await first.aclose()
        await second.aclose()


@pytest.mark.asyncio
async def test_a_handle_nobody_holds_is_forgotten(server: CommandServer, tmp_path: Path) -> None:
    first = await dial(tmp_path / "a.sock")
    await server.wait_for_guest("a", timeout=2)
    first.drop()
    await until(lambda: not server.guests)
    gc.collect()
    assert not server._detached
    second = await dial(tmp_path / "a.sock")
    try:
        assert (await server.wait_for_guest("a", timeout=2)).connected
    finally:
        await first.aclose()
        await second.aclose()


@pytest.mark.asyncio
async def test_replace_older_closes_older_connections_of_the_key(tmp_path: Path) -> None:
    async with vsock_async.listen(f"unix:{tmp_path}/r.sock", replace_older=True) as server:
        first = await dial(tmp_path / "r.sock", name="old")
        key = f"unix:{tmp_path}/r.sock"
        guest = await server.wait_for_guest(key, timeout=2)
        old = guest.channels[0]
        in_flight = asyncio.ensure_future(guest.run("wait never", timeout=5))
        await first.script.started.get()
        second = await dial(tmp_path / "r.sock", name="new")
        try:
            with pytest.raises(ConnectionClosed, match="replaced by connection"):
                await in_flight
            await old.wait_closed()
            assert len(guest.channels) == 1
            assert (await guest.run("x", timeout=2)).stdout == b"new:x"
        finally:
            await first.aclose()
            await second.aclose()


@pytest.mark.asyncio
async def test_older_connections_stay_by_default(server: CommandServer, tmp_path: Path) -> None:
    first = await dial(tmp_path / "a.sock")
    second = await dial(tmp_path / "a.sock")
    try:
        await until(lambda: len(server.channels) == 2)
        assert len(server.guest("a").channels) == 2
    finally:
        await first.aclose()
        await second.aclose()


@pytest.mark.asyncio
async def test_events_report_connects_and_disconnects_and_async_callbacks_run(
    server: CommandServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[GuestEvent] = []
    probed: list[int] = []

    async def probe_new(event: GuestEvent) -> None:
        if event.kind == "connected":
            await event.channel.probe(timeout=2)
            probed.append(event.channel.id)

    def broken(event: GuestEvent) -> None:
        raise RuntimeError("callback bug")

    server.subscribe(events.append)
    server.subscribe(probe_new)
    unsubscribe = server.subscribe(broken)
    agent = await dial(tmp_path / "a.sock")
    try:
        with caplog.at_level(logging.ERROR, "vsock_async"):
            await until(lambda: len(probed) == 1)
        assert "callback bug" in caplog.text
        unsubscribe()
        guest = server.guest("a")
        assert guest.last_probe is not None
        assert [e.kind for e in events] == ["connected"]
        assert events[0].guest is guest
        assert events[0].channel.id == probed[0]
        agent.drop()
        await until(lambda: len(events) == 2)
        assert events[1].kind == "disconnected"
        assert isinstance(events[1].error, ConnectionClosed)
        assert not events[1].guest.channels
    finally:
        await agent.aclose()


@pytest.mark.asyncio
async def test_guest_probe_and_aclose(server: CommandServer, tmp_path: Path) -> None:
    agent = await dial(tmp_path / "a.sock", count=2)
    try:
        await until(lambda: len(server.channels) == 2)
        guest = server.guest("a")
        assert guest.last_probe is None
        await guest.probe(timeout=2)
        assert guest.last_probe is not None
        await guest.aclose()
        assert not guest.connected
        assert not server.guests
        assert not server.channels
    finally:
        await agent.aclose()


@pytest.mark.asyncio
async def test_accept_and_the_registry_share_connections(
    server: CommandServer, agent: DialingGuest
) -> None:
    channel = await server.accept(timeout=2)
    guest = server.guest("a")
    assert guest.channels == [channel]
    held = asyncio.ensure_future(channel.run("wait direct", timeout=5))
    await agent.script.started.get()
    assert guest.busy
    through_guest = asyncio.ensure_future(guest.run("after", timeout=5))
    await asyncio.sleep(0.01)
    agent.script.release(b"direct")
    await held
    assert (await through_guest).stdout == b"guest:after"


@pytest.mark.asyncio
async def test_closing_the_server_fails_waiters(server: CommandServer) -> None:
    waiting = asyncio.ensure_future(server.wait_for_guest("a", timeout=5))
    await asyncio.sleep(0)
    await server.aclose()
    with pytest.raises(ConnectionClosed, match="closing"):
        await waiting
    with pytest.raises(ConnectionClosed, match="closed"):
        await server.wait_for_guest("a", timeout=1)


@pytest.mark.asyncio
async def test_every_connection_closed_at_once_is_reported(tmp_path: Path) -> None:
    server = await vsock_async.listen(f"unix:{tmp_path}/a.sock", label="a")
    gone: list[int] = []

    async def on_event(event: GuestEvent) -> None:
        await asyncio.sleep(0)
        if event.kind == "disconnected":
            gone.append(event.channel.id)

    server.subscribe(on_event)
    agent = await dial(tmp_path / "a.sock", count=3)
    try:
        await until(lambda: len(server.channels) == 3)
        first_two = server.guest("a").channels[:2]
        await first_two[0].aclose()
        await first_two[1].aclose()
        await until(lambda: len(gone) == 2)
        assert server.guest("a").connected
        await agent.dial(2)
        await until(lambda: len(server.channels) == 3)
        ids = {channel.id for channel in server.channels}
        await server.guest("a").aclose()
        await until(lambda: len(gone) == 5)
        assert set(gone[2:]) == ids
        assert not server.guests
        await agent.dial(2)
        await until(lambda: len(server.channels) == 2)
        ids = {channel.id for channel in server.channels}
        await server.aclose()
        assert set(gone[5:]) == ids, "aclose waits for the disconnect callbacks it causes"
    finally:
        await agent.aclose()
        await server.aclose()


@pytest.mark.asyncio
async def test_a_spent_deadline_sends_nothing(agent: DialingGuest, guest: Guest) -> None:
    with pytest.raises(CommandTimeout, match="never sent"):
        await guest.run("too late", timeout=0)
    assert not guest.busy
    assert (await guest.run("next", timeout=2)).stdout == b"guest:next"
    assert agent.script.commands == [b"next"]


# -- guest keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "normal"),
    [
        (3, 3),
        ("3", 3),
        ("0003", 3),
        ("4294967295", 4294967295),
        ("12345678901", "12345678901"),  # more than 10 digits: not a CID, stays a string
        ("", ""),
        (" 3", " 3"),
        ("3a", "3a"),
        ("²", "²"),  # a digit, but not an ASCII one
        ("vm1", "vm1"),
        (("a", 1), ("a", 1)),
    ],
)
def test_guest_key_turns_a_string_of_digits_into_the_cid(key: Hashable, normal: object) -> None:
    assert guest_key(key) == normal
    assert type(guest_key(key)) is type(normal)


@pytest.mark.asyncio
@pytest.mark.parametrize("asked", [3, "3"])
async def test_a_key_finds_a_guest_whether_it_is_there_already_or_comes_later(
    tmp_path: Path, asked: int | str
) -> None:
    async with vsock_async.listen(f"unix:{tmp_path}/n.sock", label="3") as server:
        later = asyncio.ensure_future(server.wait_for_guest(asked, timeout=2))
        await asyncio.sleep(0)
        agent = await dial(tmp_path / "n.sock")
        try:
            arrived = await later
            assert arrived.key == 3
            assert await server.wait_for_guest(asked, timeout=2) is arrived
            assert server.guest(asked) is arrived
            assert server.guest(3) is server.guest("3")
        finally:
            await agent.aclose()


# -- cost per connection -----------------------------------------------------------------------


def count_channel_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count reads of each connection's state, comparisons between connections, and of
    ``Guest.channels``: a path that looks at every connection of a guest shows up here."""
    reads: Counter[str] = Counter()
    for name in ("closed", "busy", "queued"):
        getter = getattr(GuestChannel, name).fget

        def counted(self: GuestChannel, getter: Any = getter, name: str = name) -> Any:
            reads[name] += 1
            return getter(self)

        monkeypatch.setattr(GuestChannel, name, property(counted))
    compare = GuestChannel.__eq__

    def eq(self: GuestChannel, other: object) -> bool:
        reads["__eq__"] += 1
        return compare(self, other)

    monkeypatch.setattr(GuestChannel, "__eq__", eq)
    listing = vars(Guest)["channels"].fget

    def channels(self: Guest) -> Any:
        reads["Guest.channels"] += 1
        return listing(self)

    monkeypatch.setattr(Guest, "channels", property(channels))
    return reads


@pytest.mark.asyncio
async def test_connect_run_and_disconnect_never_look_at_every_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    many = 2000
    path = tmp_path / "m.sock"
    async with vsock_async.listen(f"unix:{path}", label="m", max_connections_per_guest=None) as srv:
        agent = await dial(path, count=many)
        try:
            await until(lambda: len(srv.channels) == many, within=30)
            guest = srv.guest("m")
            reads = count_channel_reads(monkeypatch)
            assert (await guest.run("x", timeout=5)).stdout == b"guest:x"
            assert sum(reads.values()) < 20, reads
            reads.clear()
            await agent.dial(1)
            await until(lambda: guest.connection_count == many + 1)
            assert sum(reads.values()) < 20, reads
            reads.clear()
            agent.drop(many - 10)  # late in every list: a scan would compare ~2000 connections
            await until(lambda: guest.connection_count == many)
            assert sum(reads.values()) < 20, reads
            reads.clear()
            calls = [asyncio.ensure_future(guest.run(f"wait {i}", timeout=5)) for i in range(3)]
            for _ in calls:
                await asyncio.wait_for(agent.script.started.get(), 2)
            assert (await guest.run("y", timeout=5)).stdout == b"guest:y"
            for i in range(3):
                agent.script.release(str(i).encode())
            await asyncio.gather(*calls)
            assert sum(reads.values()) < 60, reads
        finally:
            await agent.aclose()


@pytest.mark.asyncio
async def test_connections_beyond_the_cap_are_refused_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.sock"
    async with vsock_async.listen(f"unix:{path}", label="c", max_connections_per_guest=2) as srv:
        assert srv.max_connections_per_guest == 2
        agent = await dial(path, count=2)
        try:
            await until(lambda: len(srv.channels) == 2)
            with caplog.at_level(logging.WARNING, "vsock_async"):
                await agent.dial(1)
                await until(lambda: agent.tasks[2].done())  # closed at once: the guest saw EOF
            refusals = [r for r in caplog.records if "max_connections_per_guest" in r.message]
            assert len(refusals) == 1
            assert "'c'" in refusals[0].message
            assert srv.guest("c").connection_count == 2
            agent.drop(0)
            await until(lambda: srv.guest("c").connection_count == 1)
            await agent.dial(1)
            await until(lambda: srv.guest("c").connection_count == 2)
        finally:
            await agent.aclose()


def test_the_cap_defaults_to_64_and_must_be_a_positive_int_or_none() -> None:
    assert CommandServer().max_connections_per_guest == 64
    assert CommandServer(max_connections_per_guest=None).max_connections_per_guest is None
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(UsageError, match="max_connections_per_guest"):
            CommandServer(max_connections_per_guest=bad)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_replace_older_is_never_refused_by_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "r.sock"
    async with vsock_async.listen(
        f"unix:{path}", label="r", replace_older=True, max_connections_per_guest=1
    ) as srv:
        agent = await dial(path, count=3)
        try:
            await until(lambda: agent.tasks[0].done() and agent.tasks[1].done())
            assert srv.guest("r").connection_count == 1
        finally:
            await agent.aclose()


@pytest.mark.asyncio
async def test_a_guest_losing_every_connection_at_once_is_gone_once(tmp_path: Path) -> None:
    server = await vsock_async.listen(f"unix:{tmp_path}/g.sock", label="g")
    gone: list[GuestEvent] = []
    server.subscribe(lambda e: gone.append(e) if not e.guest.connected else None)
    agent = await dial(tmp_path / "g.sock", count=3)
    try:
        await until(lambda: len(server.channels) == 3)
        await server.guest("g").aclose()
        assert len(gone) == 1, "only its last disconnect leaves the guest without a connection"
        await agent.dial(2)
        await until(lambda: len(server.channels) == 2)
        await server.aclose()
        assert len(gone) == 2
    finally:
        await agent.aclose()
        await server.aclose()

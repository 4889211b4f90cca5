"""The asyncio host layer over real Unix sockets and TCP loopback, with guests written here."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

import vsock_async
from tests.agent_process import agent_task, short_socket_path
from tests.guests import Answer, Handler, Raw, ScriptedGuest, Silent, echo_handler
from vsock_async import (
    ClosedLocally,
    CommandFailed,
    CommandResult,
    CommandServer,
    CommandTimeout,
    ConnectionClosed,
    ConnectionLost,
    FrameTooLarge,
    GuestChannel,
    Limits,
    PeerError,
    ProbeFailed,
    ProtocolError,
    UsageError,
)
from vsock_async.agent import GuestAgent
from vsock_async.protocol import ResultDecoder, encode_command, encode_result


@dataclass
class Setup:
    server: CommandServer
    address: str | tuple[str, int]

    async def guest(self, handler: Handler = echo_handler) -> tuple[GuestChannel, ScriptedGuest]:
        guest = ScriptedGuest(handler)
        await guest.connect(self.address)
        channel = await self.server.accept(timeout=5)
        return channel, guest


@pytest_asyncio.fixture(params=["unix", "tcp"])
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Setup]:
    limits = Limits(max_stdout=80 << 20, max_stderr=1 << 20)
    if request.param == "unix":
        path = str(tmp_path / "host.sock")
        server = await vsock_async.listen(
            f"unix:{path}", limits=limits, default_timeout=10, protocol="v1"
        )
        address: str | tuple[str, int] = path
    else:
        server = await vsock_async.listen(
            "tcp://127.0.0.1:0", limits=limits, default_timeout=10, protocol="v1"
        )
        address = server.sockets[0].getsockname()[:2]
    try:
        yield Setup(server, address)
    finally:
        await server.aclose()


# -- the happy path ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_probe_and_run(setup: Setup) -> None:
    channel, guest = await setup.guest()
    await channel.probe(timeout=2)
    assert channel.last_probe is not None
    result = await channel.run("uname -a", timeout=2)
    assert result == CommandResult(b"uname -a", b"stderr:uname -a", 3, False)
    assert (await channel.run(b"exit 42")).exit_code == 42
    assert guest.commands == [b":", b"uname -a", b"exit 42"]
    await guest.close()


@pytest.mark.asyncio
async def test_command_forms_are_composed_and_quoted(setup: Setup) -> None:
    channel, guest = await setup.guest()
    await channel.run(["cat", "my file", "it's"])
    await channel.run("ls", cwd="/tmp/a b", env={"GREETING": "hi there", "X": "$HOME"})
    await channel.run("caf\udcc3")  # surrogateescape: the undecodable byte goes out as it came
    assert guest.commands == [
        b"cat 'my file' 'it'\"'\"'s'",
        b"cd -- '/tmp/a b' || exit 1\nexport GREETING='hi there'\nexport X='$HOME'\nls",
        b"caf\xc3",
    ]
    with pytest.raises(UsageError, match="not a valid shell name"):
        await channel.run("ls", env={"BAD-NAME": "x"})
    with pytest.raises(UsageError, match="must be str, bytes"):
        await channel.run([])
    assert not channel.closed
    await guest.close()


@pytest.mark.asyncio
async def test_check_raises_command_failed(setup: Setup) -> None:
    channel, guest = await setup.guest()
    with pytest.raises(CommandFailed) as info:
        await channel.run("exit 7", check=True)
    assert info.value.result.exit_code == 7
    assert (await channel.run("exit 0", check=True)).ok
    assert not channel.closed
    await guest.close()


@pytest.mark.asyncio
async def test_64_mib_output_through_one_exchange(setup: Setup) -> None:
    channel, guest = await setup.guest()
    size = 64 << 20
    result = await channel.run(f"big {size}", timeout=30)
    assert len(result.stdout) == size
    assert result.stdout[:256] == bytes(i % 251 for i in range(256))
    assert result.stdout == bytes(i % 251 for i in range(256)) * (size // 256)
    assert result.stderr == b"e" and result.exit_code == 0
    assert (await channel.run("exit 5")).exit_code == 5
    await guest.close()


@pytest.mark.asyncio
async def test_concurrent_callers_are_served_in_order(setup: Setup) -> None:
    async def slow_echo(command: bytes) -> Answer:
        await asyncio.sleep(0.001)
        return command, b"", len(command) % 256

    channel, guest = await setup.guest(slow_echo)
    commands = [f"cmd-{i}".encode() * (i + 1) for i in range(30)]
    results = await asyncio.gather(*(channel.run(c) for c in commands))
    assert [r.stdout for r in results] == commands
    assert guest.commands == commands
    await guest.close()


@pytest.mark.asyncio
async def test_several_guests_at_once(setup: Setup) -> None:
    pairs = [await setup.guest() for _ in range(5)]
    assert len({channel.id for channel, _ in pairs}) == 5
    assert len(setup.server.channels) == 5
    results = await asyncio.gather(*(ch.run(f"guest {i}") for i, (ch, _) in enumerate(pairs)))
    assert [r.stdout for r in results] == [f"guest {i}".encode() for i in range(5)]
    for _, guest in pairs:
        assert len(guest.commands) == 1 and guest.commands[0] in [r.stdout for r in results]
        await guest.close()


# -- deadlines and cancellation ---------------------------------------------------------


@pytest.mark.asyncio
async def test_timeout_on_silent_peer_closes_the_channel(setup: Setup) -> None:
    channel, guest = await setup.guest()
    queued = asyncio.ensure_future(channel.run("queued behind the hang", timeout=5))
    with pytest.raises(CommandTimeout) as info:
        await channel.run("hang", timeout=0.05)
    assert isinstance(info.value, TimeoutError)
    assert info.value.result == CommandResult(b"", b"", None, timed_out=True)
    assert "closed" in str(info.value)
    assert channel.closed
    with pytest.raises(ConnectionClosed, match="out of step"):
        await queued
    with pytest.raises(ConnectionClosed):
        await channel.run("exit 0")
    await guest.close()


@pytest.mark.asyncio
async def test_run_order_puts_queued_call_behind_hang(setup: Setup) -> None:
    """The hang is sent first, so the queued call's own deadline fires while it is queued."""
    channel, guest = await setup.guest()
    hung = asyncio.ensure_future(channel.run("hang", timeout=5))
    await asyncio.sleep(0)
    with pytest.raises(CommandTimeout, match="never sent") as info:
        await channel.run("exit 1", timeout=0.02)
    assert info.value.result.timed_out and info.value.result.exit_code is None
    assert not channel.closed  # a call that gave up in the queue leaves the channel in step
    assert channel.busy
    await channel.aclose()
    with pytest.raises(ConnectionClosed):
        await hung
    assert guest.commands == [b"hang"]
    await guest.close()


@pytest.mark.asyncio
async def test_timeout_keeps_partial_output(setup: Setup) -> None:
    async def half(command: bytes) -> Answer:
        return Raw(b"\0\0\0\x0aabcde")  # 10 bytes of stdout announced, 5 sent, then silence

    channel, guest = await setup.guest(half)
    with pytest.raises(CommandTimeout) as info:
        await channel.run("x", timeout=0.1)
    assert info.value.result == CommandResult(b"abcde", b"", None, timed_out=True)
    assert channel.closed
    await guest.close()


@pytest.mark.asyncio
async def test_trickling_guest_cannot_outlive_the_deadline(setup: Setup) -> None:
    async def trickle(command: bytes) -> Answer:
        for byte in encode_result(b"slow" * 100, b"", 0):
            assert guest.writer is not None
            guest.writer.write(bytes([byte]))
            await asyncio.sleep(0.005)
        return Silent()

    channel, guest = await setup.guest(trickle)
    with pytest.raises(CommandTimeout) as info:
        await channel.run("x", timeout=0.1)
    assert 0 < len(info.value.result.stdout) < 400
    assert channel.closed
    await guest.close()


@pytest.mark.asyncio
async def test_cancellation_closes_the_channel(setup: Setup) -> None:
    channel, guest = await setup.guest()
    task = asyncio.ensure_future(channel.run("hang", timeout=None))
    await asyncio.sleep(0.02)
    assert channel.busy
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert channel.closed
    await guest.close()


@pytest.mark.asyncio
async def test_bad_timeouts_are_usage_errors(setup: Setup) -> None:
    channel, guest = await setup.guest()
    with pytest.raises(UsageError, match="timeout"):
        await channel.run("x", timeout=-1)
    good = 5.0
    for timeout in (good, -1.0, float("nan"), good, True, good):  # a valid one in between
        if timeout is good:
            assert (await channel.run("exit 0", timeout=timeout)).ok
        else:
            with pytest.raises(UsageError, match="timeout"):
                await channel.run("x", timeout=timeout)
    with pytest.raises(UsageError, match="timeout"):
        await setup.server.accept(timeout=-0.5)
    assert not channel.closed
    await guest.close()


# -- misbehaving guests -----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
async def test_peer_closing_at_every_byte_of_a_result(setup: Setup, reset: bool) -> None:
    frame = encode_result(b"out", b"err", 9)
    for cut in range(len(frame)):

        async def cut_short(command: bytes, cut: int = cut) -> Answer:
            return Raw(frame[:cut], close=True, reset=reset)

        channel, guest = await setup.guest(cut_short)
        with pytest.raises((ConnectionClosed, ProtocolError)):
            await channel.run("x", timeout=5)
        assert channel.closed
        await channel.wait_closed()
        assert channel not in setup.server.channels
        await guest.close()
    fresh, guest = await setup.guest()
    assert (await fresh.run("exit 4")).exit_code == 4
    await guest.close()


@pytest.mark.asyncio
async def test_bytes_beyond_the_result_are_a_protocol_error(setup: Setup) -> None:
    async def chatty(command: bytes) -> Answer:
        return Raw(encode_result(b"", b"", 0) + b"\0")

    channel, guest = await setup.guest(chatty)
    with pytest.raises(ProtocolError, match="beyond the result"):
        await channel.run("x")
    assert channel.closed
    await guest.close()


@pytest.mark.asyncio
async def test_unsolicited_bytes_close_an_idle_channel(setup: Setup) -> None:
    channel, guest = await setup.guest()
    assert guest.writer is not None
    guest.writer.write(b"\0\0\0\0")
    await channel.wait_closed()
    assert isinstance(channel.error, ProtocolError)
    assert "no command was pending" in str(channel.error)
    await guest.close()


@pytest.mark.asyncio
async def test_oversized_output_fails_and_drops_only_that_guest(setup: Setup) -> None:
    async def bomb(command: bytes) -> Answer:
        return Raw(b"\xff\xff\xff\xff")

    channel, bad = await setup.guest(bomb)
    other, good = await setup.guest()
    with pytest.raises(FrameTooLarge, match="stdout of 4294967295 bytes"):
        await channel.run("x")
    assert channel.closed
    assert (await other.run("exit 3")).exit_code == 3
    await bad.close()
    await good.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "seen", "message"),
    [
        ((b"", b"", 1), CommandResult(b"", b"", 1), "answered exit code 1"),
        ((b"ready\n", b"", 0), None, "answered 6 bytes of stdout"),
        ((b"", b"warning", 0), None, "answered 7 bytes of stderr"),
    ],
    ids=["exit-1", "stdout", "stderr"],
)
async def test_wrong_probe_answer(
    setup: Setup, answer: tuple[bytes, bytes, int], seen: CommandResult | None, message: str
) -> None:
    """A whole wrong answer is the result; an answer with output is never read (None)."""

    async def wrong(command: bytes) -> Answer:
        return answer

    channel, guest = await setup.guest(wrong)
    with pytest.raises(ProbeFailed, match=message) as info:
        await channel.probe(timeout=1)
    assert info.value.result == seen
    assert channel.closed
    await guest.close()


@pytest.mark.asyncio
async def test_probe_timeout(setup: Setup) -> None:
    async def silent(command: bytes) -> Answer:
        return Silent()

    channel, guest = await setup.guest(silent)
    with pytest.raises(CommandTimeout):
        await channel.probe(timeout=0.05)
    assert channel.closed
    assert guest.commands == [b":"]
    await guest.close()


# -- the server -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_accept_timeout_and_close(setup: Setup) -> None:
    with pytest.raises(vsock_async.AcceptTimeout, match="no guest connected") as info:
        await setup.server.accept(timeout=0.02)
    assert isinstance(info.value, TimeoutError)
    channel, guest = await setup.guest()
    pending = asyncio.ensure_future(channel.run("hang", timeout=None))
    await asyncio.sleep(0)
    await setup.server.aclose()
    with pytest.raises(ConnectionClosed, match="server is closing"):
        await pending
    assert channel.closed and setup.server.closed
    with pytest.raises(ConnectionClosed, match="server is closed"):
        await setup.server.accept(timeout=0.01)
    if isinstance(setup.address, str):
        assert not os.path.exists(setup.address)
    await guest.close()


@pytest.mark.asyncio
async def test_guest_gone_before_accept_is_skipped(setup: Setup) -> None:
    first = ScriptedGuest()
    await first.connect(setup.address)
    await asyncio.sleep(0.02)
    await first.close()
    await asyncio.sleep(0.02)
    channel, second = await setup.guest()
    assert not channel.closed
    assert (await channel.run("exit 2")).exit_code == 2
    await second.close()


@pytest.mark.asyncio
async def test_listen_as_context_manager(tmp_path: Path) -> None:
    path = str(tmp_path / "cm.sock")
    async with vsock_async.listen(f"unix:{path}") as server:
        assert os.stat(path).st_mode & 0o777 == 0o600
        guest = ScriptedGuest()
        await guest.connect(path)
        async with await server.accept(timeout=2) as channel:
            await channel.probe()
        assert channel.closed
        await guest.close()
    assert not os.path.exists(path)


@pytest.mark.asyncio
async def test_stale_socket_file_is_replaced_and_live_one_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a crashed run leaves
    async with vsock_async.listen(f"unix:{path}") as server:
        with pytest.raises(vsock_async.ListenFailed, match="already in use"):
            await vsock_async.listen(f"unix:{path}")
        assert server.addresses == [vsock_async.UnixAddress(path)]
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(vsock_async.ListenFailed, match="not a socket"):
        await vsock_async.listen(f"unix:{regular}")
    assert regular.read_text() == "x"


@pytest.mark.asyncio
async def test_allowed_cids_needs_a_vsock_listener(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="vsock:// listeners only"):
        await vsock_async.listen(f"unix:{tmp_path / 'x.sock'}", allowed_cids={3})
    assert not (tmp_path / "x.sock").exists()


@pytest.mark.asyncio
async def test_connect_to_listening_guest_over_unix(tmp_path: Path) -> None:
    """Host-initiated: the guest listens, the host dials it with connect()."""
    path = str(tmp_path / "guest.sock")
    seen: list[bytes] = []

    async def on_host(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = await reader.readexactly(4)
        command = await reader.readexactly(int.from_bytes(header, "big"))
        seen.append(command)
        writer.write(encode_result(b"pong", b"", 0))
        await writer.drain()

    guest_server = await asyncio.start_unix_server(on_host, path)
    async with (
        guest_server,
        vsock_async.connect(f"unix:{path}", timeout=2, protocol="v1") as channel,
    ):
        assert (await channel.run("ping")).stdout == b"pong"
    assert seen == [b"ping"]
    with pytest.raises(vsock_async.ConnectFailed, match="cannot connect"):
        await vsock_async.connect(f"unix:{tmp_path / 'nobody.sock'}", timeout=1)


@pytest.mark.asyncio
@pytest.mark.parametrize("timeout", [5.0, None])
async def test_cancel_landing_as_a_guest_arrives_is_honoured(
    setup: Setup, timeout: float | None
) -> None:
    """A cancelled accept() ends cancelled, and the guest it would have had waits for the next
    caller (on 3.11 wait_for let the arrival win over the cancel)."""
    loop = asyncio.get_running_loop()
    for hops in range(6):
        cancelled_accept = asyncio.ensure_future(setup.server.accept(timeout=timeout))
        other_accept = asyncio.ensure_future(setup.server.accept(timeout=timeout))
        await asyncio.sleep(0)
        guest = ScriptedGuest()
        await guest.connect(setup.address)
        while not setup.server.channels:  # noqa: ASYNC110 (the connection_made callback)
            await asyncio.sleep(0)

        accepted: list[bool] = []

        def cancel(
            n: int,
            task: asyncio.Future[GuestChannel] = cancelled_accept,
            accepted: list[bool] = accepted,
        ) -> None:
            if n:
                loop.call_soon(cancel, n - 1)
            else:
                accepted.append(task.cancel())

        cancel(hops)
        try:
            channel = await cancelled_accept
        except asyncio.CancelledError:
            assert accepted == [True]
            channel = await other_accept
        else:
            assert accepted in ([], [False]), f"cancel swallowed {hops} iterations in"
            other_accept.cancel()
        assert (await channel.run("exit 6")).exit_code == 6
        await channel.aclose()
        await guest.close()


@pytest.mark.asyncio
async def test_no_time_left_means_nothing_is_sent(setup: Setup) -> None:
    channel, guest = await setup.guest()
    with pytest.raises(CommandTimeout, match="never sent") as info:
        await channel.run("rm -rf /important", timeout=0)
    assert info.value.result.timed_out
    assert not channel.closed
    assert (await channel.run("exit 8")).exit_code == 8
    assert guest.commands == [b"exit 8"]
    await guest.close()


@pytest.mark.asyncio
async def test_probe_answer_with_output_is_never_buffered(setup: Setup) -> None:
    """A guest answering ':' with a huge stdout fails at the prefix, before any byte of it."""

    async def flood(command: bytes) -> Answer:
        return Raw(b"\x03\x00\x00\x00" + b"x" * 100_000)  # 48 MiB announced, within Limits

    channel, guest = await setup.guest(flood)
    with pytest.raises(ProbeFailed, match="answered 50331648 bytes of stdout"):
        await channel.probe(timeout=5)
    assert channel.closed
    await guest.close()


@pytest.mark.asyncio
async def test_run_after_a_probe_gets_the_full_limits_back(setup: Setup) -> None:
    channel, guest = await setup.guest()
    await channel.probe()
    assert len((await channel.run("big 100000")).stdout) == 100_000
    await channel.probe()
    await guest.close()


@pytest.mark.asyncio
async def test_an_empty_answer_after_a_few_kib_keeps_its_exit_code(setup: Setup) -> None:
    """A few KiB of output grow the decoder's scratch; the next empty answer shrinks it back
    and must still carry its own exit code (it once came back 0: run() and probe() passed)."""

    async def probe_fails(command: bytes) -> Answer:
        return (b"", b"", 1) if command == b":" else await echo_handler(command)

    channel, guest = await setup.guest(probe_fails)
    for size in (1500, 3000):
        assert len((await channel.run(f"big {size}")).stdout) == size
        assert (await channel.run("exit 7")).exit_code == 7
        await channel.run(f"big {size}")
        with pytest.raises(CommandFailed):
            await channel.run("exit 3", check=True)
        await channel.run(f"big {size}")
        with pytest.raises(ProbeFailed, match="exit code 1"):
            await channel.probe()
        assert channel.closed  # a failed probe closes its channel
        await guest.close()
        channel, guest = await setup.guest(probe_fails)
    await guest.close()


def test_lone_surrogates_are_a_usage_error() -> None:
    with pytest.raises(UsageError, match="cannot be sent as UTF-8"):
        vsock_async.compose_command("echo \ud800")
    with pytest.raises(UsageError, match="cannot be sent as UTF-8"):
        vsock_async.compose_command("ls", env={"X": "\udfff"})


@pytest.mark.asyncio
async def test_an_earlier_short_deadline_never_cuts_a_later_long_call(setup: Setup) -> None:
    """The channel's one deadline timer stays armed after a quick call; when it fires during a
    later call with a longer deadline, that call must go on."""

    async def slow_on_demand(command: bytes) -> Answer:
        if command == b"slow":
            await asyncio.sleep(0.15)
        return command, b"", 0

    channel, guest = await setup.guest(slow_on_demand)
    assert (await channel.run("quick", timeout=0.05)).stdout == b"quick"
    assert (await channel.run("slow", timeout=5)).stdout == b"slow"
    assert not channel.closed
    await guest.close()


# -- what a channel offers other modules --------------------------------------------------


@pytest.mark.asyncio
async def test_abort_closes_at_once_and_pending_calls_say_we_closed_it(setup: Setup) -> None:
    channel, guest = await setup.guest()
    closed: list[GuestChannel] = []
    channel.add_close_callback(closed.append)
    assert channel.error is None
    pending = asyncio.ensure_future(channel.run("hang", timeout=None))
    queued = asyncio.ensure_future(channel.run("exit 0", timeout=None))
    await asyncio.sleep(0)
    channel.abort("the test is done with it")
    assert channel.closed and isinstance(channel.error, ClosedLocally)
    for call in (pending, queued):
        with pytest.raises(ClosedLocally, match="the test is done with it") as info:
            await call
        assert not isinstance(info.value, PeerError)
    channel.abort("again")  # nothing more happens
    await channel.wait_closed()
    await asyncio.sleep(0)
    assert closed == [channel]
    late: list[GuestChannel] = []
    channel.add_close_callback(late.append)  # already closed: called soon, once
    await asyncio.sleep(0)
    assert late == [channel] and closed == [channel]
    assert str(channel.error) == "the test is done with it"
    await guest.close()


@pytest.mark.asyncio
async def test_byte_counters_count_frames_both_ways(setup: Setup) -> None:
    channel, guest = await setup.guest()
    assert (channel.bytes_sent, channel.bytes_received) == (0, 0)
    await channel.probe()
    await channel.run("uname -a")
    sent = len(encode_command(b":")) + len(encode_command(b"uname -a"))
    received = len(encode_result(b"", b"", 0)) + len(
        encode_result(b"uname -a", b"stderr:uname -a", 3)
    )
    assert (channel.bytes_sent, channel.bytes_received) == (sent, received)
    await guest.close()


@pytest.mark.asyncio
async def test_limits_are_the_servers(setup: Setup) -> None:
    channel, guest = await setup.guest()
    assert channel.limits == Limits(max_stdout=80 << 20, max_stderr=1 << 20)
    await guest.close()


# -- errors say who is at fault -------------------------------------------------------------


async def _aclose(channel: GuestChannel, server: CommandServer) -> None:
    await asyncio.sleep(0.01)
    await channel.aclose()


async def _server_aclose(channel: GuestChannel, server: CommandServer) -> None:
    await asyncio.sleep(0.01)
    await server.aclose()


async def _timeout(channel: GuestChannel, server: CommandServer) -> None:
    with pytest.raises(CommandTimeout):
        await channel.run("hang", timeout=0.01)


async def _cancel(channel: GuestChannel, server: CommandServer) -> None:
    task = asyncio.ensure_future(channel.run("hang", timeout=None))
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _failed_probe(channel: GuestChannel, server: CommandServer) -> None:
    with pytest.raises(ProbeFailed, match="exit code 1"):
        await channel.probe()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "close", [_aclose, _server_aclose, _timeout, _cancel, _failed_probe], ids=lambda f: f.__name__
)
async def test_a_channel_we_closed_raises_closed_locally(
    setup: Setup, close: Callable[[GuestChannel, CommandServer], Awaitable[None]]
) -> None:
    """Whatever closed it on our side, the call waiting behind and every later call get
    ClosedLocally, never a PeerError: the guest did nothing wrong."""

    async def silent_but_probe(command: bytes) -> Answer:
        return (b"", b"", 1) if command == b":" else Silent()

    channel, guest = await setup.guest(silent_but_probe)
    closing = asyncio.ensure_future(close(channel, setup.server))
    await asyncio.sleep(0)  # its call, if any, is on the wire
    waiting = asyncio.ensure_future(channel.run("waiting", timeout=None))
    await closing
    errors: list[BaseException | None] = [channel.error]
    for call in (waiting, channel.run("later")):
        with pytest.raises(ConnectionClosed) as info:
            await call
        errors.append(info.value)
    for error in errors:
        assert isinstance(error, ClosedLocally) and not isinstance(error, PeerError), error
    await guest.close()


@pytest.mark.asyncio
async def test_a_channel_the_guest_closed_raises_connection_lost(setup: Setup) -> None:
    channel, guest = await setup.guest()
    pending = asyncio.ensure_future(channel.run("hang", timeout=None))
    await asyncio.sleep(0.01)
    await guest.close()
    with pytest.raises(ConnectionLost):
        await pending
    await channel.wait_closed()
    assert isinstance(channel.error, ConnectionLost) and isinstance(channel.error, PeerError)
    await channel.aclose()  # closing it again afterwards does not change who closed it
    assert isinstance(channel.error, ConnectionLost)


# -- defects found by the review -------------------------------------------------------------


@pytest.mark.asyncio
async def test_run_colon_is_an_ordinary_command(setup: Setup) -> None:
    """Found: run(":") was taken for a probe (zero output limits) and failed on output."""

    async def chatty_colon(command: bytes) -> Answer:
        return (b"colon says hi", b"and warns", 0) if command == b":" else (b"", b"", 0)

    channel, guest = await setup.guest(chatty_colon)
    result = await channel.run(":", timeout=5)
    assert result == CommandResult(b"colon says hi", b"and warns", 0)
    assert not channel.closed
    with pytest.raises(ProbeFailed):  # the probe itself still allows no output
        await channel.probe(timeout=5)
    await guest.close()


@pytest.mark.asyncio
async def test_a_command_longer_than_max_command_is_refused_before_sending(
    tmp_path: Path,
) -> None:
    """Found: the host sent commands above Limits.max_command; the guest drops them."""
    path = str(tmp_path / "small.sock")
    async with vsock_async.listen(
        f"unix:{path}", limits=Limits(max_command=100), protocol="v1"
    ) as server:
        guest = ScriptedGuest()
        await guest.connect(path)
        channel = await server.accept(timeout=5)
        for timeout in (5.0, 0.0):
            with pytest.raises(UsageError, match=r"101 bytes is longer than Limits\.max_command"):
                await channel.run("x" * 101, timeout=timeout)
        with pytest.raises(UsageError, match="max_command"):
            await channel.run("x" * 90, cwd="/a/longer/directory")  # the composed line counts
        assert not channel.closed and channel.bytes_sent == 0
        assert (await channel.run("x" * 100)).stdout == b"x" * 100
        assert guest.commands == [b"x" * 100]
        await guest.close()


@pytest.mark.asyncio
async def test_truncation_read_from_the_real_agents_v1_answers(tmp_path: Path) -> None:
    """Our agent, cutting output at --max-output, answers v1 with notes at the end of stderr;
    the v1 decoder turns them into stdout_truncated / stderr_truncated."""
    path = short_socket_path(tmp_path, "trunc.sock")
    connected: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await connected.put((reader, writer))

    async def run(command: bytes) -> CommandResult:
        writer.write(encode_command(command))
        decoder = ResultDecoder()
        while (result := decoder.next_event()) is None:
            decoder.receive_data(await reader.read(65536))
        return result

    async with (
        await asyncio.start_unix_server(on_agent, path),
        agent_task(GuestAgent(f"unix:{path}", max_output=300)),
    ):
        reader, writer = await asyncio.wait_for(connected.get(), 10)
        out = await run(b"head -c 1000 /dev/zero | tr '\\0' o; echo fine >&2")
        assert (out.stdout_truncated, out.stderr_truncated) == (True, False)
        assert out.stdout == b"o" * 300 and out.stderr.startswith(b"fine\n")
        err = await run(b"head -c 1000 /dev/zero | tr '\\0' e >&2")
        assert (err.stdout_truncated, err.stderr_truncated) == (False, True)
        assert len(err.stderr) == 300
        both = await run(b"head -c 500 /dev/zero; head -c 500 /dev/zero >&2")
        assert (both.stdout_truncated, both.stderr_truncated) == (True, True)
        whole = await run(b"echo hi; echo there >&2; exit 3")
        assert whole == CommandResult(b"hi\n", b"there\n", 3)
        writer.close()

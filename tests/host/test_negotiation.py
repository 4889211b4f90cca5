"""``protocol=`` of listen() and connect(): the hello on every new connection, against real
v1 shell-loop guests, the real agent, silent guests and hostile answers."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

import vsock_async
from tests.agent_process import LONG, agent_process, eventually, short_socket_path
from tests.guests import Answer, Raw, ScriptedGuest, Silent, shell_handler
from vsock_async import (
    AcceptTimeout,
    CommandServer,
    ConnectTimeout,
    ProtocolError,
    Unsupported,
    UsageError,
)
from vsock_async.host.transport import GuestConnection
from vsock_async.protocol import encode_result
from vsock_async.protocol.v2 import HELLO_PREFIX, AgentLimits, hello_answer, parse_hello_command


async def dialed(server: CommandServer, guest: ScriptedGuest) -> None:
    address = server.sockets[0].getsockname()
    await guest.connect(address)


async def guest_listening(path: str, guest: ScriptedGuest) -> asyncio.Server:
    """A v1 guest that waits for the host to dial it (``connect()``'s counterpart)."""

    async def on_host(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        guest.writer = writer
        await guest._serve(reader, writer)

    return await asyncio.start_unix_server(on_host, path)


async def silent(command: bytes) -> Answer:
    """A guest that never answers."""
    return Silent()


def hung_up(guest: ScriptedGuest) -> Callable[[], bool]:
    """A check that the connection of ``guest`` (dialed or listening) has been closed."""
    return lambda: (
        (guest.task is not None and guest.task.done())
        or (guest.task is None and guest.writer is not None and guest.writer.is_closing())
    )


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.asyncio
async def test_auto_settles_on_v1_with_a_shell_loop_guest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hello is run by a real /bin/sh as a no-op: exit 0, no output, so v1, silently."""
    guest = ScriptedGuest(shell_handler, handle_hello=True)
    async with vsock_async.listen(f"unix:{tmp_path}/g.sock") as server:
        await dialed(server, guest)
        channel = await server.accept(timeout=LONG)
        assert channel.protocol == "v1" and channel.agent is None
        assert (await channel.run("echo $((1+2))")).stdout == b"3\n"
        await channel.probe()
        with pytest.raises(Unsupported):
            await channel.create_process(["true"])
        (hello, *rest) = guest.commands
        assert hello.startswith(HELLO_PREFIX) and rest == [b"echo $((1+2))", b":"]
    assert warnings(caplog) == []
    await guest.close()


@pytest.mark.asyncio
async def test_v1_never_sends_the_hello(tmp_path: Path) -> None:
    guest = ScriptedGuest(shell_handler, handle_hello=True)
    async with vsock_async.listen(f"unix:{tmp_path}/g.sock", protocol="v1") as server:
        await dialed(server, guest)
        channel = await server.accept(timeout=LONG)
        assert (await channel.run("echo one")).stdout == b"one\n"
        assert guest.commands == [b"echo one"]
        assert channel.bytes_sent == 4 + len(b"echo one")
    await guest.close()


@pytest.mark.asyncio
async def test_v2_refuses_a_v1_guest_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    guest = ScriptedGuest(shell_handler, handle_hello=True)
    async with vsock_async.listen(f"unix:{tmp_path}/g.sock", protocol="v2") as server:
        await dialed(server, guest)
        await eventually(hung_up(guest), "guest closed")
        with pytest.raises(AcceptTimeout):
            await server.accept(timeout=0.01)
        assert server.channels == [] and server.guests == []
    assert any("speaks only v1" in line for line in warnings(caplog))
    await guest.close()


@pytest.mark.asyncio
async def test_connect_negotiates_and_v2_requires_it(tmp_path: Path) -> None:
    path = short_socket_path(tmp_path, "v1g.sock")
    guest = ScriptedGuest(shell_handler, handle_hello=True)
    async with await guest_listening(path, guest):
        async with vsock_async.connect(f"unix:{path}", timeout=LONG) as channel:
            assert channel.protocol == "v1"
            assert (await channel.run("echo hi")).stdout == b"hi\n"
        with pytest.raises(ProtocolError, match=r"speaks only v1.*protocol='auto'"):
            await vsock_async.connect(f"unix:{path}", timeout=LONG, protocol="v2")


@pytest.mark.asyncio
async def test_connect_to_the_real_agent_gets_v2(tmp_path: Path) -> None:
    path = short_socket_path(tmp_path, "agent.sock")
    async with agent_process("--listen", f"unix:{path}", tmp_path=tmp_path):
        await eventually(lambda: Path(path).exists(), "the agent listens")
        channel = None
        for _ in range(100):  # the socket file appears at bind(), before listen()
            try:
                channel = await vsock_async.connect(f"unix:{path}", timeout=LONG, protocol="v2")
                break
            except vsock_async.ConnectFailed:
                await asyncio.sleep(0.02)
        assert channel is not None
        async with channel:
            assert channel.protocol == "v2"
            proc = await channel.create_process(["echo", "dialed"])
            assert await proc.communicate() == (b"dialed\n", b"")


@pytest.mark.asyncio
async def test_a_v2_guest_keeps_no_v1_connection_object(tmp_path: Path) -> None:
    """Once a connection is a v2 session, its v1 object (core, decoder, scratch) is freed;
    were anyone still holding it, it would still hear of the connection's end."""
    path = short_socket_path(tmp_path, "v2.sock")
    async with (
        vsock_async.listen(f"unix:{path}", label="g") as server,
        agent_process("--connect", f"unix:{path}", "--connections", "3", tmp_path=tmp_path),
    ):
        guest = await server.wait_for_guest("g", timeout=LONG)
        await eventually(lambda: guest.connection_count == 3, "three connections")
        assert {channel.protocol for channel in guest.channels} == {"v2"}
        gc.collect()
        assert [o for o in gc.get_objects() if isinstance(o, GuestConnection)] == []
        assert (await guest.run("echo still here", timeout=LONG)).stdout == b"still here\n"


@pytest.mark.asyncio
async def test_a_guest_silent_at_the_hello_is_closed_and_counts_against_the_cap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with vsock_async.listen(
        f"unix:{tmp_path}/g.sock",
        label="g",
        max_connections_per_guest=1,
        negotiate_timeout=0.2,
    ) as server:
        hushed = ScriptedGuest(silent, handle_hello=True)
        await dialed(server, hushed)
        await eventually(lambda: bool(hushed.commands), "the hello reached the guest")
        second = ScriptedGuest()
        await dialed(server, second)  # refused: the first one still holds the only place
        await eventually(hung_up(second), "refused")
        await eventually(hung_up(hushed), "timed out")
        assert server.channels == []
        third = ScriptedGuest()  # the place is free again
        await dialed(server, third)
        channel = await server.accept(timeout=LONG)
        assert channel.protocol == "v1"
        await third.close()
    lines = warnings(caplog)
    assert any("holds 1 connections already" in line for line in lines)
    assert any("did not answer the protocol hello" in line for line in lines)
    await hushed.close()
    await second.close()


async def v2_answer(command: bytes) -> Answer:
    """What a v2 agent answers to the hello (and to nothing else: no other command comes)."""
    request = parse_hello_command(command)
    assert request is not None
    return hello_answer(request, AgentLimits(), ["exec", "ping"], "test/0") or b"", b"", 0


@pytest.mark.asyncio
@pytest.mark.parametrize("turns", range(10))
async def test_aclose_ends_even_as_a_hello_answer_is_taken_in(tmp_path: Path, turns: int) -> None:
    """aclose() at every loop turn after a v2 answer was sent: between the host switching
    the socket to v2 and admitting the connection, it still finishes and lets nothing in."""
    answered: asyncio.Event = asyncio.Event()

    async def answer(command: bytes) -> Answer:
        answered.set()
        return await v2_answer(command)

    guest = ScriptedGuest(answer, handle_hello=True)
    server = await vsock_async.listen(f"unix:{tmp_path}/g.sock", label="g")
    await dialed(server, guest)
    await answered.wait()
    for _ in range(turns):
        await asyncio.sleep(0)
    async with asyncio.timeout(LONG):  # only a hang gets near it
        await server.aclose()
    assert server.channels == [] and server.guests == []
    await eventually(hung_up(guest), "the guest's connection closed")
    await guest.close()


@pytest.mark.asyncio
async def test_connect_timeout_covers_the_hello(tmp_path: Path) -> None:
    path = short_socket_path(tmp_path, "mute.sock")
    guest = ScriptedGuest(silent, handle_hello=True)
    async with await guest_listening(path, guest):
        with pytest.raises(ConnectTimeout, match="protocol hello"):
            await vsock_async.connect(f"unix:{path}", timeout=0.05)
        task = asyncio.ensure_future(vsock_async.connect(f"unix:{path}", timeout=None))
        await eventually(lambda: len(guest.commands) == 2, "the second hello arrived")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(hung_up(guest), "closed")


HOSTILE: dict[str, Answer] = {
    "wrong nonce": (b'vsock_async.hello {"version":2,"nonce":"0000000000000000"}\n', b"", 0),
    "garbage": (b"vsock_async.hello \xff\xfe{{{\n", b"", 0),
    "oversized": (b"x" * (200 * 1024), b"", 0),
    "stderr": (b"", b"sh: vsock_async.hello: not found\n", 0),
    "failing exit": (b"", b"", 127),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_a_broken_hello_answer_stays_v1_on_auto_and_fails_v2(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    async def answer(command: bytes) -> Answer:
        if command.startswith(HELLO_PREFIX):
            return HOSTILE[case]
        return b"ok", b"", 0

    for protocol in ("auto", "v2"):
        guest = ScriptedGuest(answer, handle_hello=True)
        async with vsock_async.listen(f"unix:{tmp_path}/{protocol}.sock", protocol=protocol) as srv:
            await dialed(srv, guest)
            if protocol == "auto":
                channel = await srv.accept(timeout=LONG)
                assert channel.protocol == "v1"
                assert (await channel.run("after")).stdout == b"ok"  # the stream is in step
            else:
                await eventually(hung_up(guest), "closed")
                assert srv.channels == []
        await guest.close()
    assert len(warnings(caplog)) >= 2


@pytest.mark.asyncio
async def test_a_hello_answer_above_the_host_limits_closes_the_connection(tmp_path: Path) -> None:
    async def answer(command: bytes) -> Answer:
        return Raw(encode_result(b"y" * 5000, b"", 0))

    guest = ScriptedGuest(answer, handle_hello=True)
    limits = vsock_async.Limits(max_stdout=1000)
    async with vsock_async.listen(f"unix:{tmp_path}/l.sock", limits=limits) as server:
        await dialed(server, guest)
        await eventually(hung_up(guest), "closed")
        assert server.channels == []
    await guest.close()


@pytest.mark.asyncio
async def test_protocol_must_be_one_of_three(tmp_path: Path) -> None:
    for bad in ("v3", "V2", None, 2):
        with pytest.raises(UsageError, match="protocol must be"):
            await vsock_async.listen(f"unix:{tmp_path}/b.sock", protocol=bad)  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="protocol must be"):
            CommandServer(protocol=bad)  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="protocol must be"):
            await vsock_async.connect(f"unix:{tmp_path}/none.sock", protocol=bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="negotiate_timeout"):
        CommandServer(negotiate_timeout=-1)

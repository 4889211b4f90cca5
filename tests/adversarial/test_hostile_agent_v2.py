"""A hostile v2 agent against the host library: it negotiates v2 properly, then breaks the
protocol. The host must close that connection with a ProtocolError for everyone waiting on
it, allocate nothing a length prefix asks for, and keep serving its other guests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

import vsock_async
from tests.agent_process import LONG, served_agent
from vsock_async import CommandServer, ConnectionClosed, ProtocolError
from vsock_async.protocol import CommandDecoder, encode_result
from vsock_async.protocol.v2 import (
    AgentLimits,
    Channel,
    FrameType,
    encode_frame,
    encode_json,
    hello_answer,
    parse_hello_command,
)
from vsock_async.protocol.v2_frames import FLAG_END, HEADER, encode_window

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """One whole v2 frame from the host: (stream, type, payload)."""
    length, stream, type_, _ = HEADER.unpack(await reader.readexactly(HEADER.size))
    return stream, type_, await reader.readexactly(length)


async def exec_stream(reader: asyncio.StreamReader) -> int:
    """Wait for the host's EXEC; its stream id."""
    while True:
        stream, type_, _ = await read_frame(reader)
        if type_ == FrameType.EXEC:
            return stream


class HostileAgent:
    """Dials the server, answers the hello as a v2 agent, then runs ``script``."""

    def __init__(
        self,
        script: Script,
        capabilities: frozenset[str] = frozenset({"exec", "signal", "ping"}),
        limits: AgentLimits | None = None,
    ) -> None:
        self.script = script
        self.capabilities = capabilities
        self.limits = limits or AgentLimits()
        self.task: asyncio.Task[None] | None = None

    async def start(self, path: str) -> None:
        reader, writer = await asyncio.open_unix_connection(path)
        self.task = asyncio.create_task(self._run(reader, writer))

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            decoder = CommandDecoder()
            while (event := decoder.next_event()) is None:
                decoder.receive_data(await reader.read(4096))
            request = parse_hello_command(event.command)  # type: ignore[union-attr]
            assert request is not None
            answer = hello_answer(request, self.limits, self.capabilities, "hostile-test-agent")
            assert answer is not None
            writer.write(encode_result(answer, b"", 0))
            await self.script(reader, writer)
            await reader.read()  # until the host closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def huge_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    stream = await exec_stream(reader)
    writer.write(encode_json(stream, FrameType.STARTED, {"pid": 4242}))
    writer.write(HEADER.pack(0xFFFF_FFF0, stream, FrameType.STDOUT, 0))  # 4 GiB announced


async def beyond_credit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    stream = await exec_stream(reader)
    writer.write(encode_json(stream, FrameType.STARTED, {"pid": 4242}))
    chunk = b"x" * 65536
    for _ in range(16):  # 1 MiB against the host's window of 256 KiB
        writer.write(encode_frame(stream, FrameType.STDOUT, 0, chunk))


async def garbage_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    stream = await exec_stream(reader)
    writer.write(encode_frame(stream, FrameType.STARTED, 0, b"{not json"))


async def window_for_the_wrong_way(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    stream = await exec_stream(reader)
    writer.write(encode_json(stream, FrameType.STARTED, {"pid": 4242}))
    writer.write(encode_window(stream, Channel.STDOUT, 1 << 20))  # that credit flows to us


SCRIPTS: dict[str, Script] = {
    "huge length": huge_length,
    "beyond credit": beyond_credit,
    "garbage json": garbage_json,
    "window the wrong way": window_for_the_wrong_way,
}


async def started_and_waited(channel: vsock_async.GuestChannel) -> None:
    """A process on ``channel`` whose output nobody reads, waited for."""
    async with asyncio.timeout(LONG):
        proc = await channel.create_process(["anything"])
        await proc.wait()


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[CommandServer]:
    async with vsock_async.listen(f"unix:{tmp_path}/h.sock", label="bad") as srv:
        await srv.add_listener(f"unix:{tmp_path}/g.sock", label="good")
        yield srv


@pytest.mark.asyncio
@pytest.mark.parametrize("case", sorted(SCRIPTS))
async def test_a_protocol_break_closes_only_that_connection(
    server: CommandServer, tmp_path: Path, case: str
) -> None:
    hostile = HostileAgent(SCRIPTS[case])
    await hostile.start(f"{tmp_path}/h.sock")
    try:
        channel = await server.accept(timeout=LONG)
        assert channel.protocol == "v2"
        with pytest.raises((ProtocolError, ConnectionClosed)):
            await started_and_waited(channel)
        assert channel.closed and isinstance(channel.error, ProtocolError)
        with pytest.raises(ProtocolError):
            await channel.run("true")
    finally:
        await hostile.close()


@pytest.mark.asyncio
async def test_a_hostile_agent_does_not_slow_a_good_one(tmp_path: Path) -> None:
    async with served_agent(tmp_path, "good.sock") as good:
        await good.server.add_listener(f"unix:{tmp_path}/h.sock", label="bad")
        hostile = HostileAgent(beyond_credit)
        await hostile.start(f"{tmp_path}/h.sock")
        try:
            bad = await good.server.accept(timeout=LONG)
            failing = asyncio.ensure_future(started_and_waited(bad))
            for i in range(20):
                result = await good.guest.run(f"echo {i}", timeout=LONG)
                assert result.stdout == f"{i}\n".encode()
            with pytest.raises(ProtocolError):
                await failing
        finally:
            await hostile.close()


@pytest.mark.asyncio
async def test_a_frame_for_a_stream_never_opened_is_answered_and_the_connection_lives(
    server: CommandServer, tmp_path: Path
) -> None:
    answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = await exec_stream(reader)
        writer.write(encode_json(999, FrameType.EXIT, {"exit_code": 0}))
        while True:
            to, type_, payload = await read_frame(reader)
            if to == 999 and type_ == FrameType.ERROR:
                answered.set_result(payload)
                break
        writer.write(encode_json(stream, FrameType.STARTED, {"pid": 4242}))
        writer.write(encode_frame(stream, FrameType.STDOUT, FLAG_END, b"done"))
        writer.write(encode_frame(stream, FrameType.STDERR, FLAG_END))
        writer.write(encode_json(stream, FrameType.EXIT, {"exit_code": 3}))

    hostile = HostileAgent(script)
    await hostile.start(f"{tmp_path}/h.sock")
    try:
        channel = await server.accept(timeout=LONG)
        result = await channel.run("anything", timeout=LONG)
        assert (result.stdout, result.exit_code) == (b"done", 3)
        assert b"unknown_stream" in await answered
        assert not channel.closed
    finally:
        await hostile.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "frame",
    [encode_frame(0, FrameType.PING, 0, b"p" * 64), encode_frame(3, 0x7F, 0, b"")],
    ids=["ping", "unknown type"],
)
async def test_an_agent_that_asks_for_answers_and_never_reads_them_is_read_no_more(
    server: CommandServer, tmp_path: Path, frame: bytes
) -> None:
    """PINGs (PONG) and frames of unknown types (ERROR) want answers: sent without end by a
    guest that never reads, they would pile up in the host's memory. The host stops reading
    that guest until it reads again, and then answers every one."""
    stalled: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    read_again = asyncio.Event()
    answers: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    chunk = frame * 1000

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = 0
        while sent < 32 << 20:
            writer.write(chunk)
            try:
                async with asyncio.timeout(0.5):  # a host that reads never gets near it
                    await writer.drain()
            except TimeoutError:
                break
            sent += len(chunk)
        stalled.set_result(sent)
        await read_again.wait()
        frames = (sent + len(chunk)) // len(frame)
        for _ in range(frames):
            await read_frame(reader)
        answers.set_result(frames)

    hostile = HostileAgent(flood)
    await hostile.start(f"{tmp_path}/h.sock")
    try:
        channel = await server.accept(timeout=LONG)
        assert channel.protocol == "v2"
        async with asyncio.timeout(LONG):
            sent = await stalled
        transport = channel.connection.transport
        assert transport is not None
        assert sent < 16 << 20, "the host kept reading"
        assert transport.get_write_buffer_size() < 4 << 20
        assert not channel.closed
        read_again.set()
        async with asyncio.timeout(LONG):
            await answers  # every request was answered once the guest read again
        assert not channel.closed
    finally:
        await hostile.close()


async def read_exec(reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
    """The host's next EXEC: its stream and request."""
    while True:
        stream, type_, payload = await read_frame(reader)
        if type_ == FrameType.EXEC:
            return stream, json.loads(payload)


def answer_exec(writer: asyncio.StreamWriter, stream: int, stdout: bytes, exit_code: int) -> None:
    """A started process that wrote ``stdout`` and exited: output, END, END, EXIT."""
    writer.write(encode_frame(stream, FrameType.STDOUT, FLAG_END, stdout))
    writer.write(encode_frame(stream, FrameType.STDERR, FLAG_END))
    writer.write(encode_json(stream, FrameType.EXIT, {"exit_code": exit_code}))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("stdout", "exit_code", "ok"), [(b"", 0, True), (b"", 1, False), (b"hi", 0, False)]
)
async def test_an_agent_without_ping_is_probed_with_a_process(
    server: CommandServer, tmp_path: Path, stdout: bytes, exit_code: int, ok: bool
) -> None:
    requests: list[dict[str, object]] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream, request = await read_exec(reader)
        requests.append(request)
        writer.write(encode_json(stream, FrameType.STARTED, {"pid": 4242}))
        answer_exec(writer, stream, stdout, exit_code)

    agent = HostileAgent(script, capabilities=frozenset({"exec"}))
    await agent.start(f"{tmp_path}/h.sock")
    try:
        channel = await server.accept(timeout=LONG)
        if ok:
            await channel.probe(timeout=LONG)
            assert channel.last_probe is not None and not channel.closed
        else:
            with pytest.raises(vsock_async.ProbeFailed):
                await channel.probe(timeout=LONG)
            assert channel.closed
        assert requests[0]["command"] == ":"
    finally:
        await agent.close()


@pytest.mark.asyncio
async def test_run_keeps_a_command_within_the_agents_max_argv_bytes(
    server: CommandServer, tmp_path: Path
) -> None:
    """An agent announcing max_argv_bytes=100 gets a 200-byte command on stdin, not in EXEC."""
    requests: list[dict[str, object]] = []
    stdin = bytearray()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream, request = await read_exec(reader)
        requests.append(request)
        writer.write(encode_json(stream, FrameType.STARTED, {"pid": 4242}))
        while True:
            to, type_, payload = await read_frame(reader)
            if to == stream and type_ == FrameType.STDIN:
                stdin.extend(payload)
                if payload == b"" or len(stdin) >= 200:
                    break
        answer_exec(writer, stream, b"ran", 0)

    agent = HostileAgent(script, limits=AgentLimits(max_argv_bytes=100))
    await agent.start(f"{tmp_path}/h.sock")
    try:
        channel = await server.accept(timeout=LONG)
        command = "echo " + "x" * 195
        result = await channel.run(command, timeout=LONG)
        assert result.stdout == b"ran"
        assert requests[0]["stdin"] is True and requests[0]["command"] != command
        assert bytes(stdin) == command.encode()
    finally:
        await agent.close()

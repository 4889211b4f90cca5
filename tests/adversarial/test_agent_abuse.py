"""The real agent, as a process, under abuse: floods, background processes, churn, half commands.

The rules tested are the ones docs/agent.md states: output capped at
``--max-output``; the exchange ends when the shell exits, and processes that
keep stdout/stderr open get ``--output-grace`` before their group is killed;
the host going away kills the command's process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.agent_process import agent_process, alive, children_of, eventually
from vsock_async import CommandServer, CommandTimeout, GuestChannel, listen
from vsock_async.protocol import encode_command

from .conftest import Scale

CAP = 100_000


class Agent:
    """An agent process dialled into our server, and the channel it opened."""

    def __init__(
        self, proc: asyncio.subprocess.Process, channel: GuestChannel, server: CommandServer
    ):
        self.proc = proc
        self.channel = channel
        self.server = server

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    async def reconnected(self) -> GuestChannel:
        """The channel of the agent's next connection (it redials after a drop)."""
        self.channel = await self.server.accept(timeout=10)
        return self.channel


@pytest_asyncio.fixture
async def agent(socket_dir: str, tmp_path: Path) -> AsyncIterator[Agent]:
    path = f"{socket_dir}/host.sock"
    async with (
        await listen(f"unix:{path}", default_timeout=10, protocol="v1") as server,
        agent_process(
            "--connect",
            f"unix:{path}",
            "--max-output",
            str(CAP),
            "--output-grace",
            "0.2",
            "--max-command",
            "1000",
            tmp_path=tmp_path,
        ) as proc,
    ):
        channel = await server.accept(timeout=10)
        await channel.probe()
        yield Agent(proc, channel, server)


@pytest.mark.asyncio
async def test_output_flood_is_capped(agent: Agent) -> None:
    result = await agent.channel.run("head -c 5000000 /dev/zero; head -c 3000000 /dev/zero >&2")
    assert result.exit_code == 0
    assert result.stdout == b"\0" * CAP
    assert len(result.stderr) <= CAP and b"--max-output" in result.stderr


@pytest.mark.asyncio
async def test_endless_flood_ends_with_the_host_deadline(agent: Agent) -> None:
    """``yes`` never stops: the host's deadline closes the channel and the agent kills it."""
    with pytest.raises(CommandTimeout):
        await agent.channel.run("yes", timeout=0.3)
    channel = await agent.reconnected()
    await eventually(lambda: not children_of(agent.pid), "the flooding command is reaped")
    assert (await channel.run("echo alive")).stdout == b"alive\n"


@pytest.mark.asyncio
async def test_background_process_holding_output_gets_the_grace_then_is_killed(
    agent: Agent, tmp_path: Path
) -> None:
    pidfile = tmp_path / "bg.pid"
    result = await agent.channel.run(f"sleep 60 & echo $! > {pidfile}; echo started", timeout=10)
    assert result.exit_code == 0 and result.stdout == b"started\n"
    assert b"process group was killed" in result.stderr
    await eventually(lambda: not alive(int(pidfile.read_text())), "the background sleep dies")


@pytest.mark.asyncio
async def test_background_process_with_detached_output_is_answered_at_once(
    agent: Agent,
) -> None:
    result = await agent.channel.run("sleep 60 >/dev/null 2>&1 & echo $!", timeout=10)
    pid = int(result.stdout)
    try:
        assert result.exit_code == 0 and b"killed" not in result.stderr
        assert alive(pid)  # documented: a detached process keeps running
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


@pytest.mark.asyncio
async def test_many_short_commands_leave_no_zombies_and_no_descriptors(
    agent: Agent, scale: Scale
) -> None:
    await agent.channel.run("true")
    fds_before = agent.fds()
    for n in range(scale.agent_commands):
        result = await agent.channel.run(f"echo {n}; echo e{n} >&2; exit {n % 7}")
        assert (result.stdout, result.stderr, result.exit_code) == (
            f"{n}\n".encode(),
            f"e{n}\n".encode(),
            n % 7,
        )
    await eventually(lambda: not children_of(agent.pid), "every shell is reaped")
    assert agent.fds() == fds_before


@pytest.mark.asyncio
async def test_host_gone_mid_command_kills_the_group(agent: Agent, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    with pytest.raises(CommandTimeout):
        await agent.channel.run(f"sleep 60 & echo $! > {pidfile}; sleep 60", timeout=0.3)
    await eventually(pidfile.exists, "the command started")
    await eventually(lambda: not alive(int(pidfile.read_text())), "the group is killed")
    channel = await agent.reconnected()
    await eventually(lambda: not children_of(agent.pid), "the shell is reaped")
    assert (await channel.run("echo alive")).stdout == b"alive\n"


@pytest.mark.asyncio
async def test_agent_runs_nothing_it_was_not_sent_whole(agent: Agent, tmp_path: Path) -> None:
    """An oversized command, one with a NUL, and a half-sent one: none of them runs."""
    marker = tmp_path / "ran"
    touch = f"touch {marker}; "
    result = await agent.channel.run(touch + "#" * 2000)  # over --max-command 1000
    assert result.exit_code == 126
    result = await agent.channel.run(touch.encode() + b"\0")
    assert result.exit_code == 126
    assert not marker.exists()

    # Half a command frame, then the host goes away: the agent must not run the half.
    frame = encode_command(touch.encode() + b"echo never")
    transport = agent.channel.connection.transport
    assert transport is not None
    transport.write(frame[: len(frame) // 2])
    await agent.channel.aclose()
    channel = await agent.reconnected()
    assert (await channel.run("echo alive")).stdout == b"alive\n"
    assert not marker.exists()


@pytest.mark.asyncio
async def test_agent_survives_a_host_that_never_reads(agent: Agent) -> None:
    """The host asks for output and stops reading, then gives up: the agent recovers."""
    run = asyncio.create_task(agent.channel.run(f"head -c {CAP} /dev/zero", timeout=None))
    agent.channel.connection.transport.pause_reading()  # type: ignore[union-attr]
    await asyncio.sleep(0.2)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    channel = await agent.reconnected()
    assert (await channel.run("echo alive")).stdout == b"alive\n"
    await eventually(lambda: not children_of(agent.pid), "nothing left running")

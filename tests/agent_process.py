"""Helpers for tests that run the guest agent: as a child process or a task, and what is left
of the processes it started (from /proc)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import pytest

import vsock_async
from vsock_async.agent import GuestAgent
from vsock_async.host.negotiate import ProtocolChoice

LONG = 20.0
STARTS_WITHIN = 1.0
"""A process time limit long enough for the process to start first even on a loaded machine:
create_process()'s and exec's timeout covers the start too, so a test of a process that runs
into its limit gives it this much, not milliseconds."""

IGNORING_LAUNCHER = (
    sys.executable,
    "-c",
    "import os, signal, sys\n"
    "os.setsid()\n"
    "for name in ('SIGINT', 'SIGQUIT', 'SIGHUP', 'SIGTSTP', 'SIGTTIN', 'SIGTTOU'):\n"
    "    signal.signal(getattr(signal, name), signal.SIG_IGN)\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n",
)
"""A prefix to an argv that runs it as hostile launchers leave a service: SIGINT and SIGQUIT
ignored (a non-interactive shell's ``&``), SIGHUP (``nohup``) and the job-control signals
ignored, SIGUSR1 and SIGUSR2 blocked; in a session of its own, with no controlling terminal."""


@contextlib.asynccontextmanager
async def agent_process(
    *args: str,
    tmp_path: Path,
    cwd: Path | None = None,
    python: tuple[str, ...] = (),
    launcher: tuple[str, ...] = (),
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m vsock_async agent ARGS`` as a child process (through ``launcher``, an argv
    prefix such as :data:`IGNORING_LAUNCHER`), terminated and reaped at the end."""
    log = open(tmp_path / "agent.log", "ab")  # noqa: SIM115 - closed below
    proc = await asyncio.create_subprocess_exec(
        *launcher,
        sys.executable,
        *python,
        "-m",
        "vsock_async",
        "agent",
        "--log-level",
        "debug",
        *args,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        cwd=cwd,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        log.close()


BUILD_SCRIPT = Path(vsock_async.__file__).parent.parent / "scripts" / "build-single-file-agent.py"


def build_single_file(tmp_path: Path) -> Path:
    """The generated one-file agent, written to ``tmp_path``."""
    single = tmp_path / "vsock-async-agent.py"
    subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), str(single)], check=True, capture_output=True
    )
    return single


@contextlib.asynccontextmanager
async def single_file_agent(
    *args: str, tmp_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """The generated one-file agent, with no site-packages and no package on sys.path."""
    single = build_single_file(tmp_path)
    with open(tmp_path / "agent.log", "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-S", "-E", str(single), *args, stdout=log, stderr=log, cwd=tmp_path
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


class Served(NamedTuple):
    """A server, the agent process dialing it, and the connection the server accepted."""

    server: vsock_async.CommandServer
    guest: vsock_async.GuestChannel
    agent: asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def served_agent(
    tmp_path: Path,
    name: str,
    *options: str,
    limits: vsock_async.Limits | None = None,
    cwd: Path | None = None,
    python: tuple[str, ...] = (),
    protocol: ProtocolChoice = "auto",
    launcher: tuple[str, ...] = (),
) -> AsyncIterator[Served]:
    """A server on Unix socket ``name`` and ``python -m vsock_async agent --connect`` to it
    with ``options``, once the server has accepted the agent's first connection (on v2 with
    the default ``protocol``; ``"v1"`` for what the agent does on v1)."""
    path = short_socket_path(tmp_path, name)
    async with (
        vsock_async.listen(f"unix:{path}", limits=limits, protocol=protocol) as server,
        agent_process(
            "--connect",
            f"unix:{path}",
            *options,
            tmp_path=tmp_path,
            cwd=cwd,
            python=python,
            launcher=launcher,
        ) as agent,
    ):
        yield Served(server, await server.accept(timeout=LONG), agent)


@contextlib.asynccontextmanager
async def agent_task(agent: GuestAgent) -> AsyncIterator[GuestAgent]:
    """Run a GuestAgent in this event loop for the duration of the block."""
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.stop()
        await asyncio.wait_for(task, LONG)


async def queued(served: Served, count: int) -> None:
    """Until ``count`` calls wait: in the guest's queue, or for its connection's stream."""
    guest = served.server.guests[0]
    await eventually(lambda: guest.waiting + served.guest.queued == count, f"{count} waiting")


def children_of(pid: int) -> set[int]:
    """Live and zombie children of ``pid``, from /proc."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found.update(int(c) for c in (task / "children").read_text().split())
    return found


def live_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies.

    Orphans killed with their group become children of init, whose reaping is
    none of the agent's business (in containers it can take seconds or never happen).
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


async def eventually(predicate: object, what: str, limit: float = LONG) -> None:
    """Poll ``predicate()`` until true; fail with ``what`` if it never becomes true."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.02)


def short_socket_path(tmp_path: Path, name: str) -> str:
    """A Unix socket path short enough for sun_path (pytest's tmp_path can be long)."""
    path = tmp_path / name
    if len(str(path)) < 100:
        return str(path)
    return f"/tmp/vsa-{os.getpid()}-{name}"

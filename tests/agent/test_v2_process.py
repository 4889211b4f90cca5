"""One v2 process stream in the agent, with real processes, driven through a recording link.

The link stands in for the connection (credit, sending, the exit report), which is
what ``tests/agent/test_v2_agent.py`` tests over real sockets; here the subject is
the process: credit-driven reads, the output grace, timeouts, stdin, kills and reaping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.agent_process import LONG, alive, eventually, live_members
from vsock_async.agent.process import STDERR, STDOUT, Process
from vsock_async.agent.request import Refused, parse_exec


class Link:
    """Records what a process sends; credit is set by the test."""

    def __init__(self, credit: int = 1 << 30) -> None:
        self.credit_left = {STDOUT: credit, STDERR: credit}
        self.sent: list[tuple[int, bytes, bool]] = []
        self.stdin_returned = 0
        self.exit: tuple[Any, ...] | None = None
        self.process: Process | None = None
        self.splices = True
        self.spliced = 0

    def credit(self, channel: int) -> int:
        return self.credit_left[channel]

    def send_output(self, channel: int, data: bytes, end: bool) -> None:
        assert len(data) <= self.credit_left[channel], "sent beyond the credit"
        assert self.exit is None
        self.credit_left[channel] -= len(data)
        self.sent.append((channel, data, end))

    def splice_output(self, channel: int, fd: int, n: int) -> bool:
        """Takes the bytes as a connection's splice would (here: read, to record them)."""
        if not self.splices:
            return False
        data = os.read(fd, n)
        assert len(data) == n, "the process asked for bytes the pipe did not hold"
        self.spliced += 1
        self.send_output(channel, data, False)
        return True

    def stdin_consumed(self, n: int) -> None:
        self.stdin_returned += n

    def exited(self, *report: Any) -> None:
        assert self.exit is None
        self.exit = report

    def grant(self, channel: int, n: int) -> None:
        self.credit_left[channel] += n
        assert self.process is not None
        self.process.credit_changed()

    def output(self, channel: int = STDOUT) -> bytes:
        return b"".join(data for ch, data, _ in self.sent if ch == channel)

    def ended(self, channel: int) -> bool:
        return any(end for ch, _, end in self.sent if ch == channel)


@contextlib.asynccontextmanager
async def started(
    request: dict[str, Any], link: Link, grace: float = 1.0
) -> AsyncIterator[tuple[Process, asyncio.Task[None]]]:
    spec = parse_exec(request, max_argv_bytes=1 << 20, can_switch_user=True, can_pty=True)
    process = Process(spec, link, shell="/bin/sh", output_grace=grace, max_read=1 << 20)
    link.process = process
    task = asyncio.create_task(process.run())
    try:
        yield process, task
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_output_streams_before_exit_and_stdin_reaches_eof() -> None:
    link = Link()
    async with started({"command": "echo first; cat; echo last >&2", "stdin": True}, link) as (
        process,
        task,
    ):
        await eventually(lambda: link.output() == b"first\n", "the first line before the exit")
        assert not task.done()
        process.write_stdin(b"typed", False)
        await eventually(lambda: link.output() == b"first\ntyped", "stdin echoed by cat")
        process.write_stdin(b"", True)
        await asyncio.wait_for(task, LONG)
    assert link.exit == (0, None, False, False)
    assert link.output(STDERR) == b"last\n"
    assert link.stdin_returned == 5
    assert link.ended(STDOUT) and link.ended(STDERR)
    assert link.sent[-1][2] and link.sent[-2][2], "END on both channels are the last frames"


@pytest.mark.asyncio
async def test_no_credit_no_read_then_every_byte_within_credit() -> None:
    size = 1_000_000
    link = Link(credit=0)
    async with started({"command": f"head -c {size} /dev/zero; echo done >&2"}, link) as (
        _,
        task,
    ):
        await eventually(lambda: link.ended(STDERR) or link.credit_left[STDERR] == 0, "stderr")
        link.grant(STDERR, 100)
        await asyncio.sleep(0.2)  # the writer is blocked on a full pipe: nothing can move
        assert link.output() == b""
        assert not task.done()
        while not task.done():
            link.grant(STDOUT, 70_000)
            await asyncio.sleep(0.01)
    assert link.output() == bytes(size)
    assert link.output(STDERR) == b"done\n"
    assert link.exit == (0, None, False, False)


@pytest.mark.asyncio
async def test_output_grace_waits_while_the_host_grants_no_credit() -> None:
    # The process exits at once, leaving 200 kB in pipes the host is slow to read: the grace
    # (50 ms) must not cut them, because the agent could not read while it had no credit.
    link = Link(credit=1000)
    async with started({"command": "head -c 200000 /dev/zero"}, link, grace=0.05) as (_, task):
        await eventually(lambda: link.credit_left[STDOUT] == 0, "the first 1000 bytes")
        await asyncio.sleep(0.3)
        link.grant(STDOUT, 1 << 20)
        await asyncio.wait_for(task, LONG)
    assert link.output() == bytes(200000)
    assert link.exit == (0, None, False, False)


@pytest.mark.asyncio
async def test_background_child_holding_stdout_is_killed_after_the_grace() -> None:
    link = Link()
    async with started({"command": "sleep 30 & echo $!"}, link, grace=0.1) as (process, task):
        await asyncio.wait_for(task, LONG)
    assert link.exit == (0, None, False, True)
    sleeper = int(link.output())
    await eventually(lambda: not alive(sleeper), "the sleeper killed")
    assert live_members(process.session) == []


@pytest.mark.asyncio
async def test_timeout_terms_then_kills_the_group() -> None:
    link = Link()
    request = {"command": "sleep 30", "timeout": 0.05}
    async with started(request, link) as (_, task):
        await asyncio.wait_for(task, LONG)
    assert link.exit == (None, signal.SIGTERM, True, False)

    link = Link()
    request = {"command": "trap '' TERM; echo ready; sleep 30", "timeout": 0.05, "kill_grace": 0.05}
    async with started(request, link) as (process, task):
        await asyncio.wait_for(task, LONG)
    assert link.exit == (None, signal.SIGKILL, True, False)
    await eventually(lambda: live_members(process.session) == [], "the group killed")


@pytest.mark.asyncio
async def test_close_discards_output_and_still_reports_the_exit() -> None:
    link = Link(credit=0)
    async with started({"command": "yes"}, link) as (process, task):
        process.close()
        await asyncio.wait_for(task, LONG)
    assert link.output() == b""
    assert link.exit == (None, signal.SIGTERM, False, False)
    assert link.ended(STDOUT) and link.ended(STDERR)


@pytest.mark.asyncio
async def test_cancelling_kills_every_group_of_the_session_and_reaps() -> None:
    # As a shell with job control does, a child moves to a process group of its own.
    link = Link()
    job_code = "import os, time; os.setpgid(0, 0); time.sleep(30)"
    request = {"command": f"python3 -c '{job_code}' & echo $!; wait"}
    async with started(request, link) as (process, task):
        await eventually(lambda: link.output().endswith(b"\n"), "the job's pid")
        job = int(link.output())
        await eventually(lambda: os.getpgid(job) == job, "the job in a group of its own")
        assert os.getsid(job) == process.session
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await eventually(lambda: not alive(job), "the job killed")
    assert not alive(process.pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(process.pid, os.WNOHANG)  # noqa: ASYNC222 - reaped already, so it fails
    assert link.exit is None


class HangUpAtExit(Link):
    """A host that goes away (or signals, or closes the stream) as the EXIT goes out: the
    connection learns of it only after the process was reaped."""

    def exited(self, *report: Any) -> None:
        super().exited(*report)
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.process.close()
        self.process.kill()


@pytest.mark.asyncio
async def test_a_reaped_process_is_never_signalled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once reaped, its pid and group id are free for the kernel to give another process:
    a SIGNAL, CLOSE or lost connection that comes after sends nothing."""
    signalled: list[tuple[int, int]] = []
    killpg = os.killpg

    def recorded(group: int, signum: int) -> None:
        signalled.append((group, signum))
        killpg(group, signum)

    monkeypatch.setattr(os, "killpg", recorded)
    link = HangUpAtExit()
    async with started({"command": "exit 3"}, link) as (_, task):
        await asyncio.wait_for(task, LONG)
    assert link.exit == (3, None, False, False)
    assert signalled == []


@pytest.mark.asyncio
async def test_stdin_for_a_process_that_stopped_reading_returns_all_credit() -> None:
    link = Link()
    async with started({"command": "head -c 1 >/dev/null; sleep 0.2", "stdin": True}, link) as (
        process,
        task,
    ):
        for _ in range(10):
            process.write_stdin(bytes(100_000), False)
        process.write_stdin(b"x", True)
        process.write_stdin(b"after the end", False)
        await asyncio.wait_for(task, LONG)
        assert link.stdin_returned == 1_000_000 + 1 + len(b"after the end")
    assert link.exit == (0, None, False, False)


@pytest.mark.asyncio
async def test_pty_is_the_controlling_terminal_and_resizes() -> None:
    link = Link()
    request = {
        "command": "tty; stty size; read line; stty size; echo got $line",
        "pty": {"rows": 24, "cols": 80},
        "stdin": True,
    }
    async with started(request, link) as (process, task):
        await eventually(lambda: b"24 80" in link.output(), "stty size")
        process.resize(50, 132)
        process.write_stdin(b"hello\n", False)
        await asyncio.wait_for(task, LONG)
    out = link.output()
    assert out.startswith(b"/dev/pts/")
    assert b"50 132\r\n" in out
    assert b"got hello" in out
    assert link.exit == (0, None, False, False)


@pytest.mark.asyncio
async def test_signal_on_a_pty_goes_to_the_foreground_group() -> None:
    link = Link()
    # The INT may come before the shell reaches its wait (after ready) or during it: either
    # way the trap ends the shell, which would otherwise wait 30 s for the sleep (a background
    # job of a script ignores INT).
    command = "trap 'echo caught INT; exit' INT; sleep 30 & echo ready; wait"
    request = {"command": command, "pty": {"rows": 24, "cols": 80}}
    async with started(request, link) as (process, task):
        await eventually(lambda: b"ready" in link.output(), "ready")
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(task, LONG)
    assert b"caught INT" in link.output()


@pytest.mark.asyncio
async def test_no_descriptor_left_is_a_spawn_failure_not_a_crash() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        spec = parse_exec(
            {"argv": ["true"]}, max_argv_bytes=1 << 20, can_switch_user=True, can_pty=True
        )
        with pytest.raises(Refused) as refused:
            Process(spec, Link(), shell="/bin/sh", output_grace=1.0, max_read=1 << 20)
        assert (refused.value.code, refused.value.errno) == ("spawn_failed", "EMFILE")
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # Nothing leaked: the same number of descriptors opens again.
    again = [os.open("/dev/null", os.O_RDONLY) for _ in held]
    for fd in again:
        os.close(fd)


@pytest.mark.asyncio
async def test_stdin_end_on_a_pty_types_the_eof_character() -> None:
    link = Link()
    request = {"argv": ["cat"], "pty": {"rows": 24, "cols": 80}, "stdin": True}
    async with started(request, link) as (process, task):
        process.write_stdin(b"line\n", True)
        await asyncio.wait_for(task, LONG)
    assert link.output() == b"line\r\nline\r\n"  # the terminal's echo, then cat's copy
    assert link.exit == (0, None, False, False)


@pytest.mark.asyncio
async def test_waiting_out_the_output_grace_does_not_spin() -> None:
    link = Link()
    before = time.process_time()
    async with started({"command": "sleep 30 & echo $!"}, link, grace=0.5) as (_, task):
        await asyncio.wait_for(task, LONG)
    spent = time.process_time() - before
    assert link.exit == (0, None, False, True)
    assert spent < 0.25, f"{spent:.2f} s of CPU while waiting 0.5 s"


@pytest.mark.asyncio
@pytest.mark.parametrize("splices", [True, False], ids=["spliced", "refused"])
async def test_large_output_is_spliced_once_reads_come_back_large(splices: bool) -> None:
    size = 3_000_000
    link = Link(credit=100_000)
    link.splices = splices
    command = f"head -c {size} /dev/urandom | tee /dev/stderr"  # the same bytes on both
    async with started({"command": command}, link) as (_, task):
        while not task.done():
            for channel in (STDOUT, STDERR):
                if link.credit_left[channel] < 50_000:
                    link.grant(channel, 100_000)
            await asyncio.sleep(0.001)
    out, err = link.output(), link.output(STDERR)
    assert len(out) == size and err == out
    assert link.exit == (0, None, False, False)
    assert link.ended(STDOUT) and link.ended(STDERR)
    assert (link.spliced > 0) == splices


@pytest.mark.asyncio
async def test_small_output_is_never_spliced() -> None:
    link = Link()
    async with started({"command": "for i in 1 2 3; do echo line $i; sleep 0.01; done"}, link) as (
        _,
        task,
    ):
        await asyncio.wait_for(task, LONG)
    assert link.output() == b"line 1\nline 2\nline 3\n" and link.spliced == 0

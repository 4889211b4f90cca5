"""Commands start with every signal at its default and an empty mask, even from an agent that
was started with signals ignored and blocked (:mod:`vsock_async.agent.signals`): real agent
processes, real commands reading their own /proc status."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent_process import IGNORING_LAUNCHER, LONG, served_agent

SIGNAL_LINES = "^Sig(Ign|Blk|Cgt):"


# The C library's own signals (glibc's 32 and 33, below SIGRTMIN) are not ours to set or to
# use: Python 3.13's subprocess children start with them ignored whatever the agent does.
USABLE = signal.valid_signals()


def signal_masks(status: bytes) -> dict[str, set[int]]:
    """``{"SigIgn": {signals}, "SigBlk": ..., ...}`` from lines of /proc/PID/status, the C
    library's own signals left out."""
    masks = {}
    for line in status.decode().splitlines():
        name, _, hexmask = line.partition(":")
        bits = int(hexmask, 16)
        masks[name] = {n for n in range(1, 65) if bits >> (n - 1) & 1 and n in USABLE}
    return masks


def proc_masks(pid: int) -> dict[str, set[int]]:
    """The signal masks of process ``pid``."""
    lines = Path(f"/proc/{pid}/status").read_bytes().splitlines()
    return signal_masks(b"\n".join(line for line in lines if re.match(SIGNAL_LINES, line.decode())))


def test_the_launcher_ignores_and_blocks_what_the_tests_say() -> None:
    """The tests below mean something only if a command inherits what the launcher sets."""
    done = subprocess.run(
        [*IGNORING_LAUNCHER, "grep", "-E", SIGNAL_LINES, "/proc/self/status"],
        capture_output=True,
        check=True,
    )
    masks = signal_masks(done.stdout)
    assert {signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTSTP} <= masks["SigIgn"]
    assert {signal.SIGUSR1, signal.SIGUSR2} <= masks["SigBlk"]


@pytest.mark.asyncio
async def test_a_v1_command_starts_with_default_signals_and_an_empty_mask(tmp_path: Path) -> None:
    async with served_agent(
        tmp_path, "v1.sock", protocol="v1", launcher=IGNORING_LAUNCHER
    ) as served:
        result = await served.guest.run(f"grep -E '{SIGNAL_LINES}' /proc/self/status", timeout=LONG)
        masks = signal_masks(result.stdout)
        assert (masks["SigIgn"], masks["SigBlk"]) == (set(), set())


@pytest.mark.asyncio
@pytest.mark.parametrize("pty", [None, (24, 80)])
async def test_a_v2_process_starts_with_default_signals_and_an_empty_mask(
    tmp_path: Path, pty: tuple[int, int] | None
) -> None:
    async with served_agent(tmp_path, "v2.sock", launcher=IGNORING_LAUNCHER) as served:
        argv = ["grep", "-E", SIGNAL_LINES, "/proc/self/status"]
        process = await served.guest.create_process(argv, pty=pty)
        stdout, _ = await process.communicate()
        assert process.returncode == 0
        assert stdout is not None
        masks = signal_masks(stdout.replace(b"\r\n", b"\n"))
        assert (masks["SigIgn"], masks["SigBlk"]) == (set(), set())


TAKING_A_TERMINAL = (
    sys.executable,
    "-c",
    "import fcntl, os, sys, termios\n"
    "master, slave = os.openpty()\n"
    "fcntl.ioctl(slave, termios.TIOCSCTTY, 0)\n"
    "os.set_inheritable(master, True)  # the terminal lasts as long as the agent\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n",
)
"""After :data:`IGNORING_LAUNCHER` (a session leader now): a controlling terminal for it."""


@pytest.mark.asyncio
async def test_with_a_controlling_terminal_the_job_control_signals_are_left_alone(
    tmp_path: Path,
) -> None:
    """Caught, SIGTTOU would make an agent in the background retry its writes forever."""
    launcher = IGNORING_LAUNCHER + TAKING_A_TERMINAL
    async with served_agent(tmp_path, "tty.sock", launcher=launcher) as served:
        process = await served.guest.create_process(
            ["grep", "-E", SIGNAL_LINES, "/proc/self/status"]
        )
        stdout, _ = await process.communicate()
        assert stdout is not None
        masks = signal_masks(stdout)
        job_control = {signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
        assert (masks["SigIgn"], masks["SigBlk"]) == (job_control, set())


@pytest.mark.asyncio
async def test_signals_sent_to_a_process_end_it(tmp_path: Path) -> None:
    async with served_agent(tmp_path, "kill.sock", launcher=IGNORING_LAUNCHER) as served:
        for signum, pty in [
            (signal.SIGINT, None),
            (signal.SIGHUP, None),
            (signal.SIGINT, (24, 80)),
        ]:
            process = await served.guest.create_process("sleep 30", pty=pty)
            process.send_signal(signum)
            assert await process.wait() == -signum
            assert process.exit_signal == signum


@pytest.mark.asyncio
async def test_the_agent_itself_still_ignores_what_it_was_started_ignoring(
    tmp_path: Path,
) -> None:
    async with served_agent(tmp_path, "self.sock", launcher=IGNORING_LAUNCHER) as served:
        pid = served.agent.pid
        caught = proc_masks(pid)["SigCgt"]
        assert {signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2} <= caught
        assert proc_masks(pid)["SigBlk"] == set()
        for signum in (signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGTSTP):
            os.kill(pid, signum)
        process = await served.guest.create_process(["echo", "alive"])
        assert await process.communicate() == (b"alive\n", b"")
        assert served.agent.returncode is None


REFUSING = """
import errno, signal
from vsock_async.agent.signals import default_signals_for_commands
for signum in (signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(signum, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGWINCH, signal.SIGURG})
real = signal.signal
def refusing(signum, handler):
    if signum in (signal.SIGUSR1, signal.SIGURG):  # as a runtime that keeps them refuses
        raise OSError(errno.EINVAL, "Invalid argument")
    return real(signum, handler)
signal.signal = refusing
default_signals_for_commands()
usr1, usr2 = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGUSR2)
print(usr1 is signal.SIG_IGN, callable(usr2))
print(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, ())))
"""


def test_a_signal_the_runtime_will_not_let_go_is_left_as_found() -> None:
    # Under valgrind, sigaction refuses a signal it keeps; the agent once died of that at start.
    done = subprocess.run([sys.executable, "-c", REFUSING], capture_output=True, check=True)
    caught, blocked = done.stdout.decode().splitlines()
    assert caught == "True True"  # USR1 still ignored (refused), USR2 caught
    assert blocked == str([signal.SIGURG.value])  # WINCH unblocked, URG left blocked

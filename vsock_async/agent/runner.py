"""One command of the guest agent: ``SHELL -c COMMAND`` in its own process group, output capped.

The exchange ends when the shell exits. Output still arriving after that
(from processes the shell left behind that hold stdout or stderr open) is
read for ``grace`` seconds; if the pipes are still open then, the whole
process group is killed and the answer goes out with what was read. A
process that detached its output (``cmd >/dev/null 2>&1 &``) is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import signal
import subprocess
from dataclasses import dataclass

from ..protocol import Limits

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_OUTPUT_GRACE",
    "EXIT_NO_SHELL",
    "EXIT_REFUSED",
    "EXIT_TIMEOUT",
    "Outcome",
    "refuse",
    "run_command",
]

DEFAULT_MAX_OUTPUT = Limits().max_stdout  # what a host with default limits accepts
DEFAULT_OUTPUT_GRACE = 1.0
EXIT_TIMEOUT = 124
EXIT_REFUSED = 126
EXIT_NO_SHELL = 127
NOTE_PREFIX = b"vsock-async agent: "


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the agent answers for one command."""

    stdout: bytes
    stderr: bytes
    exit_code: int


def refuse(message: str, max_output: int, exit_code: int = EXIT_REFUSED) -> Outcome:
    """The answer for a command that is not run: the agent's note on stderr and ``exit_code``."""
    return Outcome(b"", _render([message])[:max_output], exit_code)


class _CappedStream:
    """One output stream: the first ``cap`` bytes kept, the rest counted and dropped."""

    def __init__(self, cap: int) -> None:
        self._room = cap
        self._chunks: list[bytes] = []
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        if self._room <= 0:
            return
        if len(data) > self._room:
            data = data[: self._room]
        self._chunks.append(data)
        self._room -= len(data)

    @property
    def cut(self) -> bool:
        return self.total > sum(map(len, self._chunks))

    def value(self) -> bytes:
        return b"".join(self._chunks)


class _PipeReader(asyncio.Protocol):
    """Feeds one of the child's output pipes into a capped stream; ``closed`` resolves at EOF."""

    def __init__(self, stream: _CappedStream, closed: asyncio.Future[None]) -> None:
        self._stream = stream
        self._closed = closed

    def data_received(self, data: bytes) -> None:
        self._stream.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


class _Shell:
    """The shell of one command, its output pipes, and when it exits.

    The shell is reaped only by :meth:`reap`, after its process group has been dealt
    with: while it is an unreaped zombie its pid cannot be reused, so neither can its
    process group id, and ``killpg`` can never hit a stranger's group.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen[bytes], cap: int):
        self._loop = loop
        self.proc = proc
        self.group = proc.pid  # start_new_session: the shell leads its own group
        self.stdout = _CappedStream(cap)
        self.stderr = _CappedStream(cap)
        self.exited: asyncio.Future[None] = loop.create_future()
        self._pipes: list[asyncio.Future[None]] = []
        self._transports: list[asyncio.BaseTransport] = []
        self._pidfd = -1
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin watching for the shell's exit and reading both pipes."""
        try:
            self._pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):  # no pidfd (Linux < 5.3): poll instead
            self._poller = self._loop.create_task(self._poll_exit())
        else:
            self._loop.add_reader(self._pidfd, self._on_exit)
        for pipe, stream in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            assert pipe is not None
            closed: asyncio.Future[None] = self._loop.create_future()
            transport, _ = await self._loop.connect_read_pipe(
                functools.partial(_PipeReader, stream, closed), pipe
            )
            self._pipes.append(closed)
            self._transports.append(transport)

    def _on_exit(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    async def _poll_exit(self) -> None:
        # Without a pidfd there is nothing to wait on that does not reap; this never blocks.
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        while os.waitid(os.P_PID, self.proc.pid, flags) is None:  # noqa: ASYNC110, ASYNC222
            await asyncio.sleep(0.05)
        self._on_exit()

    async def wait_exit(self, timeout: float | None) -> bool:
        """Wait for the shell to exit, without reaping it; False if ``timeout`` ran out."""
        return await _wait([self.exited], timeout)

    async def wait_output(self, timeout: float | None) -> bool:
        """Wait until stdout and stderr are both closed; False if ``timeout`` ran out."""
        return await _wait(self._pipes, timeout)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.group, signal.SIGKILL)

    def reap(self) -> int:
        """Close the pipes and reap the shell (it must have exited); its Popen return code."""
        self.close()
        return self.proc.wait()

    def close(self) -> None:
        for transport in self._transports:
            transport.close()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()  # a no-op for a pipe a transport took and closed
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._poller is not None:
            self._poller.cancel()


async def run_command(
    command: bytes,
    *,
    shell: str = "/bin/sh",
    timeout: float | None = None,
    max_output: int = DEFAULT_MAX_OUTPUT,
    grace: float = DEFAULT_OUTPUT_GRACE,
) -> Outcome:
    """Run ``shell -c command`` and return its output and exit code (signal S gives 128+S).

    Cancelling it kills the process group and reaps the shell before it returns.
    """
    if b"\0" in command:
        return refuse(
            "the command holds a NUL byte, which a shell command line cannot carry; not run",
            max_output,
        )
    try:
        # Synchronous on purpose: with no await between the fork and holding the pid,
        # a cancellation can never leave a started shell behind unowned.
        proc = subprocess.Popen(  # noqa: ASYNC220
            [os.fsencode(shell), b"-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        code = EXIT_NO_SHELL if exc.errno == errno.ENOENT else EXIT_REFUSED
        return refuse(f"cannot start the shell {shell}: {exc.strerror or exc}", max_output, code)
    child = _Shell(asyncio.get_running_loop(), proc, max_output)
    notes: list[str] = []
    timed_out = False
    try:
        await child.start()
        if not await child.wait_exit(timeout):
            child.kill_group()
            timed_out = True
            notes.append(
                f"the command ran longer than {timeout:g} s (--command-timeout): its process"
                f" group was killed; exit code {EXIT_TIMEOUT} is the agent's"
            )
            await child.wait_exit(None)
        if not await child.wait_output(grace):
            child.kill_group()
            notes.append(
                f"the shell exited but processes it started kept stdout or stderr open for"
                f" {grace:g} s: its process group was killed"
            )
            await child.wait_output(grace)
    except BaseException:
        child.kill_group()
        try:
            await child.wait_exit(None)
        finally:
            child.reap()  # at once: the shell has exited, or SIGKILL is on its way
        raise
    returncode = child.reap()
    exit_code = 128 - returncode if returncode < 0 else returncode
    if timed_out:
        exit_code = EXIT_TIMEOUT
    return _finish(child.stdout, child.stderr, notes, max_output, exit_code)


async def _wait(futures: list[asyncio.Future[None]], timeout: float | None) -> bool:
    """Wait for all ``futures`` without cancelling them; False if ``timeout`` ran out first."""
    _, pending = await asyncio.wait(futures, timeout=timeout)
    return not pending


def _render(notes: list[str]) -> bytes:
    return b"".join(NOTE_PREFIX + note.encode() + b"\n" for note in notes)


def _finish(
    stdout: _CappedStream, stderr: _CappedStream, notes: list[str], cap: int, exit_code: int
) -> Outcome:
    """Put the agent's notes at the end of stderr, cutting stderr so that the notes fit in the cap.

    stdout stays an exact prefix of what the command wrote.
    """
    if stdout.cut:
        notes.insert(
            0,
            f"stdout cut to its first {cap} bytes of {stdout.total} (--max-output)",
        )
    err = stderr.value()
    tail = _render(notes)
    if stderr.cut or len(err) + len(tail) > cap:
        notes.insert(
            0,
            f"stderr cut: the command wrote {stderr.total} bytes, more than fit in"
            f" {cap} (--max-output) with these notes",
        )
        tail = _render(notes)
        err = err[: max(0, cap - len(tail))]
    return Outcome(stdout.value(), (err + tail)[:cap], exit_code)

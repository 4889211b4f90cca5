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
import os
import signal
import subprocess
from dataclasses import dataclass

from .protocol import Limits

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


class _Capture(asyncio.SubprocessProtocol):
    """Collects a child's stdout and stderr and tells when it exited and when both pipes closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cap: int) -> None:
        self.stdout = _CappedStream(cap)
        self.stderr = _CappedStream(cap)
        self.exited: asyncio.Future[None] = loop.create_future()
        self.pipes_closed: asyncio.Future[None] = loop.create_future()
        self._open = {1, 2}

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        (self.stdout if fd == 1 else self.stderr).feed(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open.discard(fd)
        if not self._open and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


async def run_command(
    command: bytes,
    *,
    shell: str = "/bin/sh",
    timeout: float | None = None,
    max_output: int = DEFAULT_MAX_OUTPUT,
    grace: float = DEFAULT_OUTPUT_GRACE,
) -> Outcome:
    """Run ``shell -c command`` and return its output and exit code (signal S gives 128+S).

    Cancelling it kills the process group and waits until the shell is reaped.
    """
    if b"\0" in command:
        return refuse(
            "the command holds a NUL byte, which a shell command line cannot carry; not run",
            max_output,
        )
    loop = asyncio.get_running_loop()
    try:
        transport, capture = await loop.subprocess_exec(
            lambda: _Capture(loop, max_output),
            shell,
            "-c",
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        code = EXIT_NO_SHELL if exc.errno == errno.ENOENT else EXIT_REFUSED
        return refuse(f"cannot start the shell {shell}: {exc.strerror or exc}", max_output, code)
    group = transport.get_pid()
    notes: list[str] = []
    timed_out = False
    try:
        if not await _wait(capture.exited, timeout):
            _kill_group(group)
            timed_out = True
            notes.append(
                f"the command ran longer than {timeout:g} s (--command-timeout): its process"
                f" group was killed; exit code {EXIT_TIMEOUT} is the agent's"
            )
            await _wait(capture.exited, None)
        if not await _wait(capture.pipes_closed, grace):
            _kill_group(group)
            notes.append(
                f"the shell exited but processes it started kept stdout or stderr open for"
                f" {grace:g} s: its process group was killed"
            )
            await _wait(capture.pipes_closed, grace)
    except BaseException:
        _kill_group(group)
        with contextlib.suppress(BaseException):
            await asyncio.shield(capture.exited)
        raise
    finally:
        transport.close()
    if timed_out:
        exit_code = EXIT_TIMEOUT
    else:
        returncode = transport.get_returncode()
        assert returncode is not None
        exit_code = 128 - returncode if returncode < 0 else returncode
    return _finish(capture, notes, max_output, exit_code)


async def _wait(future: asyncio.Future[None], timeout: float | None) -> bool:
    """Wait for ``future`` without cancelling it; False if ``timeout`` ran out first."""
    done, _ = await asyncio.wait({future}, timeout=timeout)
    return bool(done)


def _kill_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)


def _render(notes: list[str]) -> bytes:
    return b"".join(NOTE_PREFIX + note.encode() + b"\n" for note in notes)


def _finish(capture: _Capture, notes: list[str], cap: int, exit_code: int) -> Outcome:
    """Put the agent's notes at the end of stderr, cutting stderr so that the notes fit in the cap.

    stdout stays an exact prefix of what the command wrote.
    """
    stdout, stderr = capture.stdout, capture.stderr
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

"""One command of the guest agent: ``SHELL -c COMMAND`` in its own process group, output capped.

The exchange ends when the shell exits. Output still arriving after that
(from processes the shell left behind that hold stdout or stderr open) is
read for ``grace`` seconds; if the pipes are still open then, the whole
process group is killed and the answer goes out with what was read. A
process that detached its output (``cmd >/dev/null 2>&1 &``) is left running.

Memory: each stream is read straight from its pipe into one ``bytearray``
that grows to at most the cap, and that buffer is what the answer is sent
from; the command's output is never copied whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from ..protocol import Limits

__all__ = [
    "ARGV_STRING_MAX",
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
ARGV_STRING_MAX = 128 * 1024
"""Linux refuses an argv string this long or longer (MAX_ARG_STRLEN with 4 KiB pages, NUL
included): a command of this size or more reaches the shell through a memfd instead."""
_READ_SIZE = 256 * 1024
_READS_PER_WAKEUP = 16  # a pipe that never empties still lets the event loop run


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the agent answers for one command (the buffers it read the output into)."""

    stdout: bytes | bytearray
    stderr: bytes | bytearray
    exit_code: int


def refuse(message: str, max_output: int, exit_code: int = EXIT_REFUSED) -> Outcome:
    """The answer for a command that is not run: the agent's note on stderr and ``exit_code``."""
    return Outcome(b"", _render([message])[:max_output], exit_code)


class _Capture:
    """One of the command's output pipes, read as the event loop says it is readable.

    The first ``cap`` bytes are kept in :attr:`data`; the rest are counted and dropped,
    so the command never blocks on a full pipe. ``closed`` resolves at end of file.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, cap: int) -> None:
        self._loop = loop
        self._fd = fd
        self._cap = cap
        self.data = bytearray()
        self.total = 0
        self.closed: asyncio.Future[None] = loop.create_future()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self.read)

    @property
    def cut(self) -> bool:
        return self.total > len(self.data)

    def read(self) -> None:
        """Read what the pipe holds now (up to a bound); at end of file, stop watching it."""
        if self._fd < 0:
            return
        for _ in range(_READS_PER_WAKEUP):
            try:
                chunk = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return
            if not chunk:
                self.close()
                return
            self.total += len(chunk)
            room = self._cap - len(self.data)
            if room >= len(chunk):
                self.data += chunk
            elif room > 0:
                self.data += memoryview(chunk)[:room]

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        if not self.closed.done():
            self.closed.set_result(None)


class ExitWatcher:
    """Notices that a child exited without reaping it, so its pid (and group id) stay taken.

    A pidfd watched by the event loop (Linux 5.3+), else ``waitid(WNOWAIT)`` polled every
    50 ms. :attr:`exited` resolves once; ``on_exit`` is called as the exit is noticed, in the
    same callback (a future's callbacks run one loop iteration later); :meth:`close` stops
    watching.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pid: int,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self._loop = loop
        self._pid = pid
        self._on_exit_callback = on_exit
        self.exited: asyncio.Future[None] = loop.create_future()
        self._pidfd = -1
        self._watching = False
        self._poller: asyncio.Task[None] | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd (Linux < 5.3): poll instead
            self._poller = loop.create_task(self._poll())
        else:
            loop.add_reader(self._pidfd, self._on_exit)
            self._watching = True

    def _on_exit(self) -> None:
        # A pidfd stays readable once its process has exited: a reader left on it would run
        # the event loop flat out.
        self._unwatch()
        if not self.exited.done():
            self.exited.set_result(None)
            if self._on_exit_callback is not None:
                self._on_exit_callback()

    def check(self) -> None:
        """Notice the exit now if the child has exited already, without waiting for the event
        loop to report it: a process's exit follows the end of its output closely."""
        if not self.exited.done():
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            if os.waitid(os.P_PID, self._pid, flags) is not None:
                self._on_exit()

    async def _poll(self) -> None:
        # Without a pidfd there is nothing to wait on that does not reap; this never blocks.
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        while os.waitid(os.P_PID, self._pid, flags) is None:  # noqa: ASYNC110, ASYNC222
            await asyncio.sleep(0.05)
        self._on_exit()

    def _unwatch(self) -> None:
        if self._watching:
            self._loop.remove_reader(self._pidfd)
            self._watching = False

    def close(self) -> None:
        self._unwatch()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None


class _Shell:
    """The shell of one command, its output pipes, and when it exits.

    The shell is reaped only by :meth:`reap`, after its process group has been dealt
    with: while it is an unreaped zombie its pid cannot be reused, so neither can its
    process group id, and ``killpg`` can never hit a stranger's group.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        proc: subprocess.Popen[bytes],
        pipes: tuple[int, int],
        cap: int,
        script: int,
    ) -> None:
        self._loop = loop
        self.proc = proc
        self.group = proc.pid  # start_new_session: the shell leads its own group
        self.stdout = _Capture(loop, pipes[0], cap)
        self.stderr = _Capture(loop, pipes[1], cap)
        self._exit = ExitWatcher(loop, proc.pid)
        self.exited = self._exit.exited
        self._script = script

    async def wait_exit(self, timeout: float | None) -> bool:
        """Wait for the shell to exit, without reaping it; False if ``timeout`` ran out."""
        return await _wait([self.exited], timeout)

    async def wait_output(self, timeout: float | None) -> bool:
        """Wait until stdout and stderr are both closed; False if ``timeout`` ran out.

        What the pipes hold already is read first, so a zero ``timeout`` loses nothing
        the shell wrote before it exited.
        """
        for capture in (self.stdout, self.stderr):
            capture.read()
        return await _wait([self.stdout.closed, self.stderr.closed], timeout)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.group, signal.SIGKILL)

    def reap(self) -> int:
        """Close the pipes and reap the shell (it must have exited); its Popen return code."""
        self.close()
        return self.proc.wait()

    def close(self) -> None:
        self.stdout.close()
        self.stderr.close()
        if self._script >= 0:
            os.close(self._script)
            self._script = -1
        self._exit.close()


def shell_argv(shell: str, command: bytes, *, inherited: bool = False) -> tuple[list[bytes], int]:
    """The argv that runs ``shell -c command``, and the memfd holding a long command (-1 for
    a short one; close it once the shell has exited).

    A command too long for one argv string goes into a memfd that the shell sources as
    ``. /proc/AGENT/fd/N``: the agent's descriptor, so the command's processes inherit no
    extra one. With ``inherited``, as ``. /dev/fd/N`` instead, for a child given that
    descriptor (``pass_fds``) that runs as another user and so cannot open the agent's.
    A ``.`` script keeps what matters of ``-c``: ``$0``, ``$#``, ``exit N``.
    """
    if len(command) < ARGV_STRING_MAX:
        return [os.fsencode(shell), b"-c", command], -1
    script = os.memfd_create("vsock-async-command", os.MFD_CLOEXEC)
    try:
        rest = memoryview(command)
        while rest:
            rest = rest[os.write(script, rest) :]
    except BaseException:
        os.close(script)
        raise
    path = b"/dev/fd/%d" % script if inherited else b"/proc/%d/fd/%d" % (os.getpid(), script)
    return [os.fsencode(shell), b"-c", b". " + path], script


def _spawn(shell: str, command: bytes) -> tuple[subprocess.Popen[bytes], tuple[int, int], int]:
    """Start ``shell -c command`` (:func:`shell_argv`); the shell, the read ends of its
    stdout and stderr pipes, and the memfd that holds a long command (-1 for a short one).
    """
    argv, script = shell_argv(shell, command)
    fds: list[int] = []
    try:
        out_r, out_w = os.pipe()
        fds += (out_r, out_w)
        err_r, err_w = os.pipe()
        fds += (err_r, err_w)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            start_new_session=True,
        )
    except BaseException:
        for fd in fds:
            os.close(fd)
        if script >= 0:
            os.close(script)
        raise
    os.close(out_w)
    os.close(err_w)
    return proc, (out_r, err_r), script


async def run_command(
    command: bytes,
    *,
    shell: str = "/bin/sh",
    timeout: float | None = None,
    max_output: int = DEFAULT_MAX_OUTPUT,
    grace: float | None = DEFAULT_OUTPUT_GRACE,
) -> Outcome:
    """Run ``shell -c command`` and return its output and exit code (signal S gives 128+S).

    ``timeout`` and ``grace`` follow :mod:`vsock_async.timeouts` (None: no limit).
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
        proc, pipes, script = _spawn(shell, command)
    except OSError as exc:
        code = EXIT_NO_SHELL if exc.errno == errno.ENOENT else EXIT_REFUSED
        return refuse(f"cannot start the shell {shell}: {exc.strerror or exc}", max_output, code)
    child = _Shell(asyncio.get_running_loop(), proc, pipes, max_output, script)
    notes: list[str] = []
    timed_out = False
    try:
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
    if all(future.done() for future in futures):
        return True
    _, pending = await asyncio.wait(futures, timeout=timeout)
    return not pending


def _render(notes: list[str]) -> bytes:
    return b"".join(NOTE_PREFIX + note.encode() + b"\n" for note in notes)


def _finish(
    stdout: _Capture, stderr: _Capture, notes: list[str], cap: int, exit_code: int
) -> Outcome:
    """Put the agent's notes at the end of stderr, cutting stderr so that the notes fit in the cap.

    stdout stays an exact prefix of what the command wrote. Both buffers are edited in
    place: the notes are small, the output is never copied.
    """
    if stdout.cut:
        notes.insert(
            0,
            f"stdout cut to its first {cap} bytes of {stdout.total} (--max-output)",
        )
    err = stderr.data
    tail = _render(notes)
    if stderr.cut or len(err) + len(tail) > cap:
        notes.insert(
            0,
            f"stderr cut: the command wrote {stderr.total} bytes, more than fit in"
            f" {cap} (--max-output) with these notes",
        )
        tail = _render(notes)
        del err[max(0, cap - len(tail)) :]
    err += tail
    del err[cap:]
    return Outcome(stdout.data, err, exit_code)

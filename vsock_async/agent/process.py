"""One process of a v2 stream, from its :class:`~.request.ExecSpec` until it is reaped.

Standard library only. The process runs in a session (and so a process group) of
its own, optionally on a pseudo-terminal. Its output is read only while the host
has granted credit for that channel: a process whose output nobody reads blocks
on its own write, and no other stream notices. Its exit is noticed without
reaping it (a pidfd), its output is drained with a bounded grace, and only then
is it reaped, so its process group id cannot be reused before every kill is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import subprocess
import sys
import termios
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

from .request import ExecSpec, Refused
from .runner import ExitWatcher, shell_argv
from .terminal import eof_char, foreground_group, open_pty, set_size, take_terminal

__all__ = ["STDERR", "STDOUT", "Process", "StreamLink", "signal_session"]

STDOUT: Final = 1
STDERR: Final = 2
"""Channel numbers, as on the wire."""


class StreamLink(Protocol):
    """What a process needs from its connection."""

    def credit(self, channel: int) -> int:
        """Bytes the host will take on ``channel`` now (0 also while the connection is paused)."""

    def send_output(self, channel: int, data: bytes, end: bool) -> None:
        """Send output (at most :meth:`credit` bytes); ``end``: the channel is closed after it."""

    def splice_output(self, channel: int, fd: int, n: int) -> bool:
        """Send the next ``n`` bytes of pipe ``fd`` (all there already, at most :meth:`credit`)
        without reading them into Python; False when it cannot now (the caller reads them)."""

    def stdin_consumed(self, n: int) -> None:
        """``n`` bytes of stdin were written to the process (or discarded): return the credit."""

    def exited(
        self, exit_code: int | None, signal: int | None, timed_out: bool, output_incomplete: bool
    ) -> None:
        """The last word on the stream."""


class _Output:
    """One output channel: the fd it is read from, and whether it is being read or is done."""

    __slots__ = ("channel", "closed", "fd", "pipe", "reading", "streaming")

    def __init__(self, channel: int, fd: int, pipe: bool = False) -> None:
        self.channel = channel
        self.fd = fd
        self.pipe = pipe  # a pipe (not a terminal): its bytes can be spliced
        self.reading = False
        self.closed = False
        self.streaming = False  # a read came back large: splice from now on (and sized)


class Process:
    """A started process of one stream; :meth:`run` supervises it until EXIT has been sent.

    Cancelling :meth:`run` (the connection is gone) kills the process's session with
    SIGKILL and reaps it before the cancellation goes on; nothing is sent.
    """

    def __init__(
        self,
        spec: ExecSpec,
        link: StreamLink,
        *,
        shell: str,
        output_grace: float | None,
        max_read: int,
    ) -> None:
        """Start the process (synchronously: no await between fork and owning the pid).

        Raises :class:`Refused` (``spawn_failed``, with the errno name) if it cannot start.
        """
        self._loop = asyncio.get_running_loop()
        self._link = link
        self._grace_left = output_grace  # of the output grace; runs while every output is read
        self._max_read = max_read
        self._window = spec.window
        self._timeout = spec.timeout
        self._kill_grace = spec.kill_grace
        self._master = -1
        self._script = -1  # the memfd of a long command, open until the process is done
        self._stdin = -1
        self._stdin_queue: deque[memoryview] = deque()
        self._stdin_end = False
        self._stdin_writing = False
        self._outputs: list[_Output] = []
        self._deadline: asyncio.TimerHandle | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self._grace_timer: asyncio.TimerHandle | None = None
        self._grace_since = 0.0  # when the grace clock last started
        self._stopping = False
        self._discard = False
        self._running = False  # run() has set up the readers
        self._exited = False  # the exit was noticed (the process is not reaped yet)
        self._done = False  # the exit was reported, or run() was cancelled: report nothing more
        self._reaped = False  # waited for: its pid and group id may be another process's now
        self._reported: asyncio.Future[None] = self._loop.create_future()
        self.timed_out = False
        self.proc = _start_process(spec, shell, self)
        self.pid = self.proc.pid
        self.session = self.proc.pid  # setsid: the process leads its session and its group
        self._exit = ExitWatcher(self._loop, self.pid, self._on_exit)

    # -- the host's requests -------------------------------------------------------------

    def write_stdin(self, data: bytes | memoryview, end: bool) -> None:
        """Queue bytes for stdin (credit comes back as they are written); ``end``: then EOF."""
        if self._stdin < 0 or self._stdin_end:
            self._link.stdin_consumed(len(data))  # nobody reads them: drop, but keep credit flowing
            return
        if data:
            # The caller's buffer may be reused once this returns: keep a copy of what waits.
            self._stdin_queue.append(memoryview(data if isinstance(data, bytes) else bytes(data)))
        self._stdin_end = end
        if not self._stdin_writing:
            self._write_stdin()

    def send_signal(self, signum: int) -> None:
        """Deliver ``signum`` to the process group (on a terminal: the foreground group)."""
        if self._reaped:
            return
        group = self.session
        if self._master >= 0:
            with contextlib.suppress(OSError):  # no foreground group any more: the session's
                group = foreground_group(self._master)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)

    def resize(self, rows: int, cols: int) -> None:
        """Resize the terminal; :class:`Refused` if the process has none."""
        if self._master < 0:
            raise Refused("bad_request", "RESIZE on a stream that has no pty")
        set_size(self._master, rows, cols)

    def close(self) -> None:
        """The host gave up: TERM the session, KILL after the grace, read and drop its output."""
        self._discard = True
        self._close_stdin()
        self._stop()
        self._update_readers()

    def kill(self) -> None:
        """The connection is gone: SIGKILL the session now, read and drop its output.

        :meth:`run` goes on to reap it (whether or not it had started yet), sending nothing.
        """
        self._discard = True
        self._stopping = True  # and again at the end, for whatever is left of the session
        self._close_stdin()
        if not self._reaped:
            signal_session(self.session, signal.SIGKILL)
        self._update_readers()

    def credit_changed(self) -> None:
        """The host granted credit, or the connection was paused or resumed."""
        self._update_readers()

    # -- supervision ---------------------------------------------------------------------

    async def run(self) -> None:
        """Supervise until the exit has been reported.

        The exit is reported from the callback that completes it (the exit noticed, the
        last channel at its end, or the grace run out), not from here: the END frames and
        the EXIT of a process that exits with its output closed leave in one write.
        """
        try:
            for output in self._outputs:
                if output.fd < 0:  # no pipe for this channel: it is closed from the start
                    self._end(output)
            self._running = True
            self._update_readers()
            if self._timeout is not None and not self._exited:
                self._deadline = self._loop.call_later(self._timeout, self._time_out)
            self._settle()
            await asyncio.shield(self._reported)
        except BaseException:
            self._done = True
            if not self._reaped:  # the exit report itself failed after the reap
                signal_session(self.session, signal.SIGKILL)
            self._release_io()
            try:
                await asyncio.shield(self._exit.exited)
            finally:
                self._release()
                self.proc.wait()  # at once: it has exited, or SIGKILL is on its way
            raise

    def _on_exit(self) -> None:
        self._exited = True
        if self._deadline is not None:  # a limit on its life, which has ended
            self._deadline.cancel()
        self._settle()

    def _settle(self) -> None:
        """Once it has exited: report the exit when every output has reached EOF, or when
        the output grace runs out (None: no limit).

        The grace clock runs only while every open channel is being read: time spent
        waiting for the host's credit never cuts output from a process that has exited.
        """
        if not self._running or self._done:
            return
        open_outputs = [output for output in self._outputs if not output.closed]
        if not self._exited:
            if not open_outputs:  # its output ended as it exited, most likely: see if it has
                self._exit.check()  # (calls back here if so)
            return
        if not open_outputs:
            self._report(complete=True)
        elif self._grace_left is not None:
            reading = all(output.reading for output in open_outputs)
            if reading and self._grace_timer is None:
                self._grace_since = self._loop.time()
                self._grace_timer = self._loop.call_later(
                    max(self._grace_left, 0.0), self._report, False
                )
            elif not reading and self._grace_timer is not None:
                self._grace_timer.cancel()
                self._grace_timer = None
                self._grace_left -= self._loop.time() - self._grace_since

    def _report(self, complete: bool) -> None:
        """End the open channels (killing what holds them), reap the process, send EXIT."""
        if self._done:  # a grace timer that fired just as the last channel ended
            return
        self._done = True
        try:
            if not complete or self._stopping:
                signal_session(self.session, signal.SIGKILL)
            for output in self._outputs:
                if not output.closed:
                    self._end(output)
            self._drop_stdin()  # what still waits for it returns its credit before the EXIT
            self._release()
            returncode = self.proc.wait()
            self._reaped = True
            self._link.exited(
                returncode if returncode >= 0 else None,
                -returncode if returncode < 0 else None,
                self.timed_out,
                not complete,
            )
        except Exception as exc:  # run() raises it, after killing and reaping
            self._reported.set_exception(exc)
        else:
            self._reported.set_result(None)

    def _time_out(self) -> None:
        self.timed_out = True
        self._stop()

    def _stop(self) -> None:
        """TERM the session now, KILL it after the grace (once, whoever asks)."""
        if self._stopping or self._reaped:
            return
        self._stopping = True
        signal_session(self.session, signal.SIGTERM)
        self._kill_timer = self._loop.call_later(
            self._kill_grace, signal_session, self.session, signal.SIGKILL
        )

    # -- output --------------------------------------------------------------------------

    def _update_readers(self) -> None:
        """Read each open channel exactly while it has credit (or its output is discarded)."""
        toggled = False
        for output in self._outputs:
            want = not output.closed and (self._discard or self._link.credit(output.channel) > 0)
            if want != output.reading:
                toggled = True
                output.reading = want
                if want:
                    self._loop.add_reader(output.fd, self._on_readable, output)
                else:
                    self._loop.remove_reader(output.fd)
        if toggled:
            self._settle()

    def _on_readable(self, output: _Output) -> None:
        size = self._max_read
        if not self._discard:
            size = min(size, self._link.credit(output.channel))
        if size <= 0:
            self._update_readers()
            return
        if output.streaming and not self._discard:
            n = min(size, _pipe_bytes(output.fd))
            if n >= _SPLICE_MIN and self._link.splice_output(output.channel, output.fd, n):
                if self._link.credit(output.channel) <= 0:
                    self._update_readers()
                return
        try:
            data = os.read(output.fd, size)
        except BlockingIOError:
            return
        except OSError:
            # EIO: a terminal whose every slave fd is closed. Anything else leaves a pipe
            # that cannot be read: its channel has ended all the same.
            data = b""
        if not data:
            self._end(output)
            return
        if not self._discard:
            if output.pipe and not output.streaming and len(data) >= _SPLICE_MIN:
                output.streaming = True
                _size_pipe(output.fd, self._window)
            self._link.send_output(output.channel, data, False)
            if self._link.credit(output.channel) <= 0:
                self._update_readers()

    def _end(self, output: _Output) -> None:
        """Stop reading a channel and tell the host it is closed."""
        if output.reading:
            self._loop.remove_reader(output.fd)
            output.reading = False
        output.closed = True
        self._close_output_fd(output)
        self._link.send_output(output.channel, b"", True)
        self._settle()

    def _close_output_fd(self, output: _Output) -> None:
        if output.fd >= 0 and output.fd != self._master:
            os.close(output.fd)
        output.fd = -1

    # -- stdin ---------------------------------------------------------------------------

    def _write_stdin(self) -> None:
        queue = self._stdin_queue
        while queue:
            try:
                written = os.write(self._stdin, queue[0])
            except BlockingIOError:
                break
            except OSError:
                # EPIPE (EIO on a terminal): the process closed its stdin. Nobody will read
                # these bytes, nor any that follow.
                self._drop_stdin()
                return
            self._link.stdin_consumed(written)
            if written == len(queue[0]):
                queue.popleft()
            else:
                queue[0] = queue[0][written:]
        if queue:
            if not self._stdin_writing:
                self._loop.add_writer(self._stdin, self._write_stdin)
                self._stdin_writing = True
            return
        if self._stdin_writing:
            self._loop.remove_writer(self._stdin)
            self._stdin_writing = False
        if self._stdin_end:
            if self._stdin == self._master:  # a terminal has no half-close: type its EOF
                with contextlib.suppress(OSError):
                    os.write(self._master, eof_char(self._master))
                self._stdin = -1
            else:
                self._close_stdin()

    def _drop_stdin(self) -> None:
        dropped = sum(len(chunk) for chunk in self._stdin_queue)
        self._close_stdin()
        if dropped:
            self._link.stdin_consumed(dropped)

    def _close_stdin(self) -> None:
        self._stdin_queue.clear()
        self._stdin_end = True
        if self._stdin < 0:
            return
        if self._stdin_writing:
            self._loop.remove_writer(self._stdin)
            self._stdin_writing = False
        if self._stdin != self._master:
            os.close(self._stdin)
        self._stdin = -1

    # -- teardown ------------------------------------------------------------------------

    def _release(self) -> None:
        """Stop every timer, reader and writer, close every fd (the process stays unreaped)."""
        self._release_io()
        self._exit.close()

    def _release_io(self) -> None:
        """Everything :meth:`_release` does except watching for the exit."""
        for timer in (self._deadline, self._kill_timer, self._grace_timer):
            if timer is not None:
                timer.cancel()
        for output in self._outputs:
            if output.reading:
                self._loop.remove_reader(output.fd)
                output.reading = False
            output.closed = True
            self._close_output_fd(output)
        self._close_stdin()
        if self._master >= 0:
            os.close(self._master)
            self._master = -1
        if self._script >= 0:
            os.close(self._script)
            self._script = -1


_PIPE_DEFAULT: Final = 64 * 1024  # what Linux gives a new pipe
_PIPE_MAX: Final = 1024 * 1024  # /proc/sys/fs/pipe-max-size's default
_RESIZE_PIPES: Final = os.geteuid() == 0  # see _size_pipe
# Output arriving in reads at least this large is spliced into the socket from then on: the
# bytes then never enter Python (two copies and an allocation fewer per frame). Smaller
# output is read as it comes, without the extra FIONREAD per read.
_SPLICE_MIN: Final = 16 * 1024


def _pipe_bytes(fd: int) -> int:
    """Bytes waiting in pipe ``fd`` (FIONREAD)."""
    count = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(count, sys.byteorder, signed=True)


def _size_pipe(fd: int, window: int) -> None:
    """Let an output pipe that streams hold up to the stream's window, at most 1 MiB.

    Called once a read of it came back large: a process that writes faster than the agent
    sends leaves a full pipe behind each read, and with Linux's 64 KiB pipe every frame
    carried at most 64 KiB (32 KiB on average), each costing the agent and the host a read,
    a write and their Python. What the pipe holds is output the host has room for anyway
    (the window); its memory is taken only as it is written. Only a root agent does it: the
    kernel charges a pipe's capacity, not its use, to its user's ``pipe-user-pages-soft``
    quota, and an unprivileged user over it gets 8 KiB pipes from then on, for its commands'
    pipelines too (root is not limited). Never below the default; refused, it stays as it is.
    """
    if window > _PIPE_DEFAULT and _RESIZE_PIPES:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(window, _PIPE_MAX))


def _start_process(spec: ExecSpec, shell: str, process: Process) -> subprocess.Popen[bytes]:
    """Fork and exec the process in a new session, wiring its stdio into ``process``."""
    user = spec.user
    env: dict[bytes, bytes] | None = None  # None: the agent's own, as it is (no copy to make)
    if spec.env or user is not None:
        env = dict(os.environb)
        if user is not None and user.name is not None:
            env[b"USER"] = env[b"LOGNAME"] = os.fsencode(user.name)
            if user.home is not None:
                env[b"HOME"] = os.fsencode(user.home)
        env.update(spec.env)
    child_fds: list[int] = []  # the child's ends, closed here once it has them
    preexec: Callable[[], None] | None = None
    pass_fds: tuple[int, ...] = ()
    try:
        if spec.argv is not None:
            argv = list(spec.argv)
        else:
            assert spec.command is not None
            # Another user cannot open the agent's /proc/PID/fd: hand that child the memfd.
            argv, process._script = shell_argv(shell, spec.command, inherited=user is not None)
            if user is not None and process._script >= 0:
                pass_fds = (process._script,)
        if spec.pty is not None:
            master, slave = open_pty(*spec.pty)
            process._master = master
            child_fds.append(slave)
            if user is not None:
                os.fchown(slave, user.uid, -1)
            stdin: int = slave
            stdout: int = slave
            stderr: int = slave
            preexec = take_terminal
            process._outputs = [_Output(STDOUT, master), _Output(STDERR, -1)]
            if spec.stdin:
                process._stdin = master
        else:
            stdin = subprocess.DEVNULL
            if spec.stdin:
                stdin, process._stdin = os.pipe()
                child_fds.append(stdin)
                os.set_blocking(process._stdin, False)
            out_read, stdout = os.pipe()
            child_fds.append(stdout)
            process._outputs = [_Output(STDOUT, out_read, pipe=True)]
            if spec.stderr == "pipe":
                err_read, stderr = os.pipe()
                child_fds.append(stderr)
                process._outputs.append(_Output(STDERR, err_read, pipe=True))
            else:
                stderr = subprocess.STDOUT if spec.stderr == "stdout" else subprocess.DEVNULL
                process._outputs.append(_Output(STDERR, -1))
            for output in process._outputs:
                if output.fd >= 0:
                    os.set_blocking(output.fd, False)
        try:
            return subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cwd=spec.cwd,
                env=env,
                start_new_session=True,
                user=None if user is None else user.uid,
                group=None if user is None else user.gid,
                extra_groups=None if user is None else list(user.groups),
                preexec_fn=preexec,
                pass_fds=pass_fds,
            )
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0)
            program = os.fsdecode(argv[0])
            what = os.fsdecode(exc.filename) if exc.filename else program
            raise Refused(
                "spawn_failed", f"cannot start {program}: {exc.strerror} ({what})", name
            ) from None
        except subprocess.SubprocessError as exc:
            raise Refused("spawn_failed", f"cannot start {os.fsdecode(argv[0])}: {exc}") from None
    except OSError as exc:  # no pipe, pty or memfd to be had (EMFILE, ENOSPC, ...)
        process._release_io()
        name = errno.errorcode.get(exc.errno or 0)
        raise Refused("spawn_failed", f"cannot set up the process: {exc.strerror}", name) from None
    except BaseException:
        process._release_io()
        raise
    finally:
        for fd in child_fds:
            os.close(fd)


def signal_session(session: int, signum: int) -> None:
    """Send ``signum`` to every process group of ``session``.

    The session's own group first; then any group a process of the session made
    (job control in a shell on a terminal), found in /proc. A process that left
    the session (``setsid``) is out of reach.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(session, signum)
    for group in _other_groups(session):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)


def _other_groups(session: int) -> set[int]:
    groups: set[int] = set()
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return groups
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session and int(fields[2]) != session:
            groups.add(int(fields[2]))
    return groups

"""``Process``: one process in the guest over a protocol v2 stream, shaped like
``asyncio.subprocess.Process``.

``proc.stdout`` and ``proc.stderr`` are :class:`ProcessReader` objects (the
reading half of ``asyncio.StreamReader``); ``proc.stdin`` is a
:class:`ProcessWriter` (the writing half of ``asyncio.StreamWriter``). Each
output channel holds at most ``limit`` bytes the application has not read yet:
that is the credit the host grants the agent, returned as the application
reads. A reader nobody reads therefore stalls only its own process (which
blocks writing to a full pipe), never the other streams of the connection.

The wire side lives in :mod:`vsock_async.host.session`; this module only keeps
what the application sees.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import shlex
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol, TypedDict, Unpack

from ..errors import (
    CommandTimeout,
    ConnectionClosed,
    SpawnFailed,
    StdinClosed,
    UsageError,
    VsockAsyncError,
)
from ..protocol.v1_host import copy_error
from ..protocol.v2 import Channel
from ..results import CommandResult
from ..timeouts import check_timeout, deadline_after
from .commandline import shown_command

if TYPE_CHECKING:
    from .session import SessionConnection

__all__ = [
    "DEFAULT_LIMIT",
    "DEVNULL",
    "PIPE",
    "STDOUT",
    "Process",
    "ProcessReader",
    "ProcessWriter",
]

PIPE: Final = subprocess.PIPE
"""Connect the stream to the host: ``proc.stdin``, ``proc.stdout`` or ``proc.stderr``."""
STDOUT: Final = subprocess.STDOUT
"""``stderr=STDOUT``: merge the process's stderr into its stdout."""
DEVNULL: Final = subprocess.DEVNULL
"""Give the process ``/dev/null`` (stdin, stderr) or drop what it writes (stdout)."""

DEFAULT_LIMIT: Final = 256 * 1024
"""Bytes of unread output the host holds per channel: the credit window granted the agent."""
_MAX_WINDOW: Final = 2**31 - 1
_MAX_TERMINAL: Final = 0xFFFF
_MAX_SIGNAL: Final = 64

_RUN_WINDOW: Final = 4 * 1024 * 1024
"""The output credit of a run(): what it captures is consumed as it arrives (and cut at the
caps), so a wide window costs no memory and saves WINDOW frames."""
_INLINE_COMMAND: Final = 64 * 1024
"""run() sends a longer command line on stdin, to a shell that reads it whole, then runs it."""
_COMMAND_FROM_STDIN: Final = 'eval "$(cat)" </dev/null'
"""The whole script is read before the redirection applies: the script's stdin is /dev/null."""

ProgramLike = str | bytes | Sequence[str | bytes | os.PathLike[str] | os.PathLike[bytes]]


class ProcessOptions(TypedDict, total=False):
    """The keyword arguments of ``create_process()``: see :meth:`GuestChannel.create_process`."""

    stdin: int
    stdout: int
    stderr: int | None
    env: Mapping[str | bytes, str | bytes] | None
    cwd: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None
    user: str | int | None
    pty: tuple[int, int] | None
    timeout: float | None
    limit: int


# -- output -------------------------------------------------------------------------------


class ProcessReader:
    """The stdout or stderr of a guest process, read like ``asyncio.StreamReader``.

    It holds at most ``limit`` unread bytes; credit goes back to the agent as
    they are read, so output keeps flowing exactly as fast as it is consumed.
    A line longer than ``limit`` cannot be held whole: :meth:`readuntil` raises
    ``asyncio.LimitOverrunError`` and :meth:`readline` ``ValueError``, as
    asyncio's reader does past its ``limit``.
    """

    def __init__(self, limit: int, grant: Callable[[int], None]) -> None:
        self._limit = limit
        self._grant = grant
        # Credit is returned in batches of half a window, and before waiting whenever the
        # agent may have less than a batch left, so it never waits on credit held back.
        self._batch = max(1, limit // 2)
        self._ungranted = 0
        self._buffer = bytearray()
        self._eof = False
        self._discarding = False
        self._error: VsockAsyncError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        state = "eof" if self._eof else "error" if self._error else "open"
        return f"<ProcessReader {state} buffered={len(self._buffer)} limit={self._limit}>"

    # -- fed by the connection ------------------------------------------------------------

    def _feed(self, data: bytes | memoryview, end: bool) -> None:
        if data:
            if self._discarding:
                self._grant(len(data))
            else:
                self._buffer += data
        if end:
            self._eof = True
        self._wake()

    def _fail(self, error: VsockAsyncError) -> None:
        if not self._eof and self._error is None:
            self._error = error
            self._wake()

    def _discard(self) -> None:
        """Drop what is held and what still arrives (the process is being closed)."""
        self._discarding = True
        self._buffer.clear()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- reading --------------------------------------------------------------------------

    def at_eof(self) -> bool:
        """True when everything has been read and the process closed the channel."""
        return self._eof and not self._buffer

    def _consume(self, n: int) -> bytes:
        with memoryview(self._buffer) as view:
            data = bytes(view[:n])
        del self._buffer[:n]
        self._ungranted += n
        if self._ungranted >= self._batch and not self._eof:
            self._return_credit()
        return data

    def _return_credit(self) -> None:
        if self._ungranted and not self._eof:
            self._grant(self._ungranted)
        self._ungranted = 0

    async def _wait_for_data(self, what: str) -> None:
        """Wait for more bytes or the end; raise the connection's error if it ended first."""
        if self._eof:
            return
        if self._error is not None:
            raise copy_error(self._error)
        if self._waiter is not None:
            raise UsageError(f"{what}() called while another coroutine is reading this stream")
        if self._limit - len(self._buffer) - self._ungranted < self._batch:
            self._return_credit()  # what the agent may still send is below a batch
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None and not self._buffer:
            raise copy_error(self._error)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (at least one, unless at the end: ``b""``); ``n < 0`` reads to EOF."""
        if n == 0:
            return b""
        if n < 0:
            chunks = []
            while True:
                if self._buffer:
                    chunks.append(self._consume(len(self._buffer)))
                elif self._eof:
                    return b"".join(chunks)
                else:
                    await self._wait_for_data("read")
        while not self._buffer and not self._eof:
            await self._wait_for_data("read")
        return self._consume(min(n, len(self._buffer)))

    async def readinto(self, buffer: Any) -> int:
        """Read up to ``len(buffer)`` bytes into ``buffer``; 0 at the end."""
        view = memoryview(buffer).cast("B")
        if not view:
            return 0
        while not self._buffer and not self._eof:
            await self._wait_for_data("readinto")
        n = min(len(view), len(self._buffer))
        with memoryview(self._buffer) as held:
            view[:n] = held[:n]
        del self._buffer[:n]
        self._ungranted += n
        if self._ungranted >= self._batch:
            self._return_credit()
        return n

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; ``asyncio.IncompleteReadError`` if the end comes first."""
        if n < 0:
            raise UsageError(f"readexactly() needs n >= 0, not {n}")
        chunks = []
        missing = n
        while missing:
            if self._buffer:
                chunk = self._consume(min(missing, len(self._buffer)))
                chunks.append(chunk)
                missing -= len(chunk)
            elif self._eof:
                raise asyncio.IncompleteReadError(b"".join(chunks), n)
            else:
                await self._wait_for_data("readexactly")
        return b"".join(chunks)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Bytes up to and including ``separator``.

        At the end without it: ``asyncio.IncompleteReadError`` holding the rest.
        When ``limit`` bytes are held without it: ``asyncio.LimitOverrunError``,
        the bytes left in place.
        """
        if not separator:
            raise UsageError("readuntil() needs a non-empty separator")
        start = 0
        while True:
            found = self._buffer.find(separator, start)
            if found >= 0:
                return self._consume(found + len(separator))
            if self._eof:
                rest = self._consume(len(self._buffer))
                raise asyncio.IncompleteReadError(rest, None)
            if len(self._buffer) >= self._limit:
                raise asyncio.LimitOverrunError(
                    f"no {separator!r} in the {len(self._buffer)} bytes held (limit {self._limit})",
                    len(self._buffer),
                )
            start = max(0, len(self._buffer) - len(separator) + 1)
            await self._wait_for_data("readuntil")

    async def readline(self) -> bytes:
        """One line, ``\\n`` included; the rest without one at the end; ``b""`` after it.

        ``ValueError`` (its bytes dropped) for a line longer than ``limit``.
        """
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        except asyncio.LimitOverrunError as exc:
            self._consume(len(self._buffer))
            raise ValueError(str(exc)) from None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line


class _Capture:
    """An output channel of :meth:`run`: keeps the first ``cap`` bytes and drops the rest,
    returning credit as it arrives (in batches of a quarter ``window``), so a large output
    costs no more memory than the cap.

    The bytes kept go straight into one ``BytesIO`` as they arrive: its buffer grows in
    place, and :meth:`value` hands that buffer over as the result, so the output is held
    once (a list of chunks joined at the end would hold it twice, and the chunks' heap
    memory would not go back to the system before the result is built).
    """

    def __init__(self, cap: int, grant: Callable[[int], None], window: int) -> None:
        self._room = cap
        self._grant = grant
        self._batch = max(1, window // 4)
        self._ungranted = 0
        self._kept = io.BytesIO()
        self.truncated = False

    def _feed(self, data: bytes | memoryview, end: bool) -> None:
        if data:
            kept = min(self._room, len(data))
            if kept:
                self._kept.write(data if kept == len(data) else data[:kept])
                self._room -= kept
            if kept < len(data):
                self.truncated = True
            self._ungranted += len(data)
            if not end and self._ungranted >= self._batch:
                self._grant(self._ungranted)
                self._ungranted = 0

    def _fail(self, error: VsockAsyncError) -> None:
        pass

    def _discard(self) -> None:
        pass

    def value(self) -> bytes:
        """The bytes kept: the buffer itself, trimmed in place, not a copy."""
        return self._kept.getvalue()


# -- input --------------------------------------------------------------------------------


class _Writable(Protocol):
    async def writable(self) -> None: ...


class StdinOwner(Protocol):
    """The stream a :class:`ProcessWriter` feeds: a process's stdin, a put's bytes, or the
    stdin messages of a process streamed through ``serve``.

    ``_connection.writable()`` returns once what was handed over has left.
    """

    @property
    def _connection(self) -> _Writable: ...

    def _send_stdin(self, data: bytes, end: bool) -> int: ...

    def _stdin_credit(self) -> int: ...


class ProcessWriter:
    """The stdin of a guest process, written like ``asyncio.StreamWriter``.

    :meth:`write` never blocks: what the agent has no credit for yet waits
    here, and :meth:`drain` waits until it has all gone out. Call
    :meth:`write_eof` (or :meth:`close`) so the process sees the end of its input.
    """

    def __init__(self, process: StdinOwner) -> None:
        self._process = process
        self._pending = bytearray()
        self._eof = False  # write_eof() called
        self._end_sent = False
        self._gone: VsockAsyncError | None = None  # the stream or connection ended
        self._waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        state = "closed" if self._end_sent else "closing" if self._eof else "open"
        return f"<ProcessWriter {state} pending={len(self._pending)}>"

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for the process's stdin; it goes out as the agent grants credit."""
        if self._eof:
            raise UsageError("write() after write_eof() or close() on a process's stdin")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise UsageError(f"stdin takes bytes, not {type(data).__name__}")
        if not data:
            return
        if self._pending or self._gone is not None:
            self._pending += data
            return
        # Nothing waits: hand it over without copying what the credit covers.
        chunk = data if isinstance(data, bytes) else bytes(data)
        accepted = self._process._send_stdin(chunk, False)
        if accepted < len(chunk):
            self._pending += memoryview(chunk)[accepted:]

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        """Queue each buffer of ``data`` in turn."""
        for chunk in data:
            self.write(chunk)

    def write_eof(self) -> None:
        """Close the process's stdin once what is queued has gone out."""
        if self._eof:
            return
        self._eof = True
        self._flush()

    def can_write_eof(self) -> bool:
        """Always True: a process's stdin can be closed on its own."""
        return True

    def close(self) -> None:
        """The same as :meth:`write_eof`, as closing a pipe is."""
        self.write_eof()

    def is_closing(self) -> bool:
        """True once :meth:`write_eof` or :meth:`close` was called, or the process ended."""
        return self._eof or self._gone is not None

    async def drain(self) -> None:
        """Wait until everything written has gone to the agent.

        Raises :class:`StdinClosed` (a ``BrokenPipeError``) if the process ended
        with bytes still queued, and the connection's error if it closed.
        """
        while True:
            if self._gone is not None:
                if self._pending or isinstance(self._gone, ConnectionClosed):
                    self._pending.clear()
                    raise copy_error(self._gone)
                return
            if not self._pending:
                await self._process._connection.writable()
                return
            await self._wait()

    async def wait_closed(self) -> None:
        """Wait until the end of input has gone out (after :meth:`close`)."""
        while not self._end_sent and self._gone is None:
            await self._wait()

    async def _wait(self) -> None:
        if self._waiter is not None:
            raise UsageError("drain() called while another coroutine is draining this stdin")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- driven by the process ------------------------------------------------------------

    def _flush(self) -> None:
        """Hand the agent what its credit allows; the end of input after the last byte."""
        if self._gone is not None or self._end_sent:
            return
        pending = self._pending
        if pending:
            n = min(len(pending), self._process._stdin_credit())
            if n:
                with memoryview(pending) as view:
                    chunk = bytes(view[:n])
                last = self._eof and n == len(pending)
                accepted = self._process._send_stdin(chunk, last)
                del pending[:accepted]
                self._end_sent = last and accepted == n
        elif self._eof:
            self._process._send_stdin(b"", True)
            self._end_sent = True
        if not pending:
            self._wake()

    def _ended(self, why: VsockAsyncError) -> None:
        if self._gone is None:
            self._gone = why
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


# -- the process ----------------------------------------------------------------------------


class Signalling:
    """``terminate()`` and ``kill()`` over a process's own ``send_signal()``, as on
    ``asyncio.subprocess.Process``: shared by :class:`Process` and the control API's
    remote process."""

    def send_signal(self, sig: int) -> None:
        raise NotImplementedError

    def terminate(self) -> None:
        """Send ``SIGTERM``."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send ``SIGKILL``."""
        self.send_signal(signal.SIGKILL)


class Process(Signalling):
    """A process running in the guest, on one stream of a v2 connection.

    Shaped like ``asyncio.subprocess.Process``: :attr:`pid`, :attr:`returncode`
    (``-N`` when signal N killed it), :meth:`wait`, :meth:`communicate`,
    :meth:`send_signal`, :meth:`terminate`, :meth:`kill`; plus
    :attr:`exit_signal`, :attr:`timed_out` (its own ``timeout`` ran out),
    :attr:`output_incomplete` (a background child held its output open and
    was killed) and :meth:`resize` for a terminal. ``async with`` stops it
    (:meth:`aclose`) if it is still running on the way out.

    Create it with :meth:`Guest.create_process` or :meth:`GuestChannel.create_process`.
    """

    def __init__(
        self,
        connection: SessionConnection,
        *,
        stdin: bool,
        stdout: int,
        stderr: int | None,
        pty: bool,
        limit: int,
        capture: tuple[int, int] | None = None,
    ) -> None:
        self._connection = connection
        self._pty = pty
        self.stream = 0
        """The stream id of this process on its connection."""
        self.pid: int | None = None
        """The process id in the guest (its process group id too)."""
        self.returncode: int | None = None
        """The exit code, ``-N`` if signal N killed it, None while it runs."""
        self.exit_signal: int | None = None
        """The number of the signal that killed it, or None."""
        self.timed_out = False
        """True if its own ``timeout`` ran out and the agent stopped it."""
        self.output_incomplete = False
        """True if its output may be cut: a background child held the pipes open at exit."""
        self.stdin: ProcessWriter | None = ProcessWriter(self) if stdin else None
        out_grant, err_grant = self._grant(Channel.STDOUT), self._grant(Channel.STDERR)
        self._out: ProcessReader | _Capture
        self._err: ProcessReader | _Capture | None
        if capture is not None:  # run(): keep up to the caps, drop the rest
            self._out = _Capture(capture[0], out_grant, limit)
            self._err = _Capture(capture[1], err_grant, limit)
        else:
            self._out = (
                ProcessReader(limit, out_grant) if stdout == PIPE else _Capture(0, out_grant, limit)
            )
            self._err = ProcessReader(limit, err_grant) if stderr == PIPE else None
        self.stdout: ProcessReader | None = (
            self._out if isinstance(self._out, ProcessReader) else None
        )
        """The process's stdout (with ``stdout=PIPE``), or None."""
        self.stderr: ProcessReader | None = (
            self._err if isinstance(self._err, ProcessReader) else None
        )
        """The process's stderr (with ``stderr=PIPE`` and no ``pty``), or None."""
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[None] = loop.create_future()
        self._exited: asyncio.Future[int] = loop.create_future()
        self._closing = False

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"returncode={self.returncode}"
        return f"<Process stream={self.stream} pid={self.pid} {state}>"

    # -- what the application calls -------------------------------------------------------

    async def wait(self) -> int:
        """Wait for the process to end; its :attr:`returncode`.

        As with asyncio: a process writing more than ``limit`` bytes that nobody
        reads never ends (it blocks on its full pipe); use :meth:`communicate`.
        Raises :class:`ConnectionClosed` if the connection goes first.
        """
        return await asyncio.shield(self._exited)

    async def communicate(self, input: bytes | None = None) -> tuple[bytes | None, bytes | None]:
        """Send ``input`` (then EOF) to stdin, read stdout and stderr to the end, wait for exit.

        Returns ``(stdout, stderr)``; None for a stream that is not ``PIPE``.
        """
        return await communicate(self, input)

    def send_signal(self, sig: int) -> None:
        """Deliver signal ``sig`` to the process group (a terminal's foreground group).

        Does nothing once the process has ended, like ``subprocess.Popen``.
        """
        if isinstance(sig, bool) or not isinstance(sig, int) or not 0 < sig <= _MAX_SIGNAL:
            raise UsageError(f"a signal is a number in 1..{_MAX_SIGNAL}, not {sig!r}")
        self._connection.require("signal", "send a signal to a process")
        if self.returncode is None and not self._exited.done():
            self._connection.send_signal(self.stream, int(sig))

    async def resize(self, rows: int, cols: int) -> None:
        """Set the size of the process's terminal (``pty=``); it gets ``SIGWINCH``."""
        if not self._pty:
            raise UsageError("resize() needs a process started with pty=(rows, cols)")
        check_terminal_size(rows, cols)
        self._connection.require("resize", "resize a terminal")
        if self.returncode is None and not self._exited.done():
            self._connection.send_resize(self.stream, rows, cols)
            await self._connection.writable()

    async def aclose(self) -> None:
        """Stop the process if it still runs and wait until it is gone.

        The agent sends ``SIGTERM`` to its group, ``SIGKILL`` after a grace, and
        drops its remaining output. A lost connection counts as gone (the agent
        kills the processes of a connection that drops).
        """
        if not self._exited.done():
            self._give_up()
        with contextlib.suppress(ConnectionClosed):
            await self.wait()

    async def __aenter__(self) -> Process:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- driven by the connection ---------------------------------------------------------

    def _give_up(self) -> None:
        """Send CLOSE (once) and drop output; the stream still ends with its EXIT."""
        if self._closing or (self._exited.done() and not self._exited.cancelled()):
            return  # (run() awaits the exit unshielded: a cancel of run() cancels it)
        self._closing = True
        for reader in (self._out, self._err):
            if reader is not None:
                reader._discard()
        if self.stream:
            self._connection.send_close(self.stream)

    def _result(self, timed_out: bool = False) -> CommandResult:
        """What :meth:`run` returns: the captured output and the exit as v1 reports it."""
        out, err = self._out, self._err
        assert isinstance(out, _Capture) and isinstance(err, _Capture)
        code = self.returncode
        if timed_out or code is None:
            exit_code = None
        elif self.exit_signal is not None:
            exit_code = 128 + self.exit_signal  # as a shell reports it, and v1 carries it
        else:
            exit_code = code
        return CommandResult(
            out.value(),
            err.value(),
            exit_code,
            timed_out=timed_out,
            exit_signal=None if timed_out else self.exit_signal,
            stdout_truncated=out.truncated,
            stderr_truncated=err.truncated,
        )

    def _grant(self, channel: Channel) -> Callable[[int], None]:
        def grant(n: int) -> None:
            if not self._exited.done():
                self._connection.grant(self.stream, channel, n)

        return grant

    def _send_stdin(self, data: bytes, end: bool) -> int:
        return self._connection.send_stdin(self.stream, data, end)

    def _stdin_credit(self) -> int:
        return self._connection.stdin_credit(self.stream)

    def _on_started(self, pid: int) -> None:
        self.pid = pid
        if not self._started.done():
            self._started.set_result(None)

    def _on_output(self, channel: Channel, data: bytes | memoryview, end: bool) -> None:
        reader = self._out if channel == Channel.STDOUT else self._err
        if reader is not None:
            reader._feed(data, end)

    def _on_stdin_credit(self) -> None:
        if self.stdin is not None:
            self.stdin._flush()

    def _on_exit(
        self, exit_code: int | None, signum: int | None, timed_out: bool, incomplete: bool
    ) -> None:
        self.exit_signal = signum
        self.returncode = exit_code if exit_code is not None else -(signum or 0)
        self.timed_out = timed_out
        self.output_incomplete = incomplete
        if self.stdin is not None:
            self.stdin._ended(
                StdinClosed(
                    f"{'the process' if self.pid is None else f'process {self.pid}'} in the guest"
                    " has exited; its stdin is closed"
                )
            )
        if not self._exited.done():  # cancelled: run() gave up on it as it ended
            self._exited.set_result(self.returncode)

    def _on_error(self, error: SpawnFailed) -> None:
        """The agent refused the EXEC: nothing started, the stream is over."""
        self._end(error)
        self._started.set_exception(error)
        _retrieve(self._started)  # run() waits only for the exit
        if not self._exited.done():  # cancelled: run() gave up on it
            self._exited.set_exception(copy_error(error))
            _retrieve(self._exited)
        self._fail_readers(error)

    def _on_connection_lost(self, error: VsockAsyncError) -> None:
        self._end(error)
        if not self._started.done():
            self._started.set_exception(copy_error(error))
            _retrieve(self._started)
        if not self._exited.done():
            self._exited.set_exception(copy_error(error))
            _retrieve(self._exited)
        self._fail_readers(error)

    def _end(self, why: VsockAsyncError) -> None:
        if self.stdin is not None:
            self.stdin._ended(why)

    def _fail_readers(self, error: VsockAsyncError) -> None:
        for reader in (self._out, self._err):
            if reader is not None:
                reader._fail(error)


class _Communicating(Protocol):
    """What :func:`communicate` needs of a process: its three streams and its end."""

    @property
    def stdin(self) -> ProcessWriter | None: ...
    @property
    def stdout(self) -> ProcessReader | None: ...
    @property
    def stderr(self) -> ProcessReader | None: ...
    async def wait(self) -> int: ...


async def communicate(
    process: _Communicating, input: bytes | None
) -> tuple[bytes | None, bytes | None]:
    """``communicate()`` of :class:`Process` and of the control API's remote process: send
    ``input`` and EOF, read stdout and stderr to the end (at once: neither can block the
    other), wait for the exit."""
    stdin = process.stdin
    if input is not None and stdin is None:
        raise UsageError("communicate(input) needs stdin=PIPE")

    async def feed() -> None:
        if stdin is None:
            return
        try:
            if input:
                stdin.write(input)
            stdin.close()
            await stdin.drain()
        except StdinClosed:
            pass  # the process ended without reading it all, as asyncio's communicate allows

    async def read_all(reader: ProcessReader | None) -> bytes | None:
        return None if reader is None else await reader.read()

    feeding = asyncio.ensure_future(feed())
    try:
        stdout, stderr = await asyncio.gather(read_all(process.stdout), read_all(process.stderr))
        await feeding
    finally:
        if not feeding.done():
            feeding.cancel()
    await process.wait()
    return stdout, stderr


async def start_process(
    connection: SessionConnection, program: ProgramLike, **options: Unpack[ProcessOptions]
) -> Process:
    """Start ``program`` on a new stream; see :meth:`GuestChannel.create_process`."""
    request = exec_request(program, **options)
    connection.require("exec", "start processes")
    if "pty" in request:
        connection.require("pty", "open a terminal (pty=)")
    if "user" in request:
        connection.require("user", "run a process as another user (user=; the agent is not root)")
    size = _argv_bytes(request)
    most = connection.agent.limits.max_argv_bytes
    if size > most:
        raise UsageError(
            f"the program, its arguments and env take {size} bytes, more than the guest agent's"
            f" limit of {most} (max_argv_bytes): pass large data on stdin instead"
        )
    process = Process(
        connection,
        stdin=request["stdin"],
        stdout=options.get("stdout", PIPE),
        stderr=PIPE if request.get("stderr") == "pipe" else None,
        pty="pty" in request,
        limit=request["window"],
    )
    timeout = request.get("timeout")
    deadline = deadline_after(timeout)
    try:
        async with asyncio.timeout_at(deadline):
            await connection.open(process, request, deadline)
    except TimeoutError:
        sent = process.stream != 0  # a cancel after sending already sent CLOSE
        if sent:
            where = f"timed out after {timeout:.3g} s; it was stopped before it started"
        elif timeout:
            where = f"timed out after {timeout:.3g} s waiting for a free stream; never sent"
        else:
            where = "was given no time and was never sent"
        raise CommandTimeout(
            f"process {shown_command(program_line(program))} {where}",
            CommandResult(b"", b"", None, timed_out=True),
            sent=sent,
        ) from None
    return process


def program_line(program: ProgramLike) -> bytes:
    """``program`` as one line, for messages: a command line as it is, argv quoted."""
    if isinstance(program, str | bytes):
        return os.fsencode(program)
    return os.fsencode(shlex.join(os.fsdecode(a) for a in program))


async def run_command(
    connection: SessionConnection, line: bytes, timeout: float | None, channel: int
) -> CommandResult:
    """``run()`` on v2: ``line`` by the guest's ``/bin/sh -c`` on a stream of its own.

    Output is kept up to the host's limits and the rest dropped (the result
    says which stream was cut). The deadline, or a cancel, stops this process
    only (CLOSE: its group is killed in the guest); the connection stays open.
    """
    limits = connection.limits
    shown = line if len(line) <= 60 else line[:57] + b"..."
    if timeout is not None and timeout <= 0:  # no time to send it: never put it on the wire
        raise CommandTimeout(
            f"command {shown!r} was given no time and was never sent",
            CommandResult(b"", b"", None, timed_out=True),
            sent=False,
        )
    # An EXEC must fit in one frame and the agent's max_argv_bytes (the line, and its NUL):
    # a longer command line goes to the shell on stdin instead.
    inline = len(line) < min(_INLINE_COMMAND, connection.agent.limits.max_argv_bytes)
    if not inline and b"\0" in line:
        raise UsageError("a command holds a NUL byte, which no shell can receive")
    process = Process(
        connection,
        stdin=not inline,
        stdout=PIPE,
        stderr=PIPE,
        pty=False,
        limit=_RUN_WINDOW,
        capture=(limits.max_stdout, limits.max_stderr),
    )
    request: dict[str, Any] = {
        "command": _wire_string(line, "command") if inline else _COMMAND_FROM_STDIN,
        "stdin": not inline,
        "stderr": "pipe",
        "window": _RUN_WINDOW,
    }
    if "brief" in connection.agent.capabilities:
        request["brief"] = True  # no STARTED, no END: one frame back for a silent command
    try:
        async with asyncio.timeout(timeout):
            await connection.send_exec(process, request)  # the exit tells all; STARTED adds nothing
            if process.stdin is not None:
                process.stdin.write(line)
                process.stdin.write_eof()
            # Only run() knows this process, so it awaits the exit itself rather than through
            # wait()'s shield (one loop turn fewer); a cancel cancels it, and _give_up sees that.
            await process._exited
    except TimeoutError:
        sent = process.stream != 0
        process._give_up()
        where = (
            f"its process was stopped; channel {channel} stays open"
            if sent
            else f"it was never sent (it waited for a free stream on channel {channel})"
        )
        raise CommandTimeout(
            f"command {shown!r} timed out after {timeout:.3g} s; {where}",
            process._result(timed_out=True),
            sent=sent,
        ) from None
    except asyncio.CancelledError:
        process._give_up()
        raise
    return process._result()


def _argv_bytes(request: Mapping[str, Any]) -> int:
    """What the agent counts against ``max_argv_bytes``: each string plus a NUL."""

    def size(value: Any) -> int:
        if isinstance(value, str):
            return len(value.encode()) + 1
        return len(base64.b64decode(value["b64"])) + 1

    total = sum(size(a) for a in request.get("argv", ()))
    if "command" in request:
        total += size(request["command"])
    for key, value in request.get("env", {}).items():
        total += size(key) + size(value)
    return total


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: nobody may ever await it."""
    if not future.cancelled():
        future.exception()


# -- building the request -------------------------------------------------------------------


def exec_request(
    program: ProgramLike,
    *,
    stdin: int = DEVNULL,
    stdout: int = PIPE,
    stderr: int | None = None,
    env: Mapping[str | bytes, str | bytes] | None = None,
    cwd: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None = None,
    user: str | int | None = None,
    pty: tuple[int, int] | None = None,
    timeout: float | None = None,
    limit: int = DEFAULT_LIMIT,
) -> dict[str, Any]:
    """The EXEC request of ``create_process()``'s arguments (their defaults are these),
    checked; :class:`UsageError` for a bad one."""
    request: dict[str, Any] = {}
    if isinstance(program, str | bytes):
        if not program:
            raise UsageError("a command must not be empty")
        request["command"] = _wire_string(program, "command")
    elif isinstance(program, list | tuple) and program:
        request["argv"] = [_wire_string(os.fspath(a), "argument") for a in program]
    else:
        raise UsageError(
            f"a program is str or bytes (run by /bin/sh -c) or a non-empty list of arguments,"
            f" not {program!r}"
        )
    if stdin not in (PIPE, DEVNULL):
        raise UsageError(f"stdin must be PIPE or DEVNULL, not {stdin!r}")
    if stdout not in (PIPE, DEVNULL):
        raise UsageError(f"stdout must be PIPE or DEVNULL, not {stdout!r}")
    request["stdin"] = stdin == PIPE
    if pty is not None:
        if stderr not in (None, STDOUT):
            raise UsageError("a terminal merges stderr into stdout: leave stderr unset with pty")
        if not isinstance(pty, tuple) or len(pty) != 2:
            raise UsageError(f"pty must be (rows, cols), not {pty!r}")
        check_terminal_size(*pty)
        request["pty"] = {"rows": pty[0], "cols": pty[1]}
    elif stderr in (None, PIPE):
        request["stderr"] = "pipe"
    elif stderr == STDOUT:
        request["stderr"] = "stdout"
    elif stderr == DEVNULL:
        request["stderr"] = "null"
    else:
        raise UsageError(f"stderr must be PIPE, STDOUT or DEVNULL, not {stderr!r}")
    if env is not None:
        if not isinstance(env, Mapping):
            raise UsageError(f"env must be a mapping of names to values, not {env!r}")
        request["env"] = {_env_name(k): _wire_string(v, f"env[{k!r}]") for k, v in env.items()}
    if cwd is not None:
        path = os.fspath(cwd)
        if not path:
            raise UsageError("cwd must not be empty")
        request["cwd"] = _wire_string(path, "cwd")
    if user is not None:
        if isinstance(user, bool) or not isinstance(user, str | int):
            raise UsageError(f"user is a name or a uid, not {user!r}")
        if (isinstance(user, int) and user < 0) or user == "":
            raise UsageError(f"user is a name or a uid >= 0, not {user!r}")
        request["user"] = user
    if timeout is not None:
        request["timeout"] = check_timeout(timeout)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= _MAX_WINDOW:
        raise UsageError(f"limit must be a number of bytes in 1..{_MAX_WINDOW}, not {limit!r}")
    request["window"] = limit
    return request


def _wire_string(value: str | bytes, what: str) -> str | dict[str, str]:
    """A string field of the request: JSON text, or ``{"b64": ...}`` for bytes not UTF-8."""
    if isinstance(value, str):
        try:
            encoded = value.encode("utf-8")
        except UnicodeEncodeError:
            try:  # undecodable bytes of os.fsdecode go back out as they came
                encoded = value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raise UsageError(f"{what} {value!r} holds a lone surrogate; pass bytes") from None
            return {"b64": base64.b64encode(encoded).decode("ascii")}
        if "\0" in value:
            raise UsageError(f"{what} {value!r} holds a NUL byte, which no program can receive")
        return value
    if not isinstance(value, bytes):
        raise UsageError(f"{what} must be str or bytes, not {value!r}")
    if b"\0" in value:
        raise UsageError(f"{what} {value!r} holds a NUL byte, which no program can receive")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(value).decode("ascii")}


def _env_name(name: str | bytes) -> str | dict[str, str]:
    if not name or (b"=" in name if isinstance(name, bytes) else "=" in name):
        raise UsageError(f"environment variable name {name!r} is empty or holds '='")
    return _wire_string(name, "environment variable name")


def check_terminal_size(rows: object, cols: object) -> None:
    """UsageError unless ``rows`` and ``cols`` make a terminal size (each 1..65535)."""
    for what, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_TERMINAL:
            raise UsageError(f"terminal {what} must be an int in 1..{_MAX_TERMINAL}, not {value!r}")

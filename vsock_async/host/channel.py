"""``GuestChannel``: run commands, probes, processes and file transfers on one guest
connection, with deadlines.

A channel speaks whatever its connection agreed on (:attr:`GuestChannel.protocol`):
on v1 calls take turns and a deadline on the wire closes the channel; on v2 each
``run()``, process and file operation has a stream of its own, so they proceed at
once and a deadline or cancel stops only its own.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from types import TracebackType
from typing import Any, Literal, Unpack

from ..errors import (
    ClosedLocally,
    CommandFailed,
    CommandTimeout,
    FrameTooLarge,
    ProbeFailed,
    Unsupported,
    VsockAsyncError,
)
from ..protocol import PROBE_COMMAND, Limits
from ..protocol.v2 import HelloAnswer
from ..results import CommandResult
from ..timeouts import DEFAULT, DEFAULT_TIMEOUT, Timeout, check_timeout
from . import _callbacks, files
from .commandline import CommandLike, compose_command
from .deadlines import Deadlines
from .files import DEFAULT_WINDOW, FileInfo, GuestPath, LocalPath, PutOptions, Source
from .process import Process, ProcessOptions, ProgramLike, run_command, start_process
from .session import SessionConnection
from .transport import GuestConnection

__all__ = ["GuestChannel"]

_ids = itertools.count(1)


def _deadline_of(pending: tuple[float, object]) -> float:
    return pending[0]


class _DeadlinePassed(Exception):
    """Set on an exchange's future when its deadline fires; never leaves the channel.

    ``result`` holds what had arrived; ``was_sent`` says the command was on the wire (and
    the channel was closed) rather than still queued.
    """

    def __init__(self, result: CommandResult, was_sent: bool) -> None:
        self.result = result
        self.was_sent = was_sent


class GuestChannel:
    """One connection to a guest agent, on protocol v1 or v2 (:attr:`protocol`).

    On v1, calls run one at a time, in the order they were made. A call whose
    deadline fires (or that is cancelled) while its command is on the wire
    closes the channel: the stream is out of step and the late result must
    never be read as the answer to the next command. A call that gives up
    while still queued leaves the channel as it was.

    On v2, every call has a stream of its own: up to the agent's
    ``max_streams`` run at once (more wait for a free stream, first come first
    served), and a deadline or cancel stops only that call's process; the
    channel stays open. :meth:`create_process` needs v2.
    """

    def __init__(
        self,
        connection: GuestConnection | SessionConnection,
        *,
        default_timeout: float | None = DEFAULT_TIMEOUT,
        key: Any = None,
        listener: str | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        """``deadlines``: a book shared with other channels (a server's); internal."""
        self._conn = connection
        # Exactly one of the two is set: the protocol the connection agreed on.
        self._v1 = connection if isinstance(connection, GuestConnection) else None
        self._v2 = connection if isinstance(connection, SessionConnection) else None
        self._default_timeout = check_timeout(default_timeout, "default_timeout")
        self.id: int = next(_ids)
        """Unique id of this connection within the process."""
        self.peer: Any = connection.peer
        """The peer address the kernel reported: ``(cid, port)`` on AF_VSOCK."""
        self.key: Any = key
        """The guest this connection belongs to (its CID, or a listener's label)."""
        self.listener = listener
        """The address of the listener that accepted it, or None for an outgoing connection."""
        self.connected_at = time.time()
        self.last_probe: float | None = None
        """When a probe last succeeded on this channel (``time.time()``), or None."""
        self._deadlines = deadlines  # made on the first call with a deadline if not given
        self._valid_timeout: object = None  # the last timeout= that check_timeout() accepted
        # The deadlines (loop.time()) of its v1 calls pending, which its book asks about when
        # its timer fires (deadlines.py): the oldest call's here, any others in a dict made
        # when a second call waits (v1 runs one at a time), so a call costs no entry.
        self._due: asyncio.Future[CommandResult] | None = None
        self._due_at = 0.0
        self._more_due: dict[asyncio.Future[CommandResult], float] | None = None
        self._booked = False  # in its book's watchers (until it says it has none left)
        self._close_watched = False  # _connection_gone() is registered with the connection
        # Told by _connection_gone(), registered with the connection when the first is added
        # (a server adds one to each) or the channel first enters a book.
        self._on_close: _callbacks.Held[GuestChannel] = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "busy" if self.busy else "idle"
        return (
            f"<GuestChannel id={self.id} key={self.key!r} peer={self.peer!r}"
            f" {self.protocol} {state}>"
        )

    # -- state ---------------------------------------------------------------------------

    @property
    def protocol(self) -> Literal["v1", "v2"]:
        """The protocol agreed on this connection: ``"v2"`` after a hello, else ``"v1"``."""
        return "v1" if self._v2 is None else "v2"

    @property
    def agent(self) -> HelloAnswer | None:
        """What the guest's agent announced in its hello (limits, capabilities), or None on v1."""
        return None if self._v2 is None else self._v2.agent

    @property
    def concurrency(self) -> int:
        """Calls the channel runs at once: 1 on v1, the agent's ``max_streams`` on v2."""
        return 1 if self._v2 is None else self._v2.agent.limits.max_streams

    @property
    def closed(self) -> bool:
        """True once the channel can no longer be used."""
        return self._conn.closed

    @property
    def busy(self) -> bool:
        """True when a new call would wait: an exchange is on the wire (v1), or every
        stream the agent allows is taken (v2)."""
        return self._conn.busy

    @property
    def running(self) -> int:
        """Calls, processes and file operations in progress: 0 or 1 on v1, the open streams
        on v2."""
        if self._v2 is None:
            return int(self._conn.busy)
        return self._v2.streams + self._v2.files

    @property
    def queued(self) -> int:
        """Calls waiting to start: behind the one in flight (v1), or for a free stream (v2)."""
        return self._conn.queued

    @property
    def error(self) -> VsockAsyncError | None:
        """Why the channel closed (:class:`ClosedLocally` if we closed it), or None while open."""
        return self._conn.error

    @property
    def limits(self) -> Limits:
        """The longest command it sends and the most stdout and stderr it accepts."""
        return self._conn.limits

    @property
    def bytes_sent(self) -> int:
        """Bytes written to the guest so far."""
        return self._conn.bytes_sent

    @property
    def bytes_received(self) -> int:
        """Bytes read from the guest so far."""
        return self._conn.bytes_received

    @property
    def connection(self) -> GuestConnection | SessionConnection:
        """The underlying protocol object. Internal: use the channel's own methods instead."""
        return self._conn

    def add_close_callback(self, callback: Callable[[GuestChannel], None]) -> None:
        """Call ``callback(channel)`` once, when the connection is gone (at once, via the loop,
        if it already is)."""
        self._watch_close()
        self._on_close = _callbacks.add(self._on_close, callback)

    def _watch_close(self) -> None:
        """Have the connection call _connection_gone() when it is gone (at once, via the loop,
        if it is); once until then."""
        if not self._close_watched:
            self._close_watched = True
            self._conn.add_close_callback(self._connection_gone)

    def _connection_gone(self, _: object) -> None:
        self._close_watched = False
        if self._booked:  # freed now, not when the book's timer next fires
            self._booked = False
            assert self._deadlines is not None
            self._deadlines.discard(self)
        held, self._on_close = self._on_close, None
        for callback in _callbacks.each(held):
            callback(self)

    def abort(self, reason: str) -> None:
        """Close at once, without waiting; pending and queued calls get ``ClosedLocally(reason)``.

        Does nothing if the channel is already closed.
        """
        self._conn.abort(ClosedLocally(reason))

    # -- calls ---------------------------------------------------------------------------

    async def run(
        self,
        command: CommandLike,
        *,
        timeout: Timeout = DEFAULT,
        check: bool = False,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        """Run ``command`` in the guest and return its stdout, stderr and exit code.

        ``command`` is a shell command line (``str`` or ``bytes``) or a list of
        arguments (quoted with ``shlex.join``). ``timeout`` covers the whole
        call, queueing included; ``None`` waits forever. Raises
        :class:`CommandTimeout` when it fires (on v1 with the command on the
        wire it closes the channel; on v2 it stops the process only),
        :class:`CommandFailed` for a non-zero exit with ``check=True``,
        :class:`UsageError` (nothing sent) for a command line longer than
        ``limits.max_command`` (on v2 a line too long for one request goes on stdin),
        :class:`ConnectionLost` or :class:`ProtocolError` when the guest fails,
        :class:`ClosedLocally` when this side closed the channel.
        """
        line = compose_command(command, cwd=cwd, env=env)
        if self._v2 is not None:
            self._conn.limits.check_command(line)
            result = await run_command(self._v2, line, self._resolve(timeout), self.id)
        else:  # v1: the exchange awaited here, not in a coroutine of its own (see _send)
            future = self._send(line, timeout, probe=False)
            try:
                result = await future
            except BaseException as exc:
                self._failed(future, line, timeout, exc)
                raise
            finally:
                if self._due is future and not self._more_due:
                    self._due = None  # _settled(), inline for the usual case
                else:
                    self._settled(future)
        if check and result.exit_code != 0:
            raise CommandFailed(line, result)
        return result

    async def probe(self, *, timeout: Timeout = DEFAULT) -> None:
        """Check the guest is ready: on v1 ``:`` must come back as exit 0 with empty
        output; on v2 the agent must answer a PING (or, if it does not announce ``ping``,
        run ``:`` so, in a process of its own).

        A wrong v1 answer raises :class:`ProbeFailed` and closes the channel. The
        answer may hold no output, so none is buffered: the length prefix of any
        output already fails it, and then :attr:`ProbeFailed.result` is None (no
        whole answer was read). A v2 PING that times out raises
        :class:`CommandTimeout` and leaves the channel open.
        """
        if self._v2 is not None:
            if "ping" in self._v2.agent.capabilities:
                await self._ping(self._v2, self._resolve(timeout))
            else:  # an agent may leave PING out: then ':' in a process of its own
                result = await run_command(self._v2, PROBE_COMMAND, self._resolve(timeout), self.id)
                if result.exit_code != 0 or result.stdout or result.stderr:
                    message = (
                        f"probe ':' on channel {self.id} answered exit code {result.exit_code}"
                        f" with {len(result.stdout)} bytes of stdout and {len(result.stderr)}"
                        " of stderr"
                    )
                    self._conn.abort(ClosedLocally(f"channel closed: {message}"))
                    raise ProbeFailed(message, result)
            self.last_probe = time.time()
            return
        future = self._send(PROBE_COMMAND, timeout, probe=True)
        try:
            result = await future
        except FrameTooLarge as exc:
            message = f"probe ':' on channel {self.id} answered {exc.length} bytes of {exc.what}"
            raise ProbeFailed(message, None) from None
        except BaseException as exc:
            self._failed(future, PROBE_COMMAND, timeout, exc)
            raise
        finally:
            if self._due is future and not self._more_due:
                self._due = None  # _settled(), inline for the usual case
            else:
                self._settled(future)
        if result.exit_code != 0:  # its output is empty: the probe's limits are zero
            message = f"probe ':' on channel {self.id} answered exit code {result.exit_code}"
            self._conn.abort(ClosedLocally(f"channel closed: {message}"))
            raise ProbeFailed(message, result)
        self.last_probe = time.time()

    async def create_process(
        self, program: ProgramLike, **options: Unpack[ProcessOptions]
    ) -> Process:
        """Start ``program`` in the guest on a stream of its own; return once it runs.

        Shaped like ``asyncio.create_subprocess_exec``: ``program`` is a list of
        arguments (executed directly, no shell) or a ``str``/``bytes`` command
        line (run by ``/bin/sh -c``). ``stdin`` is ``PIPE`` or ``DEVNULL``
        (default); ``stdout`` ``PIPE`` (default) or ``DEVNULL``; ``stderr``
        ``PIPE`` (the default), ``STDOUT`` (merged) or ``DEVNULL``. ``env``
        adds to the agent's environment, ``cwd`` and ``user`` (name or uid; a
        root agent only) are set for the process alone. ``pty=(rows, cols)``
        gives it a terminal (stderr merged into stdout). ``timeout`` covers the
        whole call: waiting for a free stream counts, and what is left when the
        process starts is its life limit (the agent sends ``SIGTERM`` to its group,
        then ``SIGKILL``: :attr:`Process.timed_out`). ``limit`` is the unread
        output held per stream (the credit granted the agent).

        Raises :class:`CommandTimeout` when ``timeout`` runs out before the process
        starts (``sent`` False: nothing ran), :class:`Unsupported` on a v1
        connection or when the agent did not announce what is asked (``pty``,
        ``user``), :class:`SpawnFailed` when the guest cannot start it,
        :class:`UsageError` for bad arguments.
        """
        if self._v2 is None:
            raise Unsupported(
                f"channel {self.id} speaks protocol v1, which runs one buffered command at a"
                " time: processes (streaming output, stdin, signals, terminals) need v2."
                " Upgrade the guest's agent, or use run()"
            )
        return await start_process(self._v2, program, **options)

    # -- files (v2) ----------------------------------------------------------------------

    def _files(self) -> SessionConnection:
        """The v2 connection file operations run on; :class:`Unsupported` on v1."""
        if self._v2 is None:
            raise Unsupported(
                f"channel {self.id} speaks protocol v1, which cannot transfer files: file"
                " operations need v2. Upgrade the guest's agent"
            )
        return self._v2

    async def put_file(
        self, source: Source, guest_path: GuestPath, **options: Unpack[PutOptions]
    ) -> None:
        """Write ``source`` to the absolute ``guest_path``, whole or not at all.

        ``source`` is a local path (``str``, ``os.PathLike``), the bytes
        themselves (``bytes``, ``bytearray``, ``memoryview``) or an async
        iterable of bytes; it streams, never held whole. The file gets exactly
        ``mode``; ``uid``/``gid`` (a root agent only) and ``mtime`` (seconds
        since the epoch) if given; ``make_parents`` makes missing directories.
        It lands only once the agent's SHA-256 matches ours: a failure or a
        cancel leaves what was at ``guest_path`` untouched. Raises
        :class:`GuestFileError` (``errno_name``: ``ENOENT``, ``EACCES``,
        ``EISDIR``, ``ENOSPC``...), :class:`UsageError` for a relative path,
        :class:`Unsupported` on v1 or without the agent's ``files``.
        """
        await files.put_file(self._files(), source, guest_path, **options)

    async def get_file(
        self, guest_path: GuestPath, local_path: LocalPath, *, window: int = DEFAULT_WINDOW
    ) -> None:
        """Copy the guest file ``guest_path`` to ``local_path``, whole or not at all.

        It streams into a temporary file next to ``local_path``, fsynced and
        renamed over it once the SHA-256 matches (then the directory fsynced),
        with the guest file's permission bits (set-id bits dropped) and mtime.
        ``window`` is the unread bytes held (the credit granted the agent).
        """
        await files.get_file(self._files(), guest_path, local_path, window=window)

    def read_file(
        self, guest_path: GuestPath, *, window: int = DEFAULT_WINDOW
    ) -> AsyncGenerator[bytes, None]:
        """The bytes of the guest file ``guest_path`` as they arrive: ``async for chunk in``.

        The iteration ends only once the guest's SHA-256 matched what arrived;
        leaving the loop early stops the transfer in the guest.
        """
        return files.read_file(self._files(), guest_path, window=window)

    async def stat(self, guest_path: GuestPath, *, follow_symlinks: bool = True) -> FileInfo:
        """Kind, size, mode, owner and mtime of ``guest_path`` (of a link itself with
        ``follow_symlinks=False``)."""
        return await files.stat(self._files(), guest_path, follow_symlinks=follow_symlinks)

    async def listdir(self, guest_path: GuestPath) -> list[FileInfo]:
        """The entries of a guest directory, each described as :meth:`stat` does (links not
        followed), in the directory's order."""
        return await files.listdir(self._files(), guest_path)

    async def remove(self, guest_path: GuestPath, *, recursive: bool = False) -> None:
        """Remove a file, link or empty directory; ``recursive=True``: a whole tree."""
        await files.remove(self._files(), guest_path, recursive=recursive)

    async def mkdir(
        self,
        guest_path: GuestPath,
        *,
        parents: bool = False,
        mode: int = 0o755,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        """Make a directory with exactly ``mode``, owned by ``uid``/``gid`` if given (a root
        agent only); ``parents=True`` as ``mkdir -p``."""
        await files.mkdir(self._files(), guest_path, parents=parents, mode=mode, uid=uid, gid=gid)

    async def symlink(
        self,
        target: LocalPath,
        guest_path: GuestPath,
        *,
        make_parents: bool = False,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        """Make ``guest_path`` a symbolic link to ``target`` (kept as it is), replacing a file
        or link there; the link itself owned by ``uid``/``gid`` if given (a root agent only)."""
        await files.symlink(
            self._files(), target, guest_path, make_parents=make_parents, uid=uid, gid=gid
        )

    async def set_attributes(
        self, guest_path: GuestPath, *, mode: int | None = None, mtime: float | None = None
    ) -> None:
        """Set exactly ``mode`` and/or ``mtime`` (seconds since the epoch) of a guest file or
        directory; a link there is refused, never followed."""
        await files.set_attributes(self._files(), guest_path, mode=mode, mtime=mtime)

    async def put_tree(
        self,
        local_dir: LocalPath,
        guest_dir: GuestPath,
        *,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        """Copy a local directory into the guest: files and directories with their exact mode
        and mtime (a directory's set once it is filled), links as links (never followed);
        everything it makes owned by ``uid``/``gid`` if given (a root agent only)."""
        await files.put_tree(self._files(), local_dir, guest_dir, uid=uid, gid=gid)

    async def get_tree(
        self, guest_dir: GuestPath, local_dir: LocalPath, *, window: int = DEFAULT_WINDOW
    ) -> None:
        """Copy a guest directory to ``local_dir``: files and directories with their mode and
        mtime, links as links, never followed (nothing is written outside ``local_dir``)."""
        await files.get_tree(self._files(), guest_dir, local_dir, window=window)

    def _resolve(self, timeout: Timeout) -> float | None:
        """``timeout`` as seconds or None: the channel's default for ``DEFAULT``, else checked."""
        if timeout is DEFAULT:
            return self._default_timeout
        if timeout is not self._valid_timeout:  # numbers are immutable: valid once, always
            check_timeout(timeout)
            self._valid_timeout = timeout
        return timeout

    async def _ping(self, session: SessionConnection, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            pinged = False
        else:
            try:
                # A PING leaves the stream in step, so asyncio.timeout's cancel is harmless.
                async with asyncio.timeout(timeout):
                    await session.ping()
                return
            except TimeoutError:
                pinged = True
        outcome = "got no PONG" if pinged else "was given no time"
        raise CommandTimeout(
            f"probe (PING) on channel {self.id} {outcome} within {timeout:.3g} s;"
            " the channel stays open",
            CommandResult(b"", b"", None, timed_out=True),
            sent=pinged,
        )

    # -- v1 exchanges ---------------------------------------------------------------------
    #
    # run() and probe() await the future of a v1 exchange themselves, between _send() and
    # _failed() or dropping its deadline, rather than through a shared coroutine: with
    # thousands of calls in flight, a second coroutine per call is one more object alive for
    # the whole round trip for the cyclic GC to walk.

    def _send(self, line: bytes, timeout: Timeout, probe: bool) -> asyncio.Future[CommandResult]:
        """Send ``line`` (or queue it) and note its deadline, if any, for the channel's book;
        the future. The deadline fails the future itself: cheaper than asyncio.timeout (no
        task cancel and uncancel), and a cancel from outside stays a plain cancel. Not
        wait_for: on 3.11 it swallows a cancel that lands as the result arrives."""
        conn = self._v1
        assert conn is not None
        # _resolve(), inline: every call's path
        if timeout is DEFAULT:
            seconds = self._default_timeout
        elif timeout is self._valid_timeout or timeout is None:
            seconds = timeout  # accepted before
        else:
            seconds = self._resolve(timeout)
        if seconds is None:
            return conn.exchange(line, probe)
        if seconds <= 0:  # no time to send it: never put it on the wire
            conn.check_command(line)
            result = CommandResult(b"", b"", None, timed_out=True)
            raise CommandTimeout(self._timeout_message(line, seconds, False), result, sent=False)
        future = conn.exchange(line, probe)
        book = self._deadlines or self._own_deadlines()
        deadline = (book.now or book.use_clock_of(future.get_loop()))() + seconds
        if self._due is None:
            self._due = future
            self._due_at = deadline
        else:
            if self._more_due is None:
                self._more_due = {}
            self._more_due[future] = deadline
        if deadline < book.next or not self._booked:
            book.add(self, deadline, future.get_loop())
            if not self._booked:
                self._booked = True
                self._watch_close()  # the book forgets a closed channel at once
        return future

    def _settled(self, future: asyncio.Future[CommandResult]) -> None:
        """``future``'s call is over: forget its deadline. The oldest call left takes its
        place, so that the attributes always hold the oldest."""
        more = self._more_due
        if self._due is future:
            self._due = None
            if more:
                self._due = next(iter(more))
                self._due_at = more.pop(self._due)
        elif more is not None:
            more.pop(future, None)
        if more is not None and not more:
            self._more_due = None  # an empty dict is one more object for the GC to walk

    def _deadlines_passed(self, now: float) -> float:
        """Its book's timer fired at ``now``: fail the pending calls whose deadline has passed
        (earliest first, then in the order they were made, as v1 runs them); the earliest
        deadline left, ``math.inf`` if none (the book then forgets the channel)."""
        pending = [] if self._due is None else [(self._due_at, self._due)]
        if self._more_due:
            pending += [(at, future) for future, at in self._more_due.items()]
        pending.sort(key=_deadline_of)  # stable: among equal deadlines, the order of calls
        left = math.inf
        for at, future in pending:
            if at > now:
                left = min(left, at)
            elif not future.done():  # a result that came first wins
                self._deadline_passed(future)
        if left == math.inf:
            self._booked = False
        return left

    def _failed(
        self,
        future: asyncio.Future[CommandResult],
        line: bytes,
        timeout: Timeout,
        error: BaseException,
    ) -> None:
        """Awaiting ``future`` raised ``error``: a missed deadline raises CommandTimeout, a
        cancel gives the exchange up first; anything else goes on as it is."""
        if isinstance(error, _DeadlinePassed):
            message = self._timeout_message(line, self._resolve(timeout), error.was_sent)
            raise CommandTimeout(message, error.result, sent=error.was_sent) from None
        if isinstance(error, asyncio.CancelledError):
            self._abandon(future, "the exchange was cancelled")

    def _own_deadlines(self) -> Deadlines:
        """A book of deadlines for this channel alone (one made outside a server)."""
        self._deadlines = Deadlines()
        return self._deadlines

    def _deadline_passed(self, future: asyncio.Future[CommandResult]) -> None:
        """The deadline of ``future``, a call on this channel, has passed: fail it now, not
        when the caller wakes. A result arriving in between must not be taken for this
        call's, nor this call's command be sent from the queue."""
        conn = self._v1
        assert conn is not None
        sent = conn.in_flight(future)
        stdout, stderr = conn.partial_output() if sent else (b"", b"")
        result = CommandResult(stdout, stderr, None, timed_out=True)
        future.set_exception(_DeadlinePassed(result, sent))
        self._abandon(future, "a command missed its deadline")

    def _abandon(self, future: asyncio.Future[CommandResult], why: str) -> None:
        """Give up on ``future``: close the channel if its command is on the wire (the stream
        is out of step), else drop it from the queue unsent."""
        conn = self._v1
        assert conn is not None
        if conn.in_flight(future):
            reason = f"channel {self.id} closed because {why}; its stream is out of step"
            conn.abort(ClosedLocally(reason))
        else:
            conn.withdraw(future)

    def _timeout_message(self, line: bytes, timeout: float | None, was_sent: bool) -> str:
        shown = line if len(line) <= 60 else line[:57] + b"..."
        if was_sent:
            return f"command {shown!r} timed out after {timeout:.3g} s; channel {self.id} closed"
        return (
            f"command {shown!r} timed out after {timeout:.3g} s and was never sent (it was"
            f" queued behind another call, or given no time); channel {self.id} stays open"
        )

    # -- closing -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection and wait until it is gone; pending calls get
        :class:`ClosedLocally`."""
        self._conn.abort(ClosedLocally(f"channel {self.id} was closed by aclose()"))
        await self._conn.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the connection is gone, for whatever reason."""
        await self._conn.wait_closed()

    async def __aenter__(self) -> GuestChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

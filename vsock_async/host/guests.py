"""``Guest``: one guest, all its open connections, and calls spread over them.

A guest is known by a key: its CID on AF_VSOCK, a listener's label otherwise.
It may hold several connections (an agent started with ``--connections N``);
:meth:`Guest.run` takes any free one, so N calls run at once, and further
calls wait in FIFO order for the next connection to come free. A v2
connection counts as free until it carries as many calls as the agent runs
at once (its ``max_streams``); a v1 one carries one call at a time.
:meth:`Guest.create_process` and the file operations (:meth:`Guest.put_file`,
:meth:`Guest.stat`...) wait in the same queue (for a v2 connection) and hold
their stream until the process or the operation ends (a whole tree's for
:meth:`Guest.put_tree` and :meth:`Guest.get_tree`; for :meth:`Guest.read_file`,
from its first chunk until its iteration ends or it is closed), so runs,
probes, processes and file operations are served in the order they came,
whichever API they came from. A file operation also takes one of the
connection's file slots (the agent runs at most ``max_files`` of them at once
per connection), so it goes only to a connection with one free.

The order has one exception, the same for every kind of call: a connection
that comes free goes to the call that has waited longest among those that can
use it, so a later call passes an earlier one only when the earlier one
cannot use that connection (a process or file operation a v1 connection; a
file operation a connection whose file slots are all taken). A call passed
over keeps its place: it gets the next connection it can use before any call
that came after it. A call never moves to another connection once its
command is sent: when a connection drops, the calls on it fail with
:class:`ConnectionClosed` and are never replayed.

Connecting, disconnecting and each call cost the same however many
connections a guest holds: the open connections and the free ones are kept
in insertion-ordered maps, each kind of call waits in a FIFO of its own
(with a ticket that says who came first), and no path looks at all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Unpack

from ..errors import CommandTimeout, ConnectionClosed, GuestBusy, Unsupported, VsockAsyncError
from ..protocol import PROBE_COMMAND
from ..results import CommandResult
from ..timeouts import DEFAULT, Timeout, check_timeout, deadline_after, remaining
from . import files
from .channel import GuestChannel
from .commandline import CommandLike, compose_command
from .files import DEFAULT_WINDOW, FileInfo, GuestPath, LocalPath, PutOptions, Source
from .process import Process, ProcessOptions, ProgramLike, exec_request, program_line

__all__ = ["Guest", "GuestEvent", "guest_key"]

_MAX_CID_DIGITS = 10  # a CID is a u32: at most 10 digits
_FILES = "file operations"
_PROCESSES = "processes (streaming output, stdin, signals, terminals)"

_RUN, _PROCESS, _FILE = 0, 1, 2
"""What a call needs: any connection (run, probe); a v2 stream (a process); a v2 stream and
one of the connection's ``max_files`` file slots (a file operation)."""
_KINDS = (_RUN, _PROCESS, _FILE)

_Waiter = tuple[int, "asyncio.Future[GuestChannel]"]
"""A call waiting for a connection: its ticket (lower came first), and its future."""


def _shown(line: bytes) -> str:
    """A command line as error messages show it: its repr, cut at 60 bytes."""
    return repr(line if len(line) <= 60 else line[:57] + b"...")


def guest_key(key: Hashable) -> Hashable:
    """The one form of a guest key: a string of 1 to 10 ASCII digits is the int CID.

    Every lookup and every label goes through it, so ``3``, ``"3"`` and ``"003"``
    name the same guest: the vsock guest with CID 3 and a listener labelled
    ``"3"`` share a key. Any other key (an int, any other string) stays as it is.
    """
    if isinstance(key, str) and 0 < len(key) <= _MAX_CID_DIGITS and key.isascii() and key.isdigit():
        return int(key)
    return key


@dataclass(frozen=True, slots=True)
class GuestEvent:
    """A connection of a guest came or went; what :meth:`CommandServer.subscribe` delivers.

    ``error`` says why a connection went (``None`` for ``"connected"``). After
    a ``"disconnected"`` event, ``guest.channels`` is empty if that was the
    guest's last connection.
    """

    kind: Literal["connected", "disconnected"]
    guest: Guest
    channel: GuestChannel
    error: VsockAsyncError | None = None


class Guest:
    """A handle on one guest: its open connections, and ``run``/``probe`` on any free one.

    The handle stays valid across reconnects: if the guest loses every
    connection and later dials in again while you still hold the handle, the
    same object serves the new connections. A connection counts as the
    guest's until its ``"disconnected"`` event, even in the moment between
    being closed and that event.
    """

    __slots__ = (
        "__weakref__",
        "_channels",
        "_default_timeout",
        "_file_idle",
        "_file_leases",
        "_idle",
        "_last_probe",
        "_leases",
        "_tickets",
        "_v2_count",
        "_waiters",
        "key",
    )

    def __init__(self, key: Hashable, *, default_timeout: float | None) -> None:
        self.key: Any = key
        """The CID on AF_VSOCK, the listener's label otherwise (see :func:`guest_key`)."""
        self._default_timeout = default_timeout
        self._channels: OrderedDict[int, GuestChannel] = OrderedDict()
        """Every connection of the guest, oldest first."""
        self._idle: OrderedDict[int, GuestChannel] = OrderedDict()
        """Connections with room for a call through this handle, most recently released first."""
        self._leases: dict[int, int] = {}
        """Calls through this handle that each connection carries now (absent: none)."""
        self._file_idle: dict[int, None] = {}
        """The ids of the idle v2 connections with a file slot free too (ids, not channels:
        a dict of ints is nothing for the cyclic GC to walk)."""
        self._file_leases: dict[int, int] = {}
        """File operations through this handle that each connection carries now."""
        self._v2_count = 0
        """How many of its connections speak v2."""
        self._waiters: dict[int, deque[_Waiter]] = {}
        """The calls waiting for a connection, a FIFO per kind (absent while none waits)."""
        self._tickets = 0
        """The ticket the next waiting call gets."""
        self._last_probe: float | None = None

    def __repr__(self) -> str:
        return f"<Guest key={self.key!r} channels={len(self._channels)} busy={self.busy}>"

    # -- state ---------------------------------------------------------------------------

    @property
    def channels(self) -> list[GuestChannel]:
        """The guest's connections, oldest first (a new list each time)."""
        return list(self._channels.values())

    @property
    def connection_count(self) -> int:
        """How many connections it holds: ``len(channels)`` without building the list."""
        return len(self._channels)

    @property
    def connected(self) -> bool:
        """True while the guest holds at least one connection."""
        return bool(self._channels)

    @property
    def connected_at(self) -> float | None:
        """When its oldest connection arrived (``time.time()``), or None."""
        for channel in self._channels.values():
            return channel.connected_at
        return None

    @property
    def peer(self) -> Any:
        """The peer address of its newest connection: ``(cid, port)`` on AF_VSOCK."""
        for channel in reversed(self._channels.values()):
            return channel.peer
        return None

    @property
    def busy(self) -> bool:
        """True when no connection is free: a call now would wait (or raise with ``wait=False``)."""
        return self._free_channel() is None

    @property
    def waiting(self) -> int:
        """Calls waiting for a connection to come free."""
        return sum(not w.done() for queue in self._waiters.values() for _, w in queue)

    @property
    def last_probe(self) -> float | None:
        """When a probe last succeeded on any of its connections (``time.time()``), or None."""
        times = [c.last_probe for c in self._channels.values() if c.last_probe is not None]
        if self._last_probe is not None:
            times.append(self._last_probe)
        return max(times, default=None)

    # -- calls ---------------------------------------------------------------------------

    async def run(
        self,
        command: CommandLike,
        *,
        timeout: Timeout = DEFAULT,
        check: bool = False,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> CommandResult:
        """Run ``command`` on a free connection; see :meth:`GuestChannel.run`.

        ``timeout`` covers waiting for a connection too. With ``wait=False``
        a call that finds every connection busy raises :class:`GuestBusy`
        instead of waiting. Raises :class:`ConnectionClosed` when the guest
        has no open connection, or loses its last one while the call waits.
        """
        line = compose_command(command, cwd=cwd, env=env)
        deadline, timeout = self._deadline(timeout)
        channel = await self._lease(line, timeout, deadline, wait)
        try:
            return await channel.run(line, timeout=remaining(deadline), check=check)
        except CommandTimeout as exc:
            raise self._timed_out(exc, line, timeout, channel) from None
        finally:
            self._release(channel)

    async def probe(self, *, timeout: Timeout = DEFAULT, wait: bool = True) -> None:
        """Probe one free connection (``:`` must give exit 0, no output); see :meth:`run`."""
        deadline, timeout = self._deadline(timeout)
        channel = await self._lease(PROBE_COMMAND, timeout, deadline, wait)
        try:
            await channel.probe(timeout=remaining(deadline))
        except CommandTimeout as exc:
            raise self._timed_out(exc, PROBE_COMMAND, timeout, channel) from None
        finally:
            self._release(channel)
        self._last_probe = channel.last_probe

    async def create_process(
        self, program: ProgramLike, **options: Unpack[ProcessOptions]
    ) -> Process:
        """Start ``program`` on one of the guest's v2 connections; see
        :meth:`GuestChannel.create_process` for the arguments.

        It takes a free stream, or waits for one in the queue :meth:`run`,
        :meth:`probe` and the file operations wait in, behind every call that
        came before it, and holds that stream until the process ends.
        ``timeout`` covers the whole call, as for :meth:`run`: the wait counts,
        and what is left when the process starts is its life limit;
        :class:`CommandTimeout` (``sent`` False) if it runs out first. Raises
        :class:`Unsupported` if the guest speaks only v1, :class:`ConnectionClosed`
        if it has no open connection or loses its last one while the call waits.
        """
        exec_request(program, **options)  # a bad argument fails now, not after waiting its turn
        line, timeout = program_line(program), options.get("timeout")
        deadline = deadline_after(timeout)
        channel = await self._lease(line, timeout, deadline, True, _PROCESS)
        left: ProcessOptions = {**options, "timeout": remaining(deadline)}
        try:
            process = await channel.create_process(program, **left)
        except CommandTimeout as exc:  # behind a call made on the channel itself
            self._release(channel, _PROCESS)
            raise self._timed_out(exc, line, timeout, channel) from None
        except BaseException:
            self._release(channel, _PROCESS)
            raise
        process._exited.add_done_callback(lambda _: self._release(channel, _PROCESS))
        return process

    # -- files (v2): GuestChannel's file operations, each on a stream it waits its turn for --

    async def put_file(
        self, source: Source, guest_path: GuestPath, **options: Unpack[PutOptions]
    ) -> None:
        """:meth:`GuestChannel.put_file` on a v2 stream taken in its turn, as :meth:`stat`."""
        files.put_file_request(source, guest_path, **options)  # a bad argument fails now
        async with self._file_stream() as channel:
            await channel.put_file(source, guest_path, **options)

    async def get_file(
        self, guest_path: GuestPath, local_path: LocalPath, *, window: int = DEFAULT_WINDOW
    ) -> None:
        """:meth:`GuestChannel.get_file` on a v2 stream taken in its turn, as :meth:`stat`."""
        files.get_file_request(guest_path, local_path, window)
        async with self._file_stream() as channel:
            await channel.get_file(guest_path, local_path, window=window)

    def read_file(
        self, guest_path: GuestPath, *, window: int = DEFAULT_WINDOW
    ) -> AsyncGenerator[bytes, None]:
        """:meth:`GuestChannel.read_file` on a v2 stream, taken in its turn (as :meth:`stat`)
        when the iteration starts, and held until it ends.

        Iterate to the end, or close it: ``async with
        contextlib.aclosing(guest.read_file(...)) as chunks``. One kept and left
        mid-way holds its stream, and the calls waiting behind it, until it is
        garbage-collected (asyncio closes it then). A bad argument fails at once,
        :class:`Unsupported` too.
        """
        files.get_request(guest_path, window)
        self._check_v2(_FILES)
        return self._read(guest_path, window)

    async def _read(self, guest_path: GuestPath, window: int) -> AsyncGenerator[bytes, None]:
        """The chunks of :meth:`read_file`, its stream leased at the first and given back
        when this generator ends or is closed (by asyncio too, if it is collected)."""
        async with (
            self._file_stream() as channel,
            contextlib.aclosing(channel.read_file(guest_path, window=window)) as chunks,
        ):
            async for chunk in chunks:
                yield chunk

    async def stat(self, guest_path: GuestPath, *, follow_symlinks: bool = True) -> FileInfo:
        """:meth:`GuestChannel.stat` on a v2 stream taken in its turn.

        Like every file operation of the handle, it takes a free stream or waits
        for one in the queue :meth:`run`, :meth:`probe` and
        :meth:`create_process` wait in, behind every call that came before it,
        and holds it until it ends (:meth:`put_tree` and :meth:`get_tree` hold
        one for the whole tree). There is no timeout: wrap the call in
        ``asyncio.timeout()`` to give up (a call given up while it waits sends
        nothing). A bad argument fails at once; :class:`Unsupported` if the
        guest speaks only v1, :class:`ConnectionClosed` if it has no open
        connection or loses its last v2 one while the call waits.
        """
        files._guest_path(guest_path)
        async with self._file_stream() as channel:
            return await channel.stat(guest_path, follow_symlinks=follow_symlinks)

    async def listdir(self, guest_path: GuestPath) -> list[FileInfo]:
        """:meth:`GuestChannel.listdir` on a v2 stream taken in its turn, as :meth:`stat`."""
        files._guest_path(guest_path)
        async with self._file_stream() as channel:
            return await channel.listdir(guest_path)

    async def remove(self, guest_path: GuestPath, *, recursive: bool = False) -> None:
        """:meth:`GuestChannel.remove` on a v2 stream taken in its turn, as :meth:`stat`."""
        files._guest_path(guest_path)
        async with self._file_stream() as channel:
            await channel.remove(guest_path, recursive=recursive)

    async def mkdir(
        self,
        guest_path: GuestPath,
        *,
        parents: bool = False,
        mode: int = 0o755,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        """:meth:`GuestChannel.mkdir` on a v2 stream taken in its turn, as :meth:`stat`."""
        files.mkdir_request(guest_path, parents=parents, mode=mode, uid=uid, gid=gid)
        async with self._file_stream() as channel:
            await channel.mkdir(guest_path, parents=parents, mode=mode, uid=uid, gid=gid)

    async def symlink(
        self,
        target: LocalPath,
        guest_path: GuestPath,
        *,
        make_parents: bool = False,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        """:meth:`GuestChannel.symlink` on a v2 stream taken in its turn, as :meth:`stat`."""
        files.symlink_request(target, guest_path, make_parents=make_parents, uid=uid, gid=gid)
        async with self._file_stream() as channel:
            await channel.symlink(target, guest_path, make_parents=make_parents, uid=uid, gid=gid)

    async def set_attributes(
        self, guest_path: GuestPath, *, mode: int | None = None, mtime: float | None = None
    ) -> None:
        """:meth:`GuestChannel.set_attributes` on a v2 stream taken in its turn, as
        :meth:`stat`."""
        files.set_attributes_request(guest_path, mode=mode, mtime=mtime)
        async with self._file_stream() as channel:
            await channel.set_attributes(guest_path, mode=mode, mtime=mtime)

    async def put_tree(
        self,
        local_dir: LocalPath,
        guest_dir: GuestPath,
        *,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        """:meth:`GuestChannel.put_tree` on one v2 stream taken in its turn (as :meth:`stat`)
        and held for the whole tree: it runs its operations one after another."""
        files.put_tree_request(guest_dir, uid, gid)
        async with self._file_stream() as channel:
            await channel.put_tree(local_dir, guest_dir, uid=uid, gid=gid)

    async def get_tree(
        self, guest_dir: GuestPath, local_dir: LocalPath, *, window: int = DEFAULT_WINDOW
    ) -> None:
        """:meth:`GuestChannel.get_tree` on one v2 stream taken in its turn (as :meth:`stat`)
        and held for the whole tree: it runs its operations one after another."""
        files.get_request(guest_dir, window)
        async with self._file_stream() as channel:
            await channel.get_tree(guest_dir, local_dir, window=window)

    @contextlib.asynccontextmanager
    async def _file_stream(self) -> AsyncIterator[GuestChannel]:
        """A v2 connection with a free file slot, leased for one file operation in its turn
        in the guest's queue; given back when the operation ends, fails or is cancelled."""
        channel = await self._lease(b"", None, None, True, _FILE)  # no deadline
        try:
            yield channel
        finally:
            self._release(channel, _FILE)

    def _check_v2(self, need: str) -> None:
        """:class:`Unsupported` if every connection speaks only v1; ConnectionClosed if none."""
        if not self._channels:
            raise self._no_connection()
        if not self._v2_count:
            raise Unsupported(
                f"guest {self.key!r} speaks only protocol v1 on its {len(self._channels)}"
                f" connection(s), which run one buffered command at a time: {need} need v2."
                " Upgrade the guest's agent, or use run()"
            )

    async def aclose(self) -> None:
        """Close all its connections; their calls, and calls waiting here, get ConnectionClosed."""
        channels = self.channels
        for channel in channels:
            channel.abort(f"connection {channel.id} of guest {self.key!r} was dropped")
        self._fail_waiters()
        for channel in channels:
            await channel.wait_closed()

    # -- connection bookkeeping (called by the server) -------------------------------------

    def add_channel(self, channel: GuestChannel) -> None:
        """Serve calls on ``channel`` from now on; hand it to the longest waiting calls."""
        self._channels[channel.id] = channel
        if channel.protocol == "v2":
            self._v2_count += 1
        self._release(channel, leased=False)

    def remove_channel(self, channel: GuestChannel) -> bool:
        """Forget a closed ``channel``; True if that was its last connection.

        Calls waiting for a connection fail once none is left, processes waiting
        for a v2 one once no v2 one is.
        """
        if self._channels.pop(channel.id, None) is not None and channel.protocol == "v2":
            self._v2_count -= 1
        self._idle.pop(channel.id, None)
        self._file_idle.pop(channel.id, None)
        self._leases.pop(channel.id, None)
        self._file_leases.pop(channel.id, None)
        if self._channels:
            if not self._v2_count:
                self._fail_waiters(v2_only=True)
            return False
        self._fail_waiters()
        return True

    # -- scheduling ----------------------------------------------------------------------

    def _deadline(self, timeout: Timeout) -> tuple[float | None, float | None]:
        if timeout is DEFAULT:
            timeout = self._default_timeout
        else:
            check_timeout(timeout)
        if timeout is None:
            return None, None
        return asyncio.get_running_loop().time() + timeout, timeout

    def _free_channel(self, kind: int = _RUN) -> GuestChannel | None:
        """The most recently released connection with nothing to do that can carry a call of
        ``kind`` (for a file operation, any one with a file slot free), if there is one.

        Only connections busy with calls made on the channel itself, not through
        this handle (and v1 ones for a process), are looked at and passed over; closed
        ones are dropped.
        """
        found = None
        gone = []
        for channel in self._idle_for(kind):
            if channel.closed:
                gone.append(channel.id)
            elif not channel.busy and not channel.queued and self._serves(channel, kind):
                found = channel
                break
        for channel_id in gone:
            self._idle.pop(channel_id, None)
            self._file_idle.pop(channel_id, None)
        return found

    def _unleased_channel(self, kind: int = _RUN) -> GuestChannel | None:
        """An open connection busy with a call made on the channel itself, not through us.

        We learn nothing when such a call ends, so rather than wait for a
        hand-over that may never come, the call queues on that channel.
        """
        return min(
            (c for c in self._idle_for(kind) if not c.closed and self._serves(c, kind)),
            key=lambda c: c.queued,
            default=None,
        )

    def _idle_for(self, kind: int) -> Iterable[GuestChannel]:
        """The idle connections to look at for a call of ``kind``: for a file operation only
        those with a file slot free, so none is passed over for want of one."""
        if kind == _FILE:
            return (self._channels[channel_id] for channel_id in self._file_idle)
        return self._idle.values()

    def _serves(self, channel: GuestChannel, kind: int) -> bool:
        """Whether ``channel``, with room for one more call, can carry a call of ``kind``."""
        if kind == _RUN:
            return True
        if channel.protocol != "v2":
            return False
        return kind == _PROCESS or self._file_leases.get(channel.id, 0) < _file_slots(channel)

    def _no_connection(self, v2: bool = False) -> ConnectionClosed:
        return ConnectionClosed(f"guest {self.key!r} has no open {'v2 ' if v2 else ''}connection")

    def _take(self, channel: GuestChannel, kind: int) -> GuestChannel:
        """Count one more call of ``kind`` on ``channel``; it leaves the idle sets it has no
        more room for."""
        leases = self._leases.get(channel.id, 0) + 1
        self._leases[channel.id] = leases
        if leases >= channel.concurrency:
            self._idle.pop(channel.id, None)
            self._file_idle.pop(channel.id, None)
        if kind == _FILE:
            files = self._file_leases.get(channel.id, 0) + 1
            self._file_leases[channel.id] = files
            if files >= _file_slots(channel):
                self._file_idle.pop(channel.id, None)
        return channel

    async def _lease(
        self,
        line: bytes,
        timeout: float | None,
        deadline: float | None,
        wait: bool,
        kind: int = _RUN,
    ) -> GuestChannel:
        """A connection reserved for one call of ``kind``: a free one now, or the next one to
        come free, after every call that waits already; only a free connection that no
        waiting call can use (a v1 one while those waiting need v2, one with its file slots
        taken while those waiting are file operations) goes to a later call at once."""
        while True:
            if kind == _RUN:
                if not self._channels:
                    raise self._no_connection()
            else:
                self._check_v2(_FILES if kind == _FILE else _PROCESSES)
            # An idle connection is one no waiting call can use: _release hands room to the
            # waiting calls before it lets a connection idle.
            channel = self._free_channel(kind)
            if channel is None and wait and not self._waiters:
                channel = self._unleased_channel(kind)
            if channel is not None:
                return self._in_time(self._take(channel, kind), kind, line, timeout, deadline)
            if not wait:
                raise GuestBusy(
                    f"every connection of guest {self.key!r} is busy"
                    f" ({len(self._channels)} open, {self.waiting} calls waiting)"
                )
            waiter: asyncio.Future[GuestChannel] = asyncio.get_running_loop().create_future()
            entry = (self._tickets, waiter)
            self._tickets += 1
            queue = self._waiters.get(kind)
            if queue is None:
                queue = self._waiters[kind] = deque()
            queue.append(entry)
            try:
                # Not wait_for: on 3.11 it swallows a cancel that lands as the hand-over does.
                async with asyncio.timeout_at(deadline):
                    channel = await waiter
            except TimeoutError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    channel = waiter.result()  # the hand-over won the race against the deadline
                else:
                    raise self._wait_timeout(line, timeout) from None
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._release(waiter.result(), kind)
                raise
            finally:
                if waiter.cancelled():  # one handed over or failed has left its queue already
                    self._forget(kind, entry)
            if not channel.closed:
                return self._in_time(channel, kind, line, timeout, deadline)

    def _oldest(self, channel: GuestChannel) -> int | None:
        """The kind of the call that has waited longest of those ``channel`` (with room for
        one more call) can carry, or None if none of them waits."""
        found, ticket = None, 0
        for kind in _KINDS:
            if kind in self._waiters and self._serves(channel, kind):
                head = self._head(kind)
                if head is not None and (found is None or head[0] < ticket):
                    found, ticket = kind, head[0]
        return found

    def _head(self, kind: int) -> _Waiter | None:
        """The longest waiting call of ``kind``; those that gave up are dropped on the way,
        and the queue once it is empty."""
        queue = self._waiters[kind]
        while queue:
            if not queue[0][1].done():
                return queue[0]
            queue.popleft()
        del self._waiters[kind]
        return None

    def _forget(self, kind: int, entry: _Waiter) -> None:
        """Take ``entry``, a call that gave up waiting, out of its queue (if still there)."""
        queue = self._waiters.get(kind)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(entry)
            if not queue:
                del self._waiters[kind]

    def _in_time(
        self,
        channel: GuestChannel,
        kind: int,
        line: bytes,
        timeout: float | None,
        deadline: float | None,
    ) -> GuestChannel:
        """``channel``, unless the deadline has passed: a command sent now would only be cut off."""
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
            self._release(channel, kind)
            raise self._wait_timeout(line, timeout)
        return channel

    def _wait_timeout(self, line: bytes, timeout: float | None) -> CommandTimeout:
        return CommandTimeout(
            f"command {_shown(line)} timed out after {timeout:.3g} s waiting for a free"
            f" connection of guest {self.key!r}; it was never sent",
            CommandResult(b"", b"", None, timed_out=True),
            sent=False,
        )

    def _timed_out(
        self, exc: CommandTimeout, line: bytes, timeout: float | None, channel: GuestChannel
    ) -> CommandTimeout:
        """The channel's timeout told with the caller's ``timeout``: the channel had only
        what was left of it after waiting for a connection."""
        where = f"connection {channel.id} of guest {self.key!r}"
        if not exc.sent:
            behind = "a free stream" if channel.protocol == "v2" else "a call made on it itself"
            outcome = f"it was never sent (it waited on {where} for {behind})"
        elif channel.protocol == "v2":
            outcome = f"its process was stopped; {where} stays open"
        else:  # the deadline fired with the command on the wire
            outcome = f"{where} closed"
        return CommandTimeout(
            f"command {_shown(line)} timed out after {timeout:.3g} s; {outcome}",
            exc.result,
            sent=exc.sent,
        )

    def _release(self, channel: GuestChannel, kind: int = _RUN, *, leased: bool = True) -> None:
        """A call of ``kind`` is done with ``channel`` (``leased``), or it is new: hand its
        room to the waiting calls it can carry, longest waiting first, and keep it idle while
        room is left."""
        if leased:
            leases = self._leases.pop(channel.id, 1) - 1
            if leases:
                self._leases[channel.id] = leases
            if kind == _FILE:
                files = self._file_leases.pop(channel.id, 1) - 1
                if files:
                    self._file_leases[channel.id] = files
        if channel.id not in self._channels or channel.closed:
            return
        while self._waiters and self._leases.get(channel.id, 0) < channel.concurrency:
            waiting = self._oldest(channel)
            if waiting is None:
                break
            queue = self._waiters[waiting]
            _, waiter = queue.popleft()
            if not queue:
                del self._waiters[waiting]
            waiter.set_result(self._take(channel, waiting))
        if self._leases.get(channel.id, 0) < channel.concurrency:
            if channel.id not in self._idle:
                self._idle[channel.id] = channel
                self._idle.move_to_end(channel.id, last=False)
            if channel.id not in self._file_idle and self._serves(channel, _FILE):
                self._file_idle[channel.id] = None

    def _fail_waiters(self, *, v2_only: bool = False) -> None:
        """Fail the calls waiting for a connection (those for a v2 one: ``v2_only``)."""
        for kind in (_PROCESS, _FILE) if v2_only else _KINDS:
            for _, waiter in self._waiters.pop(kind, ()):
                if not waiter.done():
                    waiter.set_exception(self._no_connection(v2_only))


def _file_slots(channel: GuestChannel) -> int:
    """File operations ``channel`` carries at once: the agent's ``max_files`` (none on v1)."""
    agent = channel.agent
    return 0 if agent is None else agent.limits.max_files

"""The host side of one v1 connection as a state machine, sans I/O: no sockets, no clock.

v1 carries one exchange at a time, and this class owns its rules:

- commands go out in the order they were given, each only once the result
  of the one before has arrived whole (the others wait in a FIFO);
- a probe's answer may hold no output, so its limits are zero: a hostile
  guest cannot make the automatic probe of each connection cost the full
  output limits;
- a byte that arrives while no command is pending, or beyond the result of
  the pending one, is a :class:`ProtocolError`;
- the end of the stream while a command is pending is a :class:`ConnectionLost`.

The I/O layer feeds the guest's bytes in (:meth:`~HostConnectionV1.get_buffer`
and :meth:`~HostConnectionV1.buffer_updated`, the shape of
``asyncio.BufferedProtocol``, or :meth:`~HostConnectionV1.receive_data`),
writes what :meth:`~HostConnectionV1.data_to_send` returns and acts on
:meth:`~HostConnectionV1.next_event`. Each call carries an id chosen by the
caller and given back in its :class:`ResultReceived`, or in the
:class:`ConnectionEnded` that ends it unanswered.

Those three outputs go through hooks (:meth:`~HostConnectionV1.result_received`,
:meth:`~HostConnectionV1.output_ready`, :meth:`~HostConnectionV1.connection_ended`)
that queue them for ``data_to_send()`` and ``next_event()``. An I/O layer may
subclass and override them to act at once, in the call that produced them: the
asyncio layer does, so that a read is one call from the loop into this class and
a result resolves its future there.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Generic, NamedTuple, TypeVar

from ..errors import ConnectionLost, ProtocolError, UsageError, VsockAsyncError
from ..results import CommandResult
from ._body import copy_into_lent_memory
from .limits import Limits
from .v1 import ResultDecoder

__all__ = [
    "ConnectionEnded",
    "ConnectionState",
    "HostConnectionV1",
    "HostEventV1",
    "ResultReceived",
    "copy_error",
]

Id = TypeVar("Id")


class ConnectionState(enum.Enum):
    """Where a v1 connection stands."""

    IDLE = "idle"
    """Nothing is on the wire; the next command goes out at once."""
    AWAITING_RESULT = "awaiting result"
    """A command was sent and its result is not whole yet; later commands wait."""
    CLOSED = "closed"
    """The connection ended (see :attr:`HostConnectionV1.error`); it never reopens."""


_pack_u32 = struct.Struct(">I").pack

_IDLE: Final = ConnectionState.IDLE
_AWAITING: Final = ConnectionState.AWAITING_RESULT
_CLOSED: Final = ConnectionState.CLOSED


# Events are named tuples, not frozen dataclasses: as immutable, and one is made per
# exchange, where a frozen dataclass's __init__ costs twice as much.


class ResultReceived(NamedTuple, Generic[Id]):
    """The result of call ``id`` arrived whole."""

    id: Id
    result: CommandResult


class ConnectionEnded(NamedTuple, Generic[Id]):
    """The connection is over because of ``error``; every call in ``unanswered`` (the one in
    flight first, then the queued ones in order) ends with it. Always the last event."""

    error: VsockAsyncError
    unanswered: tuple[Id, ...]


HostEventV1 = ResultReceived[Id] | ConnectionEnded[Id]


def copy_error(error: VsockAsyncError) -> VsockAsyncError:
    """A fresh instance of ``error`` for one more raise, so that the tracebacks of different
    callers failed by one event never pile up on a single exception object."""
    clone = type(error).__new__(type(error))
    clone.__dict__.update(error.__dict__)
    clone.args = error.args
    if isinstance(error, OSError):  # these live in slots, not in __dict__
        assert isinstance(clone, OSError)
        clone.errno, clone.strerror, clone.filename = error.errno, error.strerror, error.filename
    return clone


class HostConnectionV1(Generic[Id]):
    """The v1 rules for one host-side connection: a FIFO of calls, one exchange in flight.

    ``abandoned(id)``, when given, is asked about a queued call when its turn
    comes, and about a call whose result has arrived; a call it says was given
    up is dropped unsent, and its result unreported. (The asyncio layer passes
    ``Future.done``: a caller cancelled in the same loop iteration as the answer
    before its own must not see its command run.)
    """

    def __init__(
        self, limits: Limits | None = None, *, abandoned: Callable[[Id], bool] | None = None
    ) -> None:
        self._limits = limits = limits or Limits()
        self._max_command = limits.max_command
        self._abandoned = abandoned
        self._decoder = ResultDecoder(limits)
        self.get_buffer = self._decoder.get_buffer  # the hot path: no call in between
        """``get_buffer(sizehint=-1)``: memory for the next bytes from the guest; fill it, then
        call :meth:`buffer_updated`. Large results are assembled in this memory, so a socket's
        ``recv_into`` lands their bytes in place."""
        self._probing = False  # the decoder holds a probe's zero limits
        self._state = _IDLE
        self._current: Id | None = None
        # Made on first use, and a tuple for the events (at most two; the empty one is
        # shared): an idle connection holds these, an empty deque costs some 700 bytes, and
        # with thousands of guests every object here is one more for the cyclic GC to walk.
        self._queue: deque[tuple[Id, bytes, bool]] | None = None
        self._to_send = b""
        self._events: tuple[HostEventV1[Id], ...] = ()
        self._error: VsockAsyncError | None = None
        self.bytes_sent = 0
        """Bytes of command frames handed out so far (to :meth:`output_ready` or returned by
        :meth:`command_frame`)."""
        self.bytes_received = 0
        """Bytes taken in so far."""

    # -- state ---------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """Where the connection stands."""
        return self._state

    @property
    def limits(self) -> Limits:
        """The largest command this side sends and the largest output it accepts."""
        return self._limits

    @property
    def error(self) -> VsockAsyncError | None:
        """Why the connection ended, or None while it is open."""
        return self._error

    @property
    def queued(self) -> int:
        """Calls waiting behind the one in flight."""
        return len(self._queue) if self._queue else 0

    def in_flight(self, id: Id) -> bool:
        """True if ``id``'s command is the one on the wire."""
        return self._state is _AWAITING and self._current == id

    # -- calls ---------------------------------------------------------------------------

    def send_command(self, id: Id, command: bytes, probe: bool = False) -> None:
        """Send ``command`` as call ``id`` now if the line is free, else queue it.

        With ``probe=True`` the answer may hold no output: its first byte of
        stdout or stderr fails the connection with :class:`FrameTooLarge`.
        Raises :class:`UsageError` for a command above ``limits.max_command``
        (nothing is sent or queued) and, once the connection has ended, the
        error that ended it.
        """
        frame = self.command_frame(id, command, probe)
        if frame:
            self.output_ready(frame)

    def command_frame(self, id: Id, command: bytes, probe: bool = False) -> bytes:
        """:meth:`send_command` for a caller that writes the bytes itself: the frame to write
        now if the line is free (the call is then in flight), else ``b""`` (the call is
        queued; its frame goes to :meth:`output_ready` when its turn comes)."""
        state = self._state
        if state is _CLOSED:
            assert self._error is not None
            raise copy_error(self._error)
        if len(command) > self._max_command:
            self.check_command(command)
        frame = _pack_u32(len(command)) + command  # max_command fits a u32
        if state is not _IDLE:
            if self._queue is None:
                self._queue = deque()
            self._queue.append((id, frame, probe))
            return b""
        # _start(), inline and without the hook: this is every exchange's path
        if probe is not self._probing:
            self._set_probing(probe)
        self._current = id
        self._state = _AWAITING
        self.bytes_sent += len(frame)
        return frame

    def check_command(self, command: bytes) -> None:
        """Raise :class:`UsageError` if ``command`` is longer than ``limits.max_command``."""
        self._limits.check_command(command)

    def withdraw(self, id: Id) -> bool:
        """Drop queued call ``id`` unsent (its caller gave up); False if it is not queued."""
        queue = self._queue
        if queue is None:
            return False
        for i, (queued, _, _) in enumerate(queue):
            if queued == id:
                del queue[i]
                return True
        return False

    def close(self, error: VsockAsyncError) -> None:
        """End the connection with ``error`` (we close it, or the I/O layer lost it).

        Emits :class:`ConnectionEnded`; does nothing once the connection has ended.
        """
        if self._state is not _CLOSED:
            self._fail(error)

    # -- hooks: what the connection produces (a subclass may act on it at once) ----------

    def result_received(self, id: Id, result: CommandResult) -> None:
        """Call ``id``'s result has arrived whole: queued as a :class:`ResultReceived`."""
        # tuple.__new__ itself: a named tuple's own __new__ is one more Python call
        self._events += (tuple.__new__(ResultReceived, (id, result)),)

    def output_ready(self, data: bytes) -> None:
        """Bytes to write to the guest, after any handed out before: kept for
        :meth:`data_to_send`."""
        self._to_send += data  # b"" + data is data itself: no copy

    def connection_ended(self, event: ConnectionEnded[Id]) -> None:
        """The connection is over: queued for :meth:`next_event`, where it is the last event.
        Called once, with the state already :attr:`ConnectionState.CLOSED`."""
        self._events += (event,)

    # -- output --------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """The bytes to write to the guest now, in order; ``b""`` when there are none."""
        data, self._to_send = self._to_send, b""
        return data

    def next_event(self) -> HostEventV1[Id] | None:
        """The next event, or None when there is none until more bytes arrive or more calls
        are made."""
        events = self._events
        if events:
            self._events = events[1:]
            return events[0]
        return None

    def partial_output(self) -> tuple[bytes, bytes]:
        """The stdout and stderr of the result being received, as far as they have arrived."""
        return self._decoder.partial_output()

    # -- input ---------------------------------------------------------------------------

    def buffer_updated(self, nbytes: int) -> None:
        """Take ``nbytes`` written at the start of the memory :meth:`get_buffer` lent."""
        self.bytes_received += nbytes
        if self._state is not _AWAITING:
            if self._state is _CLOSED:
                raise self._misuse()
            if nbytes > 0:
                self._fail(ProtocolError("the guest sent bytes while no command was pending"))
            return
        decoder = self._decoder
        try:
            result = decoder.result_updated(nbytes)
        except ProtocolError as exc:
            self._fail(exc)
            return
        if result is None:
            return
        id: Any = self._current  # an Id: a call is in flight
        self._current = None
        self._state = _IDLE
        if self._queue:  # the next command goes out first: the hook may send one of its own
            self._start_next()
        abandoned = self._abandoned
        if abandoned is None or not abandoned(id):
            self.result_received(id, result)

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the guest; ``b""`` means the end of the stream."""
        if data:
            # The rest is not read once the connection fails on what came before.
            copy_into_lent_memory(self, data, stop=lambda: self._state is _CLOSED)
        else:
            self.receive_eof()

    def receive_eof(self) -> None:
        """The guest will send nothing more: a pending call ends with :class:`ConnectionLost`.

        Does nothing once the connection has ended.
        """
        if self._state is _CLOSED:
            return
        decoder = self._decoder
        decoder.receive_eof()
        if decoder.in_frame:
            held = decoder.bytes_in_frame()
            self._fail(
                ConnectionLost(f"the guest closed the connection after {held} bytes of a result")
            )
        elif self._state is _AWAITING:
            self._fail(ConnectionLost("the guest closed the connection before it answered"))
        else:
            self._fail(ConnectionLost("the guest closed the connection"))

    # -- transitions ---------------------------------------------------------------------

    def _start(self, id: Id, frame: bytes, probe: bool) -> None:
        if probe is not self._probing:
            self._set_probing(probe)
        self._current = id
        self._state = _AWAITING
        self.bytes_sent += len(frame)
        self.output_ready(frame)

    def _set_probing(self, probe: bool) -> None:
        """Zero output limits for a probe's answer, the full ones for any other."""
        self._probing = probe
        limits = self._limits
        self._decoder.set_output_limits(
            *((0, 0) if probe else (limits.max_stdout, limits.max_stderr))
        )

    def _start_next(self) -> None:
        queue = self._queue
        assert queue is not None
        abandoned = self._abandoned
        while queue:
            id, frame, probe = queue.popleft()
            if abandoned is None or not abandoned(id):
                self._start(id, frame, probe)
                return

    def _fail(self, error: VsockAsyncError) -> None:
        unanswered = [self._current] if self._state is _AWAITING else []
        unanswered.extend(id for id, _, _ in self._queue or ())
        self._queue = None
        self._current = None
        self._to_send = b""
        self._state = _CLOSED
        self._error = error
        self.connection_ended(ConnectionEnded(error, tuple(unanswered)))  # type: ignore[arg-type]

    def _misuse(self) -> UsageError:
        return UsageError(f"bytes fed to a v1 connection that has ended ({self._error})")

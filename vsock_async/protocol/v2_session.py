"""The two ends of one v2 connection as pure state machines: bytes in, events out.

:class:`HostSession` and :class:`AgentSession` own the wire rules: stream ids
(odd, strictly increasing, never reused), each stream's state (a process or
a file operation), credit per stream and channel in both directions, the
order of the last frames (END on both output channels, then EXIT; END, then
RESULT), limits, and the checks of every control payload. No sockets, no
clock, no asyncio: feed received bytes with :meth:`receive_data` (or
:meth:`get_buffer`/:meth:`buffer_updated`), read events with
:meth:`next_event`, and write what :meth:`data_to_send` returns. A peer that
breaks the protocol makes the receiving call raise :class:`ProtocolError`
(close the connection: no resync); a call that breaks it locally raises
:class:`UsageError` and sends nothing. Import these names from
:mod:`vsock_async.protocol.v2`.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..errors import ProtocolError, UsageError
from .hello import AgentLimits, HelloAnswer, HelloRequest
from .limits import U32_MAX
from .v2_frames import (
    DEFAULT_MAX_FRAME,
    FLAG_END,
    HEADER,
    KNOWN_TYPES,
    MAX_CONTROL,
    MAX_CREDIT,
    WINDOW_SIZE,
    Channel,
    Frame,
    FrameDecoder,
    FrameType,
    decode_json,
    decode_window,
    encode_frame,
    encode_window,
    frame_parts,
    json_payload,
    type_name,
)

__all__ = [
    "DEFAULT_WINDOW",
    "DOWNLOAD_OPS",
    "MAX_PING",
    "UPLOAD_OPS",
    "AgentEvent",
    "AgentSession",
    "CloseRequested",
    "CommitRequested",
    "ExecRequested",
    "Exited",
    "FileRequested",
    "FileResult",
    "HostEvent",
    "HostSession",
    "Output",
    "OutputCredit",
    "Pong",
    "RequestFailed",
    "ResizeRequested",
    "SignalRequested",
    "Started",
    "StdinCredit",
    "StdinData",
    "StreamError",
]

DEFAULT_WINDOW: Final = 256 * 1024
"""The STDOUT and STDERR credit of a stream whose EXEC names no ``window``."""

MAX_PING: Final = 64
"""The largest PING payload."""

UPLOAD_OPS: Final = frozenset({"put"})
"""File operations whose bytes flow to the agent, on STDIN, with the agent's ``file_window``."""
DOWNLOAD_OPS: Final = frozenset({"get", "listdir"})
"""File operations whose bytes flow to the host, on STDOUT, with the FILE's ``window``."""

_MAX_MESSAGE = 4096  # characters of an ERROR message we send; keeps ERROR far below 64 KiB
_TERMINAL_MAX = 0xFFFF  # struct winsize holds unsigned shorts
_SIGNAL_MAX = 255
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_OUTPUT = (Channel.STDOUT, Channel.STDERR)
_DATA_TYPE: dict[int, Channel] = {  # keyed by the type byte: no FrameType(n) per frame
    FrameType.STDOUT: Channel.STDOUT,
    FrameType.STDERR: Channel.STDERR,
}
_CHANNEL_TYPE = {
    Channel.STDIN: FrameType.STDIN,
    Channel.STDOUT: FrameType.STDOUT,
    Channel.STDERR: FrameType.STDERR,
}


# -- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """Host: the process of ``stream`` runs, as ``pid`` in the guest."""

    stream: int
    pid: int


@dataclass(frozen=True, slots=True)
class Output:
    """Host: bytes of ``channel`` (STDOUT or STDERR); ``end``: the channel is closed after them.

    The bytes used ``len(data)`` of the channel's credit: give it back with
    :meth:`HostSession.grant` as the application consumes them. A session made
    with ``stream_data=True`` hands large frames on in pieces, as a
    ``memoryview`` valid until the session lends memory again: copy what you keep.
    """

    stream: int
    channel: Channel
    data: bytes | memoryview
    end: bool


@dataclass(frozen=True, slots=True)
class Exited:
    """Host: the last event of a started stream. Exactly one of exit_code and signal is set.

    On a brief stream it also ends STDOUT and STDERR: no :class:`Output` with ``end`` comes.
    """

    stream: int
    exit_code: int | None
    signal: int | None
    timed_out: bool
    output_incomplete: bool


@dataclass(frozen=True, slots=True)
class StreamError:
    """Host: the agent refused the EXEC of ``stream`` (nothing was started), or its file
    operation failed; either way the stream ended.

    ``code``: ``bad_request``, ``unsupported``, ``limit``, ``spawn_failed``, ``file_error``
    (``errno`` names the OS error, e.g. ``ENOENT``), ``permission``, ``digest_mismatch``,
    ``closed``, ``internal``...
    """

    stream: int
    code: str
    message: str
    errno: str | None


@dataclass(frozen=True, slots=True)
class FileResult:
    """Host: the file operation of ``stream`` succeeded; ``result`` is its RESULT object.

    The stream's last event. The fields depend on the operation (docs/protocol.md);
    the session checked only that it is a JSON object.
    """

    stream: int
    result: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """Either side: the peer answered one frame with ERROR; no stream ended because of it.

    ``type`` is the type of the frame that failed (None if not given);
    ``stream`` 0 means the connection itself. Worth a log line.
    """

    stream: int
    type: int | None
    code: str
    message: str
    errno: str | None


@dataclass(frozen=True, slots=True)
class StdinCredit:
    """Host: the agent let ``increment`` more bytes into the stdin of ``stream``."""

    stream: int
    increment: int


@dataclass(frozen=True, slots=True)
class Pong:
    """Host: the answer to a :meth:`HostSession.ping` with this payload."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class ExecRequested:
    """Agent: start a process for ``stream``; answer with ``started()`` or ``exec_failed()``.

    ``request`` is the EXEC object as sent (unknown fields included). The
    session has checked ``stdin`` (bool), ``window`` (int) and the stream
    limit; every other field is for the agent to check.
    """

    stream: int
    request: dict[str, Any]


@dataclass(frozen=True, slots=True)
class FileRequested:
    """Agent: carry out file operation ``op`` for ``stream``; end it with ``file_done()`` or
    ``file_failed()``.

    ``request`` is the FILE object as sent. The session has checked ``op`` (a
    string) and ``window`` (an int) and the stream limits, and set up the
    stream's credit: a put receives STDIN (:class:`StdinData`, then
    :class:`CommitRequested`), a get or listdir sends STDOUT. An unknown ``op``
    has no data channel: refuse it.
    """

    stream: int
    op: str
    request: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CommitRequested:
    """Agent: every byte of the put on ``stream`` has come (STDIN END came first);
    ``sha256`` is their digest, 64 lowercase hex digits. Rename the file into place only
    if it matches."""

    stream: int
    sha256: str


@dataclass(frozen=True, slots=True)
class StdinData:
    """Agent: bytes for the stdin of ``stream``; ``end``: close it after them.

    Return the credit with :meth:`AgentSession.stdin_consumed` once written. With
    ``stream_data=True``, ``data`` may be a ``memoryview`` valid until the session lends
    memory again (see :class:`Output`).
    """

    stream: int
    data: bytes | memoryview
    end: bool


@dataclass(frozen=True, slots=True)
class SignalRequested:
    """Agent: deliver ``signal`` to the process group of ``stream``."""

    stream: int
    signal: int


@dataclass(frozen=True, slots=True)
class ResizeRequested:
    """Agent: set the terminal size of ``stream`` (a pty stream)."""

    stream: int
    rows: int
    cols: int


@dataclass(frozen=True, slots=True)
class CloseRequested:
    """Agent: the host gave up on ``stream``: TERM its group, KILL after the grace, still EXIT.

    From now on the session drops the output it is given (END still goes out).
    """

    stream: int


@dataclass(frozen=True, slots=True)
class OutputCredit:
    """Agent: the host granted ``increment`` more bytes of ``channel`` on ``stream``."""

    stream: int
    channel: Channel
    increment: int


HostEvent = (
    Started | Output | Exited | StreamError | FileResult | RequestFailed | StdinCredit | Pong
)
AgentEvent = (
    ExecRequested
    | FileRequested
    | CommitRequested
    | StdinData
    | SignalRequested
    | ResizeRequested
    | CloseRequested
    | OutputCredit
    | RequestFailed
)


# -- payload checks ----------------------------------------------------------------------


class _BadField(Exception):
    """A control payload field of the wrong type or range (the message says which)."""


_MISSING: Any = object()


def _int(obj: Mapping[str, Any], key: str, low: int, high: int, default: Any = _MISSING) -> Any:
    value = obj.get(key, default)
    if value is _MISSING:
        raise _BadField(f"{key} is missing")
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _BadField(f"{key} must be an integer in {low}..{high}, not {value!r}")
    return value


def _bool(obj: Mapping[str, Any], key: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise _BadField(f"{key} must be true or false, not {value!r}")
    return value


def _error_fields(obj: Mapping[str, Any]) -> tuple[str, str, str | None, int | None]:
    code, message = obj.get("code"), obj.get("message", "")
    errno = obj.get("errno")
    if not isinstance(code, str) or not isinstance(message, str):
        raise _BadField(f"code and message must be strings, not {code!r} and {message!r}")
    if errno is not None and not isinstance(errno, str):
        raise _BadField(f"errno must be a string, not {errno!r}")
    return code, message, errno, _int(obj, "type", 0, 0xFF, None)


# -- streams -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Stream:
    """One open stream, seen from either side; lists are indexed by :class:`Channel`."""

    stdin: bool
    pty: bool
    credit: list[int]
    ended: list[bool] = field(default_factory=lambda: [False, False, False])
    started: bool = False
    closing: bool = False
    op: str | None = None
    """The operation of a file stream; None for a process stream."""
    committed: bool = False
    """A put's COMMIT went (host) or came (agent)."""
    brief: bool = False
    """A process stream opened with ``"brief": true``: no STARTED, no END; EXIT ends all."""


def _file_stream(op: str, window: int, file_window: int) -> _Stream:
    """A new file stream: STDIN flows for an upload, STDOUT for a download, STDERR never."""
    upload, download = op in UPLOAD_OPS, op in DOWNLOAD_OPS
    return _Stream(
        stdin=upload,
        pty=False,
        credit=[file_window if upload else 0, window if download else 0, 0],
        ended=[not upload, not download, True],
        started=True,  # no STARTED: a file stream runs from its FILE on
        op=op,
    )


class _Session:
    """What both ends share: framing, the send queue, stream 0, unknown types and streams."""

    _receives: frozenset[FrameType]  # stream types this end receives; others are violations
    _credited: frozenset[Channel]  # channels whose credit this end receives (WINDOW)

    def __init__(
        self, max_frame: int, max_control: int, peer_max_frame: int, stream_data: bool
    ) -> None:
        self._decoder = FrameDecoder(max_frame, max_control, stream_data=stream_data)
        self._peer_max_frame = peer_max_frame
        self._send: list[bytes | memoryview] = []
        self._events: deque[Any] = deque()
        self._streams: dict[int, _Stream] = {}
        self._last_id = 0  # highest stream id opened on this connection
        self._error: ProtocolError | None = None
        self.answered = 0
        """Bytes of answers queued so far (PONG, ERROR): what the peer makes this end write
        by sending alone, whether or not it reads them."""

    # -- input ---------------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Memory for received bytes; commit them with :meth:`buffer_updated`."""
        self._check_usable()
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """Commit ``nbytes`` received into the buffer last lent; :class:`ProtocolError` if bad."""
        self._check_usable()
        self._decode(self._decoder.buffer_updated, nbytes)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Push received bytes; ``b""`` means the peer closed the connection."""
        self._check_usable()
        self._decode(self._decoder.receive_data, data)

    def _decode(self, step: Callable[[Any], None], arg: Any) -> None:
        try:
            try:
                step(arg)
            finally:
                self._handle_frames()  # the frames before a bad one stand
            if not self._streams:
                self._decoder.release()  # no stream is open: nothing streams for a while
        except ProtocolError as exc:
            self._error = exc
            raise

    def receive_eof(self) -> None:
        """The peer closed the connection: its open streams are lost (see :attr:`in_frame`)."""
        self._decoder.receive_eof()

    def data_to_send(self) -> list[bytes | memoryview]:
        """The frames queued since the last call, in order, for ``writelines``."""
        out, self._send = self._send, []
        return out

    # -- state ---------------------------------------------------------------------------

    @property
    def streams(self) -> frozenset[int]:
        """The ids of the streams open now (opened and not yet ended)."""
        return frozenset(self._streams)

    @property
    def in_frame(self) -> bool:
        """True when part of a frame has arrived and the rest has not."""
        return self._decoder.in_frame

    def credit(self, stream: int, channel: Channel) -> int:
        """Bytes ``channel`` of ``stream`` may still carry (0 when it is not open)."""
        state = self._streams.get(stream)
        return state.credit[channel] if state is not None and not state.ended[channel] else 0

    @property
    def files(self) -> int:
        """File streams open now (they count among :attr:`streams` too)."""
        return sum(1 for state in self._streams.values() if state.op is not None)

    # -- shared machinery ------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise UsageError(f"the v2 session is unusable after a protocol error: {self._error}")

    def _open(self, stream: int) -> _Stream:
        """The open stream ``stream``, or :class:`UsageError`."""
        self._check_usable()
        state = self._streams.get(stream)
        if state is None:
            raise UsageError(f"stream {stream} is not open (it ended, or was never opened)")
        return state

    def _process(self, stream: int) -> _Stream:
        """The open process stream ``stream``, or :class:`UsageError`."""
        state = self._open(stream)
        if state.op is not None:
            raise UsageError(f"stream {stream} is a file stream ({state.op}), not a process")
        return state

    def _file(self, stream: int) -> _Stream:
        """The open file stream ``stream``, or :class:`UsageError`."""
        state = self._open(stream)
        if state.op is None:
            raise UsageError(f"stream {stream} runs a process, not a file operation")
        return state

    def _queue_json(self, stream: int, type: FrameType, obj: Mapping[str, Any]) -> None:
        self._send.append(encode_frame(stream, type, 0, json_payload(obj)))

    def _queue_error(
        self, stream: int, type: int, code: str, message: str, errno: str | None = None
    ) -> None:
        error: dict[str, Any] = {"code": code, "message": message[:_MAX_MESSAGE], "type": type}
        if errno is not None:
            error["errno"] = errno
        self._queue_json(stream, FrameType.ERROR, error)
        self.answered += len(self._send[-1])

    def _send_data(
        self,
        stream: int,
        state: _Stream,
        channel: Channel,
        data: bytes | bytearray | memoryview,
        end: bool,
    ) -> int:
        """Queue what the credit of ``channel`` allows of ``data``; how many bytes that is."""
        # A view of bytes is safe to keep until sent; other buffers may change: copy them.
        if not isinstance(data, bytes):
            data = bytes(data)
        accepted = min(len(data), state.credit[channel])
        if accepted or (end and not data):
            ended = end and accepted == len(data)
            # A brief stream's output has no END: its EXIT says so. Its stdin ends as any.
            quiet = state.brief and channel != Channel.STDIN
            if accepted or not quiet:
                view = memoryview(data)[:accepted]
                self._queue_data(stream, channel, view, ended and not quiet)
            state.credit[channel] -= accepted
            state.ended[channel] = ended
        return accepted

    def _queue_data(self, stream: int, channel: Channel, view: memoryview, end: bool) -> None:
        """``view`` in frames no larger than the peer accepts; END on the last one."""
        type = _CHANNEL_TYPE[channel]
        size = self._peer_max_frame
        for start in range(0, len(view), size):
            last = start + size >= len(view)
            piece = view[start : start + size]
            header, _ = frame_parts(stream, type, FLAG_END if end and last else 0, piece)
            self._send += (header, piece)
        if end and not view:
            self._send.append(encode_frame(stream, type, FLAG_END))

    def _handle_frames(self) -> None:
        while (frame := self._decoder.next_frame()) is not None:
            self._handle(frame)

    def _handle(self, frame: Frame) -> None:
        type, stream = frame.type, frame.stream
        if type not in KNOWN_TYPES:
            # Its payload was skipped; a peer newer than us learns we do not know the type.
            self._queue_error(stream, type, "unknown_type", f"frame type {type} is not known")
        elif type == FrameType.ERROR:
            try:
                fields = _error_fields(decode_json(frame.payload, "an ERROR payload"))
            except _BadField as exc:
                raise _violation(frame, str(exc)) from None
            self._on_error(stream, *fields)
        elif type == FrameType.PING or type == FrameType.PONG:
            if stream != 0:
                raise _violation(frame, "PING and PONG belong to stream 0")
            if type == FrameType.PONG:
                self._on_pong(frame.payload)
            elif len(frame.payload) > MAX_PING:
                raise _violation(frame, f"a PING payload is at most {MAX_PING} bytes")
            else:
                pong = encode_frame(0, FrameType.PONG, 0, frame.payload)
                self.answered += len(pong)
                self._send.append(pong)
        elif type not in self._receives:
            raise _violation(frame, "that type is never sent in this direction")
        elif stream == 0:
            raise _violation(frame, "stream 0 carries only PING, PONG and ERROR")
        elif type == FrameType.EXEC:
            self._on_exec(frame)
        elif type == FrameType.FILE:
            self._on_file(frame)
        elif (state := self._streams.get(stream)) is not None:
            if type == FrameType.WINDOW:
                self._on_window(state, frame)
            else:
                self._on_stream_frame(state, frame)
        elif (stream % 2 == 0 or stream > self._last_id) and not frame.offset:
            self._queue_error(stream, type, "unknown_stream", f"stream {stream} was never opened")
        # Otherwise the stream has ended, and this frame crossed its last one on the wire.

    def _on_window(self, state: _Stream, frame: Frame) -> None:
        if len(frame.payload) != WINDOW_SIZE:
            raise _violation(frame, f"a WINDOW payload is 5 bytes, not {len(frame.payload)}")
        channel, increment = decode_window(frame.payload)
        if channel not in self._credited:
            raise _violation(frame, f"credit for channel {channel} never flows this way")
        total = state.credit[channel] + increment
        if total > MAX_CREDIT:
            raise _violation(frame, f"a credit of {total} bytes exceeds {MAX_CREDIT}")
        state.credit[channel] = total
        if increment and not state.ended[channel]:
            self._on_credit(frame.stream, Channel(channel), increment)

    def _take_credit(self, state: _Stream, channel: Channel, frame: Frame) -> None:
        """Account for a received data frame, whole at its first piece; a violation if it is
        beyond credit or after END."""
        if not frame.offset:
            if state.ended[channel]:
                raise _violation(frame, f"{channel.name} had already ended")
            size = frame.total
            if size > state.credit[channel]:
                left = state.credit[channel]
                raise _violation(frame, f"{size} bytes exceed the {left} bytes of credit left")
            state.credit[channel] -= size
        state.ended[channel] = frame.end

    def _on_error(
        self, stream: int, code: str, message: str, errno: str | None, type: int | None
    ) -> None:
        self._events.append(RequestFailed(stream, type, code, message, errno))

    def _on_pong(self, payload: bytes | memoryview) -> None:
        """A PONG this end never asked for: ignored."""

    def _on_exec(self, frame: Frame) -> None:
        raise NotImplementedError  # only an end that receives EXEC (the agent) gets here

    def _on_file(self, frame: Frame) -> None:
        raise NotImplementedError  # only an end that receives FILE (the agent) gets here

    def _on_stream_frame(self, state: _Stream, frame: Frame) -> None:
        raise NotImplementedError

    def _on_credit(self, stream: int, channel: Channel, increment: int) -> None:
        raise NotImplementedError


def _violation(frame: Frame, why: str) -> ProtocolError:
    return ProtocolError(f"{type_name(frame.type)} on stream {frame.stream}: {why}")


def _payload(frame: Frame) -> dict[str, Any]:
    return decode_json(frame.payload, f"the {type_name(frame.type)} payload")


class HostSession(_Session):
    """The host end of one v2 connection, after the hello.

    Open process streams with :meth:`open_exec`, then send stdin, signals,
    resizes and CLOSE on them; grant output credit with :meth:`grant` as the
    application consumes output. Open file streams with :meth:`open_file`: a
    put sends its bytes with :meth:`send_stdin` and ends with
    :meth:`send_commit`; a get or listdir receives STDOUT. Events:
    :class:`Started`, :class:`Output`, :class:`Exited` (a started stream's
    last), :class:`FileResult` (a file stream's last on success),
    :class:`StreamError` (an EXEC refused, or a file operation failed: the
    stream's last), :class:`StdinCredit`, :class:`Pong`, :class:`RequestFailed`.
    """

    _receives = frozenset(
        {
            FrameType.STARTED,
            FrameType.STDOUT,
            FrameType.STDERR,
            FrameType.WINDOW,
            FrameType.EXIT,
            FrameType.RESULT,
        }
    )
    _credited = frozenset({Channel.STDIN})

    def __init__(
        self, agent: HelloAnswer, max_frame: int = DEFAULT_MAX_FRAME, *, stream_data: bool = False
    ) -> None:
        super().__init__(max_frame, MAX_CONTROL, agent.limits.max_frame, stream_data)
        self.agent = agent
        """What the agent announced in its hello answer."""

    def next_event(self) -> HostEvent | None:
        """The next event, or None when more bytes are needed."""
        return self._events.popleft() if self._events else None

    # -- requests --------------------------------------------------------------------------

    def open_exec(self, request: Mapping[str, Any], window: int = DEFAULT_WINDOW) -> int:
        """Queue the EXEC of ``request`` on a new stream; its id.

        ``request`` is the EXEC object (docs/protocol.md); ``window`` is the
        initial STDOUT and STDERR credit and replaces any ``window`` in it.
        With ``"brief": true`` (capability ``brief``) the agent sends no STARTED
        and no END: no :class:`Started` event, and :class:`Exited` ends the output.
        :class:`UsageError`, with nothing sent, when the agent's ``max_streams``
        are open, a capability the request needs is missing, or the request
        does not fit in one frame the agent accepts.
        """
        self._check_usable()
        self._require("exec", "start processes")
        if request.get("pty") is not None:
            self._require("pty", "open a terminal")
        if request.get("user") is not None:
            self._require("user", "switch users")
        stdin = request.get("stdin", False)
        if not isinstance(stdin, bool):
            raise UsageError(f"EXEC stdin must be true or false, not {stdin!r}")
        brief = request.get("brief", False)
        if not isinstance(brief, bool):
            raise UsageError(f"EXEC brief must be true or false, not {brief!r}")
        if brief:
            self._require("brief", "run a process without STARTED and END frames (brief)")
        _check_window(window)
        stream = self._next_stream()
        limits = self.agent.limits
        payload = json_payload({**request, "window": window})
        largest = max(limits.max_frame, limits.max_control)
        if len(payload) > largest:
            raise UsageError(
                f"the EXEC request takes {len(payload)} bytes, more than the {largest} the agent"
                " accepts (the larger of its max_frame and max_control): shorten argv, command"
                " or env"
            )
        self._send.append(encode_frame(stream, FrameType.EXEC, 0, payload))
        self._last_id = stream
        credit = [limits.stdin_window if stdin else 0, window, window]
        self._streams[stream] = _Stream(stdin, request.get("pty") is not None, credit, brief=brief)
        return stream

    def open_file(self, request: Mapping[str, Any], window: int = DEFAULT_WINDOW) -> int:
        """Queue the FILE of ``request`` on a new stream; its id.

        ``request`` is the FILE object (docs/protocol.md) with its ``op``;
        ``window`` is the initial STDOUT credit of a get or listdir and
        replaces any ``window`` in it. :class:`UsageError`, with nothing sent,
        when the agent did not announce ``files``, its ``max_streams`` or
        ``max_files`` are open, or the request does not fit in one control frame.
        """
        self._check_usable()
        self._require("files", "transfer files")
        op = request.get("op")
        if not isinstance(op, str):
            raise UsageError(f"a FILE request's op must be a string, not {op!r}")
        _check_window(window)
        limits = self.agent.limits
        if self.files >= limits.max_files:
            raise UsageError(
                f"the agent allows {limits.max_files} open file streams per connection,"
                " and that many are open: wait for one to end"
            )
        stream = self._next_stream()
        payload = json_payload({**request, "window": window} if op in DOWNLOAD_OPS else request)
        if len(payload) > limits.max_control:
            raise UsageError(
                f"the FILE request takes {len(payload)} bytes, more than the {limits.max_control}"
                " the agent accepts (max_control): shorten the path"
            )
        self._send.append(encode_frame(stream, FrameType.FILE, 0, payload))
        self._last_id = stream
        self._streams[stream] = _file_stream(op, window, limits.file_window)
        return stream

    def _next_stream(self) -> int:
        """The id of the next stream, or :class:`UsageError` if no stream may open now."""
        limits = self.agent.limits
        if len(self._streams) >= limits.max_streams:
            raise UsageError(
                f"the agent allows {limits.max_streams} open streams per connection,"
                " and that many are open: wait for one to end"
            )
        stream = self._last_id + (2 if self._last_id else 1)
        if stream > U32_MAX:
            raise UsageError("this connection has used all its stream ids: open a new one")
        return stream

    def send_commit(self, stream: int, sha256: str) -> None:
        """Queue COMMIT: the put on ``stream`` sent all its bytes, whose SHA-256 is ``sha256``
        (64 lowercase hex digits); the agent renames the file into place if it matches."""
        state = self._open(stream)
        if state.op not in UPLOAD_OPS:
            raise UsageError(f"stream {stream} is not a put: it has nothing to commit")
        if not state.ended[Channel.STDIN]:
            raise UsageError(f"COMMIT on stream {stream} before its bytes ended (STDIN END)")
        if state.committed:
            raise UsageError(f"stream {stream} was already committed")
        if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
            raise UsageError(f"a SHA-256 is 64 lowercase hex digits, not {sha256!r}")
        state.committed = True
        self._queue_json(stream, FrameType.COMMIT, {"sha256": sha256})

    def send_stdin(
        self, stream: int, data: bytes | bytearray | memoryview, end: bool = False
    ) -> int:
        """Queue as much of ``data`` as the stdin credit allows; how many bytes that is.

        ``end`` closes the process's stdin after ``data``, once all of it went
        (with ``data`` empty it needs no credit). Refused with
        :class:`UsageError` unless the stream was opened with ``stdin: true``
        and its stdin is not yet ended.
        """
        state = self._open(stream)
        if not state.stdin:
            raise UsageError(f"stream {stream} was opened without a stdin pipe (stdin: false)")
        if state.ended[Channel.STDIN]:
            raise UsageError(f"the stdin of stream {stream} was already ended")
        return self._send_data(stream, state, Channel.STDIN, data, end)

    def send_signal(self, stream: int, signal: int) -> None:
        """Queue SIGNAL: deliver ``signal`` to the process group of ``stream``."""
        self._process(stream)
        self._require("signal", "deliver signals")
        if (
            isinstance(signal, bool)
            or not isinstance(signal, int)
            or not 1 <= signal <= _SIGNAL_MAX
        ):
            raise UsageError(f"a signal number is in 1..{_SIGNAL_MAX}, not {signal!r}")
        self._queue_json(stream, FrameType.SIGNAL, {"signal": signal})

    def send_resize(self, stream: int, rows: int, cols: int) -> None:
        """Queue RESIZE: the terminal of ``stream`` (opened with a pty) becomes rows x cols."""
        state = self._process(stream)
        self._require("resize", "resize terminals")
        if not state.pty:
            raise UsageError(
                f"stream {stream} has no terminal to resize (it was opened without pty)"
            )
        for value in (rows, cols):
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 <= value <= _TERMINAL_MAX
            ):
                raise UsageError(f"rows and cols are ints in 0..{_TERMINAL_MAX}, not {value!r}")
        self._queue_json(stream, FrameType.RESIZE, {"rows": rows, "cols": cols})

    def send_close(self, stream: int) -> None:
        """Queue CLOSE: give up on ``stream`` (the agent kills it, drops its output, still EXITs).

        A second call, or one after the stream ended, does nothing.
        """
        self._check_usable()
        state = self._streams.get(stream)
        if state is not None and not state.closing:
            state.closing = True
            self._send.append(encode_frame(stream, FrameType.CLOSE))

    def grant(self, stream: int, channel: Channel, n: int) -> None:
        """The application consumed ``n`` bytes of ``channel`` (STDOUT/STDERR): return the credit.

        Does nothing for a stream or channel that has ended.
        """
        self._check_usable()
        if channel not in _OUTPUT:
            raise UsageError(f"output credit is for STDOUT or STDERR, not {channel!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise UsageError(f"a credit increment is an int >= 0, not {n!r}")
        state = self._streams.get(stream)
        if state is None or state.ended[channel] or n == 0:
            return
        if state.credit[channel] + n > MAX_CREDIT:
            raise UsageError(
                f"granting {n} bytes would raise the {channel.name} credit of stream {stream}"
                f" above {MAX_CREDIT}"
            )
        state.credit[channel] += n
        self._send.append(encode_window(stream, channel, n))

    def ping(self, payload: bytes = b"") -> None:
        """Queue a PING; the agent's answer is a :class:`Pong` with the same payload."""
        self._check_usable()
        self._require("ping", "answer pings")
        if len(payload) > MAX_PING:
            raise UsageError(f"a PING payload is at most {MAX_PING} bytes, not {len(payload)}")
        self._send.append(encode_frame(0, FrameType.PING, 0, payload))

    def _require(self, capability: str, what: str) -> None:
        if capability not in self.agent.capabilities:
            raise UsageError(
                f"the guest's agent cannot {what}: it did not announce the {capability!r}"
                " capability"
            )

    # -- received frames -------------------------------------------------------------------

    def _on_stream_frame(self, state: _Stream, frame: Frame) -> None:
        stream, type = frame.stream, frame.type
        if state.op is not None:
            self._on_file_frame(state, frame)
            return
        if type == FrameType.RESULT:
            raise _violation(frame, "RESULT ends a file stream, and this one runs a process")
        if type == FrameType.STARTED:
            if state.brief:
                raise _violation(frame, "a brief stream has no STARTED")
            if state.started:
                raise _violation(frame, "the stream had already started")
            try:
                pid = _int(_payload(frame), "pid", 1, U32_MAX)
            except _BadField as exc:
                raise _violation(frame, str(exc)) from None
            state.started = True
            self._events.append(Started(stream, pid))
            return
        if not state.started:
            if not state.brief:
                raise _violation(frame, "the stream has not started (STARTED comes first)")
            state.started = True  # it runs: an ERROR now refuses a request, not the EXEC
        if type == FrameType.EXIT:
            if not state.brief and not (
                state.ended[Channel.STDOUT] and state.ended[Channel.STDERR]
            ):
                raise _violation(frame, "EXIT before END on both STDOUT and STDERR")
            try:
                exited = _exit_fields(stream, _payload(frame))
            except _BadField as exc:
                raise _violation(frame, str(exc)) from None
            del self._streams[stream]
            self._events.append(exited)
            return
        if frame.end and state.brief:
            raise _violation(frame, "a brief stream has no END: its EXIT ends the output")
        channel = _DATA_TYPE[type]
        self._take_credit(state, channel, frame)
        if frame.payload or frame.end:
            self._events.append(Output(stream, channel, frame.payload, frame.end))

    def _on_file_frame(self, state: _Stream, frame: Frame) -> None:
        stream, type = frame.stream, frame.type
        if type == FrameType.RESULT:
            if not state.ended[Channel.STDOUT]:
                raise _violation(frame, "RESULT before END on STDOUT")
            if state.op in UPLOAD_OPS and not state.committed:
                raise _violation(frame, "RESULT of a put before its COMMIT")
            result = _payload(frame)
            del self._streams[stream]
            self._events.append(FileResult(stream, result))
        elif type == FrameType.STDOUT:
            self._take_credit(state, Channel.STDOUT, frame)
            if frame.payload or frame.end:
                self._events.append(Output(stream, Channel.STDOUT, frame.payload, frame.end))
        else:
            raise _violation(frame, "a file stream carries only STDOUT, WINDOW and RESULT")

    def _on_error(
        self, stream: int, code: str, message: str, errno: str | None, type: int | None
    ) -> None:
        state = self._streams.get(stream)
        # A brief stream may run silently for long: only an ERROR that says it answers the
        # EXEC ends it, not one without a type (which may answer a SIGNAL or a STDIN).
        refusal = (FrameType.EXEC,) if state is not None and state.brief else (None, FrameType.EXEC)
        if state is not None and (
            (state.op is None and not state.started and type in refusal)
            or (state.op is not None and type in (None, FrameType.FILE))
        ):
            del self._streams[stream]
            self._events.append(StreamError(stream, code, message, errno))
        else:
            super()._on_error(stream, code, message, errno, type)

    def _on_pong(self, payload: bytes | memoryview) -> None:
        self._events.append(Pong(bytes(payload)))

    def _on_credit(self, stream: int, channel: Channel, increment: int) -> None:
        self._events.append(StdinCredit(stream, increment))


def _check_window(window: object) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= MAX_CREDIT:
        raise UsageError(f"window must be an int in 0..{MAX_CREDIT}, not {window!r}")


def _exit_fields(stream: int, obj: Mapping[str, Any]) -> Exited:
    exit_code = _int(obj, "exit_code", 0, 255, None)
    signal = _int(obj, "signal", 1, _SIGNAL_MAX, None)
    if (exit_code is None) == (signal is None):
        raise _BadField(f"exactly one of exit_code and signal is set, not {exit_code}, {signal}")
    return Exited(
        stream, exit_code, signal, _bool(obj, "timed_out"), _bool(obj, "output_incomplete")
    )


class AgentSession(_Session):
    """The agent end of one v2 connection, after the hello.

    Events: :class:`ExecRequested` (answer with :meth:`started` or
    :meth:`exec_failed`), :class:`StdinData` (return the credit with
    :meth:`stdin_consumed` once written), :class:`SignalRequested`,
    :class:`ResizeRequested`, :class:`CloseRequested`, :class:`OutputCredit`,
    :class:`RequestFailed`. A started stream ends with :meth:`exited`, which
    requires END on both output channels first (:meth:`send_output` with
    ``end=True``; an empty END needs no credit). A file stream starts with
    :class:`FileRequested` (a put then gets :class:`StdinData` and
    :class:`CommitRequested`) and ends with :meth:`file_done` or
    :meth:`file_failed`.
    """

    _receives = frozenset(
        {
            FrameType.EXEC,
            FrameType.FILE,
            FrameType.COMMIT,
            FrameType.STDIN,
            FrameType.WINDOW,
            FrameType.SIGNAL,
            FrameType.RESIZE,
            FrameType.CLOSE,
        }
    )
    _credited = frozenset(_OUTPUT)

    def __init__(
        self, hello: HelloRequest, limits: AgentLimits | None = None, *, stream_data: bool = False
    ) -> None:
        limits = limits or AgentLimits()
        super().__init__(limits.max_frame, limits.max_control, hello.max_frame, stream_data)
        self.limits = limits
        """What this agent announced in its hello answer."""

    def next_event(self) -> AgentEvent | None:
        """The next event, or None when more bytes are needed."""
        return self._events.popleft() if self._events else None

    # -- answers ---------------------------------------------------------------------------

    def started(self, stream: int, pid: int) -> None:
        """Queue STARTED: the process of ``stream`` runs as ``pid`` (a brief stream sends none)."""
        state = self._process(stream)
        if state.started:
            raise UsageError(f"stream {stream} has already started")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 1 <= pid <= U32_MAX:
            raise UsageError(f"a pid is an int in 1..{U32_MAX}, not {pid!r}")
        state.started = True
        if not state.brief:
            self._queue_json(stream, FrameType.STARTED, {"pid": pid})

    def exec_failed(self, stream: int, code: str, message: str, errno: str | None = None) -> None:
        """Queue ERROR for the EXEC of ``stream``, which started nothing; the stream ends."""
        state = self._process(stream)
        if state.started:
            raise UsageError(f"stream {stream} has started: it ends with exited(), not an ERROR")
        del self._streams[stream]
        self._queue_error(stream, FrameType.EXEC, code, message, errno)

    def request_failed(
        self, stream: int, type: FrameType, code: str, message: str, errno: str | None = None
    ) -> None:
        """Queue ERROR for a request of ``type`` on ``stream`` that could not be carried out.

        Nothing ends: use it for a SIGNAL or RESIZE that failed, not for EXEC.
        """
        self._check_usable()
        if type == FrameType.EXEC:
            raise UsageError("a refused EXEC is answered with exec_failed()")
        self._queue_error(stream, type, code, message, errno)

    def send_output(
        self,
        stream: int,
        channel: Channel,
        data: bytes | bytearray | memoryview,
        end: bool = False,
    ) -> int:
        """Queue as much of ``data`` as the channel's credit allows; how many bytes that is.

        ``end`` closes the channel after ``data``, once all of it went (with
        ``data`` empty it needs no credit). After CLOSE the bytes are dropped
        (reported as taken) and only END goes out.
        """
        state = self._open(stream)
        if channel not in _OUTPUT:
            raise UsageError(f"output goes on STDOUT or STDERR, not {channel!r}")
        if not state.started:
            raise UsageError(f"stream {stream} has not started: call started() first")
        if state.ended[channel]:
            raise UsageError(f"{channel.name} of stream {stream} has already ended")
        if state.closing:
            if end:
                self._send_data(stream, state, channel, b"", True)
            return len(data) if not isinstance(data, memoryview) else data.nbytes
        return self._send_data(stream, state, channel, data, end)

    def output_header(self, stream: int, channel: Channel, n: int) -> bytes:
        """Take ``n`` bytes of ``channel``'s credit for a payload written outside the session
        (spliced from a pipe into the socket, never copied into Python); the frame's header.

        Nothing is queued: the caller writes the header and then exactly ``n`` payload
        bytes, with nothing between them, so :meth:`data_to_send` must be empty first. The
        frame carries no END (a channel ends with :meth:`send_output`).
        """
        state = self._process(stream)
        if channel not in _OUTPUT:
            raise UsageError(f"output goes on STDOUT or STDERR, not {channel!r}")
        if not state.started or state.ended[channel] or state.closing:
            raise UsageError(f"{channel.name} of stream {stream} takes no output now")
        if self._send:
            raise UsageError("queued frames go first: write data_to_send() before this frame")
        if isinstance(n, bool) or not isinstance(n, int):
            raise UsageError(f"a payload size is an int, not {n!r}")
        if not 0 < n <= min(state.credit[channel], self._peer_max_frame):
            raise UsageError(
                f"{n} bytes do not fit the {state.credit[channel]} bytes of credit left or the"
                f" host's max_frame ({self._peer_max_frame})"
            )
        state.credit[channel] -= n
        return HEADER.pack(n, stream, _CHANNEL_TYPE[channel], 0)

    def exited(
        self,
        stream: int,
        *,
        exit_code: int | None = None,
        signal: int | None = None,
        timed_out: bool = False,
        output_incomplete: bool = False,
    ) -> None:
        """Queue EXIT, the last frame of a started stream; END must have gone on both channels."""
        state = self._process(stream)
        if not state.started:
            raise UsageError(f"stream {stream} never started: end it with exec_failed()")
        if not state.ended[Channel.STDOUT] or not state.ended[Channel.STDERR]:
            raise UsageError(
                f"EXIT of stream {stream} before END on both STDOUT and STDERR: send the rest"
                " of the output with end=True first"
            )
        try:
            exit = _exit_fields(stream, {"exit_code": exit_code, "signal": signal})
        except _BadField as exc:
            raise UsageError(str(exc)) from None
        del self._streams[stream]
        self._queue_json(
            stream,
            FrameType.EXIT,
            {
                "exit_code": exit.exit_code,
                "signal": exit.signal,
                "timed_out": bool(timed_out),
                "output_incomplete": bool(output_incomplete),
            },
        )

    def file_done(self, stream: int, result: Mapping[str, Any]) -> None:
        """Queue RESULT, the last frame of a file stream that succeeded.

        A get or listdir must have ended STDOUT first; a put must have had its COMMIT.
        """
        state = self._file(stream)
        if not state.ended[Channel.STDOUT]:
            raise UsageError(f"RESULT of stream {stream} before END on STDOUT")
        if state.op in UPLOAD_OPS and not state.committed:
            raise UsageError(f"RESULT of the put on stream {stream} before its COMMIT")
        payload = json_payload(result)
        del self._streams[stream]
        self._send.append(encode_frame(stream, FrameType.RESULT, 0, payload))

    def file_failed(self, stream: int, code: str, message: str, errno: str | None = None) -> None:
        """Queue ERROR for the file operation of ``stream``; the stream ends."""
        self._file(stream)
        del self._streams[stream]
        self._queue_error(stream, FrameType.FILE, code, message, errno)

    def stdin_consumed(self, stream: int, n: int) -> None:
        """``n`` bytes of stdin reached the process: queue WINDOW to return that credit.

        Does nothing once the stream or its stdin has ended.
        """
        self._check_usable()
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise UsageError(f"a credit increment is an int >= 0, not {n!r}")
        state = self._streams.get(stream)
        if state is None or state.ended[Channel.STDIN] or n == 0:
            return
        if state.credit[Channel.STDIN] + n > MAX_CREDIT:
            raise UsageError(f"stdin credit of stream {stream} would exceed {MAX_CREDIT}")
        state.credit[Channel.STDIN] += n
        self._send.append(encode_window(stream, Channel.STDIN, n))

    # -- received frames -------------------------------------------------------------------

    def _claim(self, frame: Frame) -> None:
        """Take the id of the stream ``frame`` opens; a violation unless it is a new odd one."""
        if frame.stream % 2 == 0 or frame.stream <= self._last_id:
            raise _violation(
                frame, f"stream ids are odd and increasing (the last was {self._last_id})"
            )
        self._last_id = frame.stream

    def _on_exec(self, frame: Frame) -> None:
        stream = frame.stream
        self._claim(frame)
        request = _payload(frame)
        try:
            stdin = _bool(request, "stdin")
            brief = _bool(request, "brief")
            window = _int(request, "window", 0, MAX_CREDIT, DEFAULT_WINDOW)
        except _BadField as exc:
            self._queue_error(stream, FrameType.EXEC, "bad_request", str(exc))
            return
        if len(self._streams) >= self.limits.max_streams:
            self._queue_error(
                stream,
                FrameType.EXEC,
                "limit",
                f"{self.limits.max_streams} process streams are open on this connection already"
                " (max_streams)",
            )
            return
        credit = [self.limits.stdin_window if stdin else 0, window, window]
        self._streams[stream] = _Stream(stdin, request.get("pty") is not None, credit, brief=brief)
        self._events.append(ExecRequested(stream, request))

    def _on_file(self, frame: Frame) -> None:
        stream = frame.stream
        self._claim(frame)
        request = _payload(frame)
        op = request.get("op")
        try:
            if not isinstance(op, str):
                raise _BadField(f"op must be a string, not {op!r}")
            window = _int(request, "window", 0, MAX_CREDIT, DEFAULT_WINDOW)
        except _BadField as exc:
            self._queue_error(stream, FrameType.FILE, "bad_request", str(exc))
            return
        limits = self.limits
        if len(self._streams) >= limits.max_streams or self.files >= limits.max_files:
            self._queue_error(
                stream,
                FrameType.FILE,
                "limit",
                f"{len(self._streams)} streams ({self.files} of them file streams) are open on"
                f" this connection already (max_streams {limits.max_streams}, max_files"
                f" {limits.max_files})",
            )
            return
        self._streams[stream] = _file_stream(op, window, limits.file_window)
        self._events.append(FileRequested(stream, op, request))

    def _on_stream_frame(self, state: _Stream, frame: Frame) -> None:
        stream, type = frame.stream, frame.type
        if type == FrameType.STDIN:
            if not state.stdin:
                raise _violation(frame, "the stream was opened without a stdin pipe")
            self._take_credit(state, Channel.STDIN, frame)
            if frame.payload or frame.end:
                self._events.append(StdinData(stream, frame.payload, frame.end))
        elif type == FrameType.CLOSE:
            if not state.closing:
                state.closing = True
                self._events.append(CloseRequested(stream))
        elif type == FrameType.COMMIT:
            self._on_commit(state, frame)
        elif state.op is not None:  # SIGNAL or RESIZE
            self._queue_error(stream, type, "unsupported", "a file stream runs no process")
        elif type == FrameType.SIGNAL:
            try:
                signal = _int(_payload(frame), "signal", 1, _SIGNAL_MAX)
            except _BadField as exc:
                self._queue_error(stream, type, "bad_request", str(exc))
                return
            self._events.append(SignalRequested(stream, signal))
        else:  # RESIZE
            request = _payload(frame)
            if not state.pty:
                self._queue_error(stream, type, "unsupported", "the stream has no terminal")
                return
            try:
                rows = _int(request, "rows", 0, _TERMINAL_MAX)
                cols = _int(request, "cols", 0, _TERMINAL_MAX)
            except _BadField as exc:
                self._queue_error(stream, type, "bad_request", str(exc))
                return
            self._events.append(ResizeRequested(stream, rows, cols))

    def _on_commit(self, state: _Stream, frame: Frame) -> None:
        if state.op not in UPLOAD_OPS:
            raise _violation(frame, "only a put stream is committed")
        if not state.ended[Channel.STDIN]:
            raise _violation(frame, "COMMIT before the put's bytes ended (STDIN END)")
        if state.committed:
            raise _violation(frame, "the put was already committed")
        sha256 = _payload(frame).get("sha256")
        if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
            raise _violation(frame, f"sha256 must be 64 lowercase hex digits, not {sha256!r}")
        state.committed = True
        self._events.append(CommitRequested(frame.stream, sha256))

    def _on_credit(self, stream: int, channel: Channel, increment: int) -> None:
        self._events.append(OutputCredit(stream, channel, increment))

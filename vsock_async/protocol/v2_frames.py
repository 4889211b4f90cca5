"""Protocol v2 frames, sans I/O: the header, the frame types, encoders and an incremental decoder.

Every frame, in both directions (docs/protocol.md, "Wire protocol v2")::

    u32 BE payload length | u32 BE stream id | u8 type | u8 flags | payload

Import these names from :mod:`vsock_async.protocol.v2`.

The decoder follows the v1 memory rules: a payload length is hostile, so it
is checked against its limit before anything is allocated (data and unknown
types against ``max_frame``, EXEC against the larger of the two limits, the
other control types against ``max_control``); headers and small payloads are
parsed in a fixed scratch buffer, and a large payload gets memory only as its
bytes arrive. The payload of a frame of an unknown type is read and dropped,
never stored.

A decoder made with ``stream_data=True`` does not assemble large data
payloads (STDIN, STDOUT, STDERR above ``INLINE_MAX``): it receives them into
one reused buffer of ``DATA_BUFFER`` bytes and hands each piece on as it
arrives: a :class:`Frame` with the whole ``length`` and the piece's
``offset``; the first (offset 0) lets the frame be checked whole before any
of it is used. Bulk data then
costs no allocation at all; the price is that a piece's payload is a
``memoryview`` valid only until the next :meth:`FrameDecoder.get_buffer`.
"""

from __future__ import annotations

import enum
import json
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ..errors import FrameTooLarge, ProtocolError, UsageError

# The v1 memory rules, shared: a scratch for headers and small payloads; larger payloads get
# growing chunks, then their final object once an eighth has arrived.
from ._body import INLINE_MAX, SCRATCH_SIZE, LargeBody
from .limits import U32_MAX, MiB

__all__ = [
    "DEFAULT_MAX_FRAME",
    "FLAG_END",
    "HEADER",
    "MAX_CONTROL",
    "MAX_CREDIT",
    "Channel",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "encode_frame",
    "encode_json",
    "encode_window",
    "frame_parts",
    "write_pieces",
]

HEADER: Final = struct.Struct(">IIBB")
"""The frame header: payload length, stream id, type, flags."""

DEFAULT_MAX_FRAME: Final = 1 * MiB
"""The default largest payload of a data frame (STDIN, STDOUT, STDERR)."""

DATA_BUFFER: Final = 256 * 1024
"""The reused receive buffer of a ``stream_data`` decoder: pieces of a large data payload."""

MAX_CONTROL: Final = 64 * 1024
"""The default largest payload of a control frame; every v2 peer accepts at least this much."""

MAX_CREDIT: Final = 2**31 - 1
"""The largest credit a channel may hold; a WINDOW that would exceed it is a violation."""

FLAG_END: Final = 0x01
"""STDIN/STDOUT/STDERR flag: the channel ends after this frame's bytes."""


class FrameType(enum.IntEnum):
    """The type byte of a v2 frame."""

    EXEC = 0x01
    STARTED = 0x02
    FILE = 0x03
    STDIN = 0x10
    STDOUT = 0x11
    STDERR = 0x12
    WINDOW = 0x20
    SIGNAL = 0x30
    RESIZE = 0x31
    CLOSE = 0x32
    COMMIT = 0x33
    EXIT = 0x40
    RESULT = 0x41
    ERROR = 0x50
    PING = 0x60
    PONG = 0x61


class Channel(enum.IntEnum):
    """The channel byte of a WINDOW frame, and which data type a credit is for."""

    STDIN = 0
    STDOUT = 1
    STDERR = 2


KNOWN_TYPES: Final = frozenset(FrameType)
"""The type bytes this version knows; frames of other types are skipped and answered ERROR."""
# Limited by max_control; EXEC (whose argv can be large) by the larger of max_control and
# max_frame; everything else (data, unknown types) by max_frame.
_CONTROL_TYPES: Final = frozenset(
    {
        FrameType.STARTED,
        FrameType.FILE,
        FrameType.WINDOW,
        FrameType.SIGNAL,
        FrameType.RESIZE,
        FrameType.CLOSE,
        FrameType.COMMIT,
        FrameType.EXIT,
        FrameType.RESULT,
        FrameType.ERROR,
        FrameType.PING,
        FrameType.PONG,
    }
)
_DATA_TYPES: Final = frozenset({FrameType.STDIN, FrameType.STDOUT, FrameType.STDERR})
_WINDOW = struct.Struct(">BI")
WINDOW_SIZE: Final = _WINDOW.size
"""The length of a WINDOW payload: u8 channel, u32 increment."""


_TYPE_NAMES: Final = {int(known): known.name for known in FrameType}


def type_name(type: int) -> str:
    """``STDOUT`` for a known type, ``type 0x7f`` for another: for messages."""
    return _TYPE_NAMES.get(type) or f"type {type:#04x}"


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame. A frame of an unknown type carries an empty payload (it was skipped)."""

    stream: int
    type: int
    flags: int = 0
    payload: bytes | memoryview = b""
    offset: int = 0
    """Where ``payload`` starts in the frame's payload: above 0 for a later piece of a
    streamed payload (``stream_data`` decoders; a piece's payload is a ``memoryview``
    valid until the decoder lends memory again)."""
    length: int = -1
    """The whole payload's length when this is a piece of it; -1 when ``payload`` is whole."""

    @property
    def total(self) -> int:
        """The length of the frame's whole payload."""
        return len(self.payload) if self.length < 0 else self.length

    @property
    def more(self) -> bool:
        """True for a piece of a payload that more pieces follow."""
        return self.offset + len(self.payload) < self.total

    @property
    def end(self) -> bool:
        """True when the END flag is set (on a streamed payload: on its last piece)."""
        return bool(self.flags & FLAG_END) and not self.more


_JOIN_BELOW: Final = 4096


def write_pieces(chunks: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """Queued frame parts (headers, payloads) regrouped for one ``transport.write()`` each:
    runs of pieces under 4 KiB joined, larger payloads passed on uncopied.

    Not ``writelines``: on Python 3.12.0-3.12.8 and 3.13.0-3.13.1 it never pauses the
    protocol (CPython gh-127655), so a peer that stops reading would grow the buffer
    without bound; ``write`` pauses it. The price of not copying a large payload is one
    more send for the header before it.
    """
    out: list[bytes | memoryview] = []
    small: list[bytes | memoryview] = []
    for chunk in chunks:
        if len(chunk) < _JOIN_BELOW:
            small.append(chunk)
            continue
        if small:
            out.append(small[0] if len(small) == 1 else b"".join(small))
            small = []
        out.append(chunk)
    if small:
        out.append(small[0] if len(small) == 1 else b"".join(small))
    return out


def frame_parts(
    stream: int, type: int, flags: int, payload: bytes | bytearray | memoryview
) -> tuple[bytes, bytes | bytearray | memoryview]:
    """The header and the payload of one frame, for ``writelines`` without copying the payload."""
    if not 0 <= stream <= U32_MAX:
        raise UsageError(f"stream id {stream} is outside 0..{U32_MAX}")
    if not 0 <= type <= 0xFF or not 0 <= flags <= 0xFF:
        raise UsageError(f"frame type {type} and flags {flags} must each fit in one byte")
    length = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
    if length > U32_MAX:
        raise UsageError(f"a payload of {length} bytes cannot be framed (u32 length)")
    return HEADER.pack(length, stream, type, flags), payload


def encode_frame(
    stream: int, type: int, flags: int = 0, payload: bytes | bytearray | memoryview = b""
) -> bytes:
    """One whole frame as ``bytes``."""
    header, body = frame_parts(stream, type, flags, payload)
    return header + body


_JSON_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""One encoder for every payload: ``json.dumps`` with options builds a new one per call."""


def json_payload(obj: Mapping[str, Any]) -> bytes:
    """A JSON object as compact UTF-8; :class:`UsageError` for what JSON cannot carry."""
    try:
        return _JSON_ENCODER.encode(obj).encode()
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise UsageError(f"cannot encode {obj!r} as a v2 JSON payload: {exc}") from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_JSON_DECODER: Final = json.JSONDecoder(parse_constant=_no_constants)
"""One decoder for every payload: ``json.loads`` with an option builds a new one per call."""


def decode_json(payload: bytes | memoryview, what: str) -> dict[str, Any]:
    """A JSON object from strict UTF-8; :class:`ProtocolError` naming ``what`` otherwise."""
    try:
        obj = _JSON_DECODER.decode(bytes(payload).decode())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"{what} is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is JSON but not an object: {payload[:100]!r}")
    return obj


def encode_json(stream: int, type: int, obj: Mapping[str, Any]) -> bytes:
    """One frame whose payload is ``obj`` as compact UTF-8 JSON."""
    return encode_frame(stream, type, 0, json_payload(obj))


def encode_window(stream: int, channel: Channel, increment: int) -> bytes:
    """One WINDOW frame: ``increment`` more bytes of credit on ``channel`` of ``stream``."""
    if not 0 <= increment <= MAX_CREDIT:
        raise UsageError(f"a credit increment must be in 0..{MAX_CREDIT}, not {increment}")
    return encode_frame(stream, FrameType.WINDOW, 0, _WINDOW.pack(channel, increment))


def decode_window(payload: bytes | memoryview) -> tuple[int, int]:
    """``(channel, increment)`` from a WINDOW payload, which must be 5 bytes long."""
    channel, increment = _WINDOW.unpack(payload)
    return channel, increment


class FrameDecoder:
    """Turns v2 bytes, in any chunking, into :class:`Frame` objects.

    Push bytes with :meth:`receive_data`, or write them into the memory
    :meth:`get_buffer` lends and commit them with :meth:`buffer_updated` (the
    ``asyncio.BufferedProtocol`` shape, so a large payload is received in
    place). Read frames with :meth:`next_frame`. A payload above its limit
    raises :class:`FrameTooLarge`; after that the decoder is unusable. Input
    after an error or after :meth:`receive_eof` is a :class:`UsageError`.
    With ``stream_data``, large data payloads come as pieces (see the module's
    docstring): take every frame, and copy what you keep, before lending again.
    """

    def __init__(
        self,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_control: int = MAX_CONTROL,
        *,
        stream_data: bool = False,
    ):
        for name, value in (("max_frame", max_frame), ("max_control", max_control)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U32_MAX:
                raise UsageError(f"{name} must be an int in 0..{U32_MAX}, not {value!r}")
        self.max_frame = max_frame
        self.max_control = max_control
        self._scratch = bytearray(SCRATCH_SIZE)
        self._view = memoryview(self._scratch)
        self._start = 0
        self._end = 0
        self._length = -1  # payload length of the frame being read; -1 while reading a header
        self._stream = 0
        self._type = 0
        self._flags = 0
        self._skip = 0  # bytes of an unknown type's payload still to drop
        self._body: LargeBody | None = None  # a large payload being received
        self._stream_data = stream_data
        self._data: bytearray | None = None  # the reused buffer of streamed data payloads
        self._data_left = 0  # bytes of the data payload being streamed still to come
        self._data_offset = 0  # where the next piece of it starts
        self._lent = -1  # size of the buffer last lent; -1 when none is outstanding
        self._frames: deque[Frame] = deque()
        self._error: ProtocolError | None = None
        self._eof = False

    # -- input --------------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Memory for the next bytes; write into it, then call :meth:`buffer_updated`."""
        self._check_usable()
        buffer = self._next_buffer()
        self._lent = len(buffer)
        return buffer

    def _next_buffer(self) -> memoryview:
        if self._data_left:
            if self._data is None:
                self._data = bytearray(DATA_BUFFER)
            return memoryview(self._data)[: self._data_left]
        if self._body is not None:
            return self._body.buffer()
        if self._start and SCRATCH_SIZE - self._end < INLINE_MAX:
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Commit ``nbytes`` written at the start of the buffer last lent by :meth:`get_buffer`."""
        self._check_usable()
        if not 0 <= nbytes <= self._lent:
            lent = "no buffer was lent" if self._lent < 0 else f"{self._lent} bytes were lent"
            raise UsageError(f"buffer_updated({nbytes}) but {lent}")
        self._lent = -1
        if nbytes == 0:
            return
        if self._data_left:
            assert self._data is not None
            self._data_left -= nbytes
            self._piece(memoryview(self._data)[:nbytes])
            return
        body = self._body
        if body is not None:
            if body.commit(nbytes):
                self._body = None
                payload = body.take()
                self._frame_done(payload if isinstance(payload, bytes) else payload.finish())
                self._parse()
            return
        self._end += nbytes
        self._parse()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Push bytes received from the peer; ``b""`` means end of stream. With
        ``stream_data``, the pieces of a streamed payload are views of ``data`` itself."""
        if not data:
            self.receive_eof()
            return
        src = memoryview(data).cast("B")
        while src:
            if self._data_left:
                self._check_usable()
                n = min(len(src), self._data_left)
                self._data_left -= n
                self._piece(src[:n])
                src = src[n:]
                continue
            with self.get_buffer() as dst:
                n = min(len(dst), len(src))
                dst[:n] = src[:n]
            src = src[n:]
            self.buffer_updated(n)

    def receive_eof(self) -> None:
        """The peer will send nothing more (see :attr:`in_frame` for a cut frame)."""
        self._eof = True

    def release(self) -> None:
        """Free the reused data buffer unless a payload is streaming into it (an idle
        connection need not hold it); the next large data payload makes a new one."""
        if not self._data_left:
            self._data = None

    # -- output -------------------------------------------------------------------------

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed."""
        return self._frames.popleft() if self._frames else None

    @property
    def in_frame(self) -> bool:
        """True when part of a frame has arrived and the rest has not."""
        return self._length >= 0 or self._skip > 0 or self._data_left > 0 or self._end > self._start

    @property
    def eof(self) -> bool:
        """True once :meth:`receive_eof` was called."""
        return self._eof

    # -- parser -------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise UsageError(f"the v2 decoder is unusable after an earlier error: {self._error}")
        if self._eof:
            raise UsageError("data fed to a v2 decoder after the end of the stream")

    def _limit(self, type: int) -> int:
        """The largest payload a frame of ``type`` may announce."""
        if type in _CONTROL_TYPES:
            return self.max_control
        if type == FrameType.EXEC:
            return max(self.max_frame, self.max_control)
        return self.max_frame

    def _compact(self) -> None:
        start, end = self._start, self._end
        self._scratch[: end - start] = self._view[start:end]
        self._start, self._end = 0, end - start

    def _frame_done(self, payload: bytes) -> None:
        self._length = -1
        self._frames.append(Frame(self._stream, self._type, self._flags, payload))

    def _piece(self, payload: bytes | memoryview) -> None:
        """A piece of the data payload being streamed."""
        offset = self._data_offset
        self._data_offset += len(payload)
        self._frames.append(
            Frame(self._stream, self._type, self._flags, payload, offset, self._length)
        )
        if not self._data_left:
            self._length = -1

    def _parse(self) -> None:
        view = self._view
        start, end = self._start, self._end
        while True:
            if self._skip:
                n = min(self._skip, end - start)
                self._skip -= n
                start += n
                if self._skip:
                    break
                self._frame_done(b"")
                continue
            length = self._length
            if length < 0:
                if end - start < HEADER.size:
                    break
                length, stream, type, flags = HEADER.unpack_from(view, start)
                start += HEADER.size
                limit = self._limit(type)
                if length > limit:
                    self._start, self._end = start, end
                    what = f"{type_name(type)} payload on stream {stream}"
                    self._error = FrameTooLarge(what, length, limit)
                    raise self._error
                self._stream, self._type, self._flags = stream, type, flags
                if type not in KNOWN_TYPES:
                    self._length = -1
                    self._skip = length
                    if not length:
                        self._frame_done(b"")
                    continue
                self._length = length
            available = end - start
            if length <= available:
                payload = view[start : start + length].tobytes() if length else b""
                start += length
                self._frame_done(payload)
                continue
            if length > INLINE_MAX:
                if self._stream_data and type in _DATA_TYPES:
                    # What has come is a first piece (a view of the scratch, which is reused
                    # only once lent again); the rest goes through the data buffer.
                    self._data_left = length - available
                    self._data_offset = 0
                    if available:  # a copy: the scratch is reused before the next piece
                        self._piece(view[start:end].tobytes())
                else:
                    self._body = LargeBody(length, view[start:end])
                start = end = 0
            break
        if start == end:
            start = end = 0
        self._start = start
        self._end = end

"""The v1 wire protocol, sans I/O: encoders and incremental decoders, no sockets, no clock.

Command, host to guest: ``u32 BE length N`` then ``N`` bytes.
Result, guest to host: ``u32 BE length`` + stdout, ``u32 BE length`` + stderr,
then one byte, the exit code.

The decoders take bytes in any chunking, either pushed with
:meth:`receive_data` or written by the caller into the memory that
:meth:`get_buffer` lends and committed with :meth:`buffer_updated` (the
shape of ``asyncio.BufferedProtocol``, which lets a socket ``recv_into`` a
large body in place). Both paths run the same parser. Complete frames come
out of :meth:`next_event`. Length prefixes are attacker-controlled: a body
above its limit fails with :class:`FrameTooLarge` before anything is
allocated for it, and a body below it gets memory only as its bytes arrive.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from ..errors import FrameTooLarge, ProtocolError, UsageError
from ..results import CommandResult, new_result
from ._body import (
    INLINE_MAX,
    SCRATCH_MIN,
    SCRATCH_SIZE,
    LargeBody,
    WholeBody,
    copy_into_lent_memory,
)
from .limits import U32_MAX, Limits

__all__ = [
    "AGENT_NOTE_PREFIX",
    "PROBE_COMMAND",
    "Command",
    "CommandDecoder",
    "OversizedCommand",
    "ResultDecoder",
    "agent_cut_notes",
    "encode_command",
    "encode_result",
    "result_frame_parts",
]

PROBE_COMMAND = b":"
"""The readiness probe: a ready guest answers exit 0 with empty stdout and stderr."""

_U32 = struct.Struct(">I")
_unpack_u32 = _U32.unpack_from
_pack_u32 = _U32.pack


@dataclass(frozen=True, slots=True)
class Command:
    """A complete command frame, as the guest receives it."""

    command: bytes


@dataclass(frozen=True, slots=True)
class OversizedCommand:
    """A command longer than the limit; its body was read and discarded."""

    length: int
    limit: int


def encode_command(command: bytes) -> bytes:
    """Frame one command for the wire."""
    if len(command) > U32_MAX:
        raise UsageError(f"a command of {len(command)} bytes cannot be framed (u32 length)")
    return _pack_u32(len(command)) + command


def result_frame_parts(
    stdout: bytes | bytearray, stderr: bytes | bytearray, exit_code: int
) -> list[bytes | bytearray]:
    """The pieces of one result frame, to write one by one without copying large outputs."""
    if not 0 <= exit_code <= 255:
        raise UsageError(f"exit code {exit_code} is outside 0..255")
    if len(stdout) > U32_MAX or len(stderr) > U32_MAX:
        raise UsageError("stdout and stderr must each be shorter than 4 GiB")
    return [_pack_u32(len(stdout)), stdout, _pack_u32(len(stderr)), stderr, bytes((exit_code,))]


def encode_result(stdout: bytes, stderr: bytes, exit_code: int) -> bytes:
    """Frame one result for the wire."""
    return b"".join(result_frame_parts(stdout, stderr, exit_code))


_Event = TypeVar("_Event")

# Results are immutable, so every empty answer with a given exit code (each probe) can be
# one shared object instead of a new one per exchange.
_EMPTY_RESULTS = tuple(CommandResult(b"", b"", code) for code in range(256))
_NO_OUTPUT = bytes(8)  # the two zero length prefixes of a result without output

# v1 has no field that says output was cut: our agent says so in lines it appends to stderr
# (vsock_async/agent/runner.py, _finish), the first of them glued to the command's own last
# bytes when those end mid-line. Only the last lines are read, each note at most _NOTE_MAX
# bytes, and a note counts only if the length it names is that of the stream it names.
AGENT_NOTE_PREFIX: Final = b"vsock-async agent: "
_NOTE_MAX = 512
_STDOUT_CUT = re.compile(rb"stdout cut to its first (\d+) bytes of \d+ \(--max-output\)")
_STDERR_CUT = re.compile(
    rb"stderr cut: the command wrote \d+ bytes, more than fit in (\d+) \(--max-output\)"
    rb" with these notes"
)


def agent_cut_notes(stdout: bytes, stderr: bytes) -> tuple[bool, bool]:
    """Whether the agent's notes at the end of ``stderr`` say it cut stdout, and stderr."""
    out_cut = err_cut = False
    end = len(stderr)
    while end and stderr[end - 1] == 0x0A:  # each note ends a line; stop at the first non-note
        at = stderr.rfind(AGENT_NOTE_PREFIX, max(0, end - 1 - _NOTE_MAX), end - 1)
        note = stderr[at + len(AGENT_NOTE_PREFIX) : end - 1]
        if at < 0 or b"\n" in note:
            break
        if (match := _STDOUT_CUT.fullmatch(note)) is not None:
            out_cut = out_cut or int(match[1]) == len(stdout)
        elif (match := _STDERR_CUT.fullmatch(note)) is not None:
            err_cut = err_cut or int(match[1]) == len(stderr)
        end = at
    return out_cut, err_cut


def _result(stdout: bytes, stderr: bytes, exit_code: int) -> CommandResult:
    """A v1 result, with what the agent's notes say about truncation."""
    if stderr[-1:] == b"\n":
        out_cut, err_cut = agent_cut_notes(stdout, stderr)
        if out_cut or err_cut:
            return CommandResult(
                stdout, stderr, exit_code, stdout_truncated=out_cut, stderr_truncated=err_cut
            )
    return new_result(stdout, stderr, exit_code)


def _len(field: bytes | WholeBody) -> int:
    return len(field) if isinstance(field, bytes) else field.length


class _FrameDecoder(Generic[_Event]):
    """A parser for frames made of length-prefixed fields, optionally ended by one byte.

    Prefixes and small bodies are parsed in place in a scratch buffer of ``SCRATCH_MIN``
    bytes, grown to ``SCRATCH_SIZE`` only for a frame that does not fit (an idle connection
    holds one, so it stays small). A body larger than ``INLINE_MAX`` is a
    :class:`~._body.LargeBody`: chunks
    that grow with what has arrived, then its final ``bytes`` object. The
    caller's reads go straight into that memory.
    """

    _names: tuple[str, ...]
    _trailer: bool

    def __init__(self, limits: Sequence[int]) -> None:
        self._limits = tuple(limits)
        self._scratch = bytearray(SCRATCH_MIN)
        self._view = memoryview(self._scratch)
        self._grown = False  # the scratch is SCRATCH_SIZE
        self._start = 0
        self._end = 0
        # Tuples, not lists: an idle connection holds these, and the empty tuple is shared
        # (with thousands of guests, each list would be one more object for every full
        # collection of the cyclic GC to walk). They hold at most a few items.
        self._fields: tuple[bytes | WholeBody, ...] = ()
        self._length = -1  # length of the body being read; -1 while waiting for a prefix
        self._body: LargeBody | None = None  # a large body being received
        self._events: tuple[_Event, ...] = ()
        self._error: ProtocolError | None = None
        self._eof = False

    # -- input --------------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Memory for the next bytes; write into it, then call :meth:`buffer_updated`."""
        if self._error is not None or self._eof:
            self._check_usable()
        if self._body is not None:
            return self._body.buffer()
        if self._end == len(self._scratch):
            self._make_room()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Commit ``nbytes`` written at the start of the last buffer lent."""
        if nbytes <= 0:
            return
        body = self._body
        if body is not None:
            if body.commit(nbytes):
                self._body = None
                # A WholeBody is finished with the frame: by then the view lent for this read
                # is gone.
                self._field_done(body.take())
                self._parse()
            return
        self._end += nbytes
        self._parse()

    def receive_data(self, data: bytes) -> None:
        """Push bytes received from the peer; ``b""`` means end of stream."""
        if data:
            copy_into_lent_memory(self, data)
        else:
            self.receive_eof()

    def receive_eof(self) -> None:
        """The peer will send nothing more."""
        self._eof = True

    # -- output -------------------------------------------------------------------------

    def next_event(self) -> _Event | None:
        """The next complete frame, or None when more bytes are needed."""
        events = self._events
        if events:
            self._events = events[1:]
            return events[0]
        return None

    @property
    def in_frame(self) -> bool:
        """True when part of a frame has arrived and the rest has not."""
        return bool(self._fields) or self._length >= 0 or self._end > self._start

    @property
    def eof(self) -> bool:
        """True once :meth:`receive_eof` was called."""
        return self._eof

    def bytes_in_frame(self) -> int:
        """How many bytes of the unfinished frame have arrived (for error messages)."""
        held = sum(4 + _len(f) for f in self._fields) + (self._end - self._start)
        if self._body is not None:
            held += 4 + self._body.received
        elif self._length >= 0:
            held += 4
        return held

    # -- parser -------------------------------------------------------------------------

    def _check_usable(self) -> None:
        # Feeding a decoder that failed, or after saying the stream ended, is the caller's bug.
        if self._error is not None:
            raise UsageError(f"bytes fed to a decoder after an earlier error: {self._error}")
        if self._eof:
            raise UsageError("bytes fed to a decoder after the end of the stream")

    def _fail(self, error: ProtocolError) -> ProtocolError:
        self._error = error
        return error

    def _make_room(self) -> None:
        """Make room after the unparsed bytes, which reach the scratch's end: grow a small
        scratch, or move them to the start of a grown one (SCRATCH_SIZE always holds more than
        the inline part of a field, all that is left unparsed)."""
        if not self._grown:
            self._resize(SCRATCH_SIZE)
            return
        start, end = self._start, self._end
        self._scratch[: end - start] = self._view[start:end]
        self._start, self._end = 0, end - start

    def _resize(self, size: int) -> None:
        """A new scratch of ``size`` bytes holding the unparsed bytes at its start."""
        held = self._view[self._start : self._end]
        scratch = bytearray(size)
        scratch[: len(held)] = held
        self._scratch, self._view = scratch, memoryview(scratch)
        self._start, self._end = 0, len(held)
        self._grown = size > SCRATCH_MIN

    def _field_done(self, body: bytes | WholeBody) -> None:
        self._length = -1
        self._fields += (body,)
        if len(self._fields) == len(self._names) and not self._trailer:
            self._frame_done(None)

    def _frame_done(self, trailer: int | None) -> None:
        fields = [f if isinstance(f, bytes) else f.finish() for f in self._fields]
        self._fields = ()
        self._events += (self._make_event(fields, trailer),)

    def _make_event(self, fields: list[bytes], trailer: int | None) -> _Event:
        raise NotImplementedError

    def _on_too_large(self, length: int, limit: int) -> bool:
        """Handle a prefix above the limit; True if parsing goes on at ``self._start``."""
        raise self._fail(FrameTooLarge(self._names[len(self._fields)], length, limit))

    def _parse(self) -> None:
        view = self._view
        start, end = self._start, self._end
        nfields = len(self._names)
        while True:
            length = self._length
            if length < 0:
                if len(self._fields) == nfields:  # only the trailing byte is missing
                    if start == end:
                        break
                    trailer = view[start]
                    start += 1
                    self._frame_done(trailer)
                    continue
                if end - start < 4:
                    break
                (length,) = _unpack_u32(view, start)
                start += 4
                limit = self._limits[len(self._fields)]
                if length > limit:
                    self._start = start
                    self._end = end
                    if not self._on_too_large(length, limit):
                        return
                    start, end = self._start, self._end
                    continue
                self._length = length
            available = end - start
            if length <= available:
                body = view[start : start + length].tobytes() if length else b""
                start += length
                self._field_done(body)
                continue
            if length > INLINE_MAX:
                self._body = LargeBody(length, view[start:end])
                start = end = 0
            break
        if start == end:
            start = end = 0
        self._start = start
        self._end = end


class ResultDecoder(_FrameDecoder[CommandResult]):
    """Decodes result frames (guest to host) into :class:`CommandResult` events; a host, which
    asks for one result at a time, takes each from :meth:`result_updated` instead."""

    _names = ("stdout", "stderr")
    _trailer = True

    def __init__(self, limits: Limits | None = None) -> None:
        limits = limits or Limits()
        super().__init__((limits.max_stdout, limits.max_stderr))
        self.set_output_limits(limits.max_stdout, limits.max_stderr)

    def set_output_limits(self, max_stdout: int, max_stderr: int) -> None:
        """Limits for the next result (a probe's answer, for one, must be empty)."""
        if self.in_frame:
            raise UsageError("output limits can only change between results")
        self._limits = (max_stdout, max_stderr)
        self._max_out = min(max_stdout, INLINE_MAX)
        self._max_err = min(max_stderr, INLINE_MAX)

    def result_updated(self, nbytes: int) -> CommandResult | None:
        """Commit ``nbytes`` as :meth:`buffer_updated` does and take the result they complete,
        or None; raises :class:`ProtocolError` if bytes beyond it are held too (a host asked
        for one result, and anything after it is not an answer). One call per read for the
        host; a small result arriving whole at a frame boundary is parsed here at once."""
        start = self._start
        end = self._end + nbytes
        if nbytes > 0 and self._length < 0 and not self._fields and end - start >= 9:
            if self._scratch.startswith(_NO_OUTPUT, start):  # every probe's answer
                if start + 9 == end:
                    result = _EMPTY_RESULTS[self._scratch[start + 8]]  # before any resize
                    self._start = self._end = 0
                    if self._grown:  # an answer that fits the small scratch: back to it
                        self._resize(SCRATCH_MIN)
                    return result
                raise self._beyond()
            view = self._view
            (n_out,) = _unpack_u32(view, start)
            err_at = start + 4 + n_out
            if n_out <= self._max_out and err_at + 5 <= end:
                (n_err,) = _unpack_u32(view, err_at)
                code_at = err_at + 4 + n_err
                if n_err <= self._max_err and code_at < end:
                    if code_at + 1 != end:
                        raise self._beyond()
                    out = view[start + 4 : err_at].tobytes() if n_out else b""
                    if not n_err:
                        result = new_result(out, b"", view[code_at])
                    elif view[code_at - 1] == 0x0A:  # stderr may end in the agent's notes
                        result = _result(out, view[err_at + 4 : code_at].tobytes(), view[code_at])
                    else:
                        result = new_result(
                            out, view[err_at + 4 : code_at].tobytes(), view[code_at]
                        )
                    self._start = self._end = 0
                    if self._grown and end <= SCRATCH_MIN:  # it fit the small scratch
                        self._resize(SCRATCH_MIN)
                    return result
        self.buffer_updated(nbytes)
        events = self._events
        if not events:
            return None
        if len(events) > 1 or self._fields or self._length >= 0 or self._end > self._start:
            raise self._beyond()
        self._events = ()
        return events[0]

    def _beyond(self) -> ProtocolError:
        return self._fail(ProtocolError("the guest sent bytes beyond the result of its command"))

    def holds_more(self) -> bool:
        """True if bytes beyond the results already taken are held: another result, or part
        of one (what a host that asked for one result must never see)."""
        return bool(self._events or self._fields) or self._length >= 0 or self._end > self._start

    def _make_event(self, fields: list[bytes], trailer: int | None) -> CommandResult:
        assert trailer is not None
        return _result(fields[0], fields[1], trailer)

    def partial_output(self) -> tuple[bytes, bytes]:
        """The stdout and stderr bytes of the unfinished frame that have arrived so far."""
        fields = [f if isinstance(f, bytes) else f.peek(f.length) for f in self._fields]
        if len(fields) < 2:
            if self._body is not None:
                tail = self._body.peek()
            elif self._length >= 0:
                tail = self._view[self._start : self._end].tobytes()
            else:
                tail = b""
            fields.append(tail)
        while len(fields) < 2:
            fields.append(b"")
        return fields[0], fields[1]


class CommandDecoder(_FrameDecoder[Command | OversizedCommand]):
    """Decodes command frames (host to guest) into :class:`Command` events.

    With ``skip_oversized=True`` (what an agent wants) a command above the
    limit is read and dropped piece by piece, then reported as one
    :class:`OversizedCommand` event, so the stream stays in step.
    """

    _names = ("command",)
    _trailer = False

    def __init__(self, max_command: int = Limits().max_command, *, skip_oversized: bool = False):
        super().__init__((max_command,))
        self._skip_oversized = skip_oversized
        self._skipping = 0
        self._skipped: OversizedCommand | None = None

    def _make_event(self, fields: list[bytes], trailer: int | None) -> Command:
        return Command(fields[0])

    @property
    def in_frame(self) -> bool:
        return self._skipping > 0 or super().in_frame

    def _on_too_large(self, length: int, limit: int) -> bool:
        if not self._skip_oversized:
            return super()._on_too_large(length, limit)
        self._skipped = OversizedCommand(length, limit)
        self._skipping = length
        return self._discard_scratch()

    def _discard_scratch(self) -> bool:
        """Drop buffered bytes of the skipped body; True once all of it is gone."""
        n = min(self._skipping, self._end - self._start)
        self._skipping -= n
        self._start += n
        if self._skipping == 0:
            assert self._skipped is not None
            self._events += (self._skipped,)
            self._skipped = None
            return True
        if self._start == self._end:
            self._start = self._end = 0
        return False

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._skipping:
            self._check_usable()
            return self._view[: min(self._skipping, len(self._scratch))]
        return super().get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._skipping and nbytes > 0:
            self._start, self._end = 0, nbytes
            if self._discard_scratch():
                self._parse()
            return
        super().buffer_updated(nbytes)

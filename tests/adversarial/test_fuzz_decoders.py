"""Hostile bytes into both decoders and the host's v1 state machine, in any chunking, through
both input paths.

Every decoder is checked against a reference parser written in the plainest
way over the whole byte string: the frames that come out must be exactly
the reference's, and the only exception ever raised is the one it predicts
(``FrameTooLarge``/``ProtocolError``). After every step the memory the
decoder holds is measured and must stay within the limits.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsock_async import (
    CommandResult,
    ConnectionLost,
    FrameTooLarge,
    Limits,
    ProtocolError,
    UsageError,
)
from vsock_async.protocol import (
    Command,
    CommandDecoder,
    OversizedCommand,
    ResultDecoder,
    encode_command,
    encode_result,
)
from vsock_async.protocol.v1_host import (
    ConnectionEnded,
    ConnectionState,
    HostConnectionV1,
    ResultReceived,
)

from .conftest import Scale

Decoder = ResultDecoder | CommandDecoder
Fed = Decoder | HostConnectionV1[int]  # what the feeders feed: the same two input paths
Event = CommandResult | Command | OversizedCommand

# What a decoder may hold beyond the body it is assembling: its scratch buffer (small, or
# grown for a frame that needs the room), and the first chunk it allocates for a body that
# does not fit it.
SCRATCH_SIZES = (1024, 8 * 1024)
FIRST_CHUNK = 64 * 1024


@dataclass
class Expected:
    """What the reference parser makes of a whole byte string."""

    events: list[Event]
    error: type[ProtocolError] | None  # the error the stream must end in, if any


def reference_results(data: bytes, limits: Limits) -> Expected:
    """Result frames, parsed the obvious way."""
    events: list[Event] = []
    pos = 0
    while True:
        fields = []
        for limit in (limits.max_stdout, limits.max_stderr):
            if len(data) - pos < 4:
                return Expected(events, None)
            (n,) = struct.unpack_from(">I", data, pos)
            if n > limit:
                return Expected(events, FrameTooLarge)
            if len(data) - pos - 4 < n:
                return Expected(events, None)
            fields.append(data[pos + 4 : pos + 4 + n])
            pos += 4 + n
        if pos == len(data):
            return Expected(events, None)
        events.append(CommandResult(fields[0], fields[1], data[pos]))
        pos += 1


def reference_commands(data: bytes, limit: int, skip_oversized: bool) -> Expected:
    """Command frames, parsed the obvious way."""
    events: list[Event] = []
    pos = 0
    while len(data) - pos >= 4:
        (n,) = struct.unpack_from(">I", data, pos)
        if n > limit and not skip_oversized:
            return Expected(events, FrameTooLarge)
        if len(data) - pos - 4 < n:
            break
        events.append(
            OversizedCommand(n, limit) if n > limit else Command(data[pos + 4 : pos + 4 + n])
        )
        pos += 4 + n
    return Expected(events, None)


def held_bytes(decoder: Decoder) -> tuple[int, int]:
    """(bytes of the body being assembled in chunks, bytes of finished fields) the decoder holds."""
    body = decoder._body
    chunks = (body.chunks or []) if body is not None else []
    fields = sum(len(f) if isinstance(f, bytes) else f.length for f in decoder._fields)
    return sum(len(c) for c in chunks), fields


def check_memory(decoder: Decoder, limits: tuple[int, ...]) -> None:
    """The decoder holds no more than its limits allow, nor much more than has arrived."""
    assert len(decoder._scratch) in SCRATCH_SIZES
    in_chunks, in_fields = held_bytes(decoder)
    body = decoder._body
    if body is not None and body.chunks is not None:
        limit = limits[len(decoder._fields)]
        assert in_chunks <= decoder._length <= limit
        assert in_chunks <= 2 * body.received + FIRST_CHUNK
    assert in_fields <= sum(limits)
    if body is not None and body.whole is not None:  # a large body's final home, sized once
        assert body.whole.length == decoder._length <= limits[len(decoder._fields)]
    skipping = getattr(decoder, "_skipping", 0)
    assert skipping == 0 or body is None  # a skipped body is never kept


Feeder = Callable[[Fed, bytes], None]


def push(decoder: Fed, piece: bytes) -> None:
    decoder.receive_data(piece)


def lend(decoder: Fed, piece: bytes) -> None:
    """The BufferedProtocol path: write into the lent memory, commit, repeat."""
    pos = 0
    while pos < len(piece):
        with decoder.get_buffer(-1) as buf:
            assert len(buf) > 0, "an empty buffer would make asyncio fail the connection"
            n = min(len(buf), len(piece) - pos)
            buf[:n] = piece[pos : pos + n]
        decoder.buffer_updated(n)
        pos += n


def run_decoder(
    decoder: Decoder, data: bytes, cuts: list[int], feed: Feeder, limits: tuple[int, ...]
) -> tuple[list[Event], ProtocolError | None]:
    """Feed ``data`` split at ``cuts``; collect events until the first error."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    events: list[Event] = []
    for a, b in itertools.pairwise(points):
        try:
            feed(decoder, data[a:b])
        except ProtocolError as exc:
            while (event := decoder.next_event()) is not None:
                events.append(event)
            return events, exc
        while (event := decoder.next_event()) is not None:
            events.append(event)
        check_memory(decoder, limits)
    return events, None


def assert_matches(expected: Expected, events: list[Event], error: ProtocolError | None) -> None:
    assert events == expected.events
    if expected.error is None:
        assert error is None
    else:
        assert type(error) is expected.error


def assert_unusable(decoder: Decoder) -> None:
    """A decoder that failed refuses more input with UsageError (feeding it is the caller's
    bug), never anything else."""
    with pytest.raises(UsageError):
        decoder.receive_data(b"\0\0\0\0")
    with pytest.raises(UsageError):
        decoder.get_buffer(-1)


# Small limits so that random bytes hit them often; a zero limit is legal too.
small_limit = st.integers(min_value=0, max_value=6000)
cuts = st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=40)
feeders = st.sampled_from([push, lend])


def frames_and_noise(encoder: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Byte strings made of valid frames, random bytes and raw length prefixes, mixed."""
    piece = st.one_of(
        encoder,
        st.binary(max_size=64),
        st.integers(min_value=0, max_value=0xFFFF_FFFF).map(lambda n: struct.pack(">I", n)),
        st.integers(min_value=0, max_value=9000).map(lambda n: struct.pack(">I", n)),
    )
    return st.lists(piece, max_size=12).map(b"".join)


body = st.one_of(st.binary(max_size=40), st.integers(0, 9000).map(lambda n: b"x" * n))
result_frames = st.builds(encode_result, body, body, st.integers(0, 255))
command_frames = st.builds(encode_command, body)

_fuzz = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def test_result_decoder_on_hostile_bytes(scale: Scale) -> None:
    @settings(_fuzz, max_examples=scale.fuzz_examples)
    @given(small_limit, small_limit, frames_and_noise(result_frames), cuts, feeders)
    def check(max_out: int, max_err: int, data: bytes, cuts: list[int], feed: Feeder) -> None:
        limits = Limits(max_stdout=max_out, max_stderr=max_err)
        decoder = ResultDecoder(limits)
        events, error = run_decoder(decoder, data, cuts, feed, (max_out, max_err))
        assert_matches(reference_results(data, limits), events, error)
        for event in events:
            assert isinstance(event, CommandResult)
            assert len(event.stdout) <= max_out and len(event.stderr) <= max_err
            assert event.exit_code is not None and 0 <= event.exit_code <= 255
        if error is not None:
            assert_unusable(decoder)

    check()


@pytest.mark.parametrize("skip_oversized", [False, True])
def test_command_decoder_on_hostile_bytes(scale: Scale, skip_oversized: bool) -> None:
    @settings(_fuzz, max_examples=scale.fuzz_examples)
    @given(small_limit, frames_and_noise(command_frames), cuts, feeders)
    def check(limit: int, data: bytes, cuts: list[int], feed: Feeder) -> None:
        decoder = CommandDecoder(limit, skip_oversized=skip_oversized)
        events, error = run_decoder(decoder, data, cuts, feed, (limit,))
        assert_matches(reference_commands(data, limit, skip_oversized), events, error)
        if error is not None:
            assert_unusable(decoder)

    check()


@pytest.mark.parametrize("feed", [push, lend])
def test_valid_results_survive_any_chunking(scale: Scale, feed: Feeder) -> None:
    @settings(_fuzz, max_examples=scale.fuzz_examples)
    @given(st.lists(st.tuples(body, body, st.integers(0, 255)), max_size=6), cuts)
    def check(results: list[tuple[bytes, bytes, int]], cuts: list[int]) -> None:
        data = b"".join(encode_result(*r) for r in results)
        decoder = ResultDecoder(Limits(max_stdout=9000, max_stderr=9000))
        events, error = run_decoder(decoder, data, cuts, feed, (9000, 9000))
        assert error is None
        assert events == [CommandResult(*r) for r in results]
        assert not decoder.in_frame

    check()


def test_one_decoder_answers_every_result_in_turn_through_result_updated(scale: Scale) -> None:
    """The host's path: one result at a time, each in reads of any size, each read committed
    with ``result_updated()`` on the same decoder, whose scratch grows and shrinks between
    results. (An empty answer after a few KiB of output once lost its exit code.)"""

    # Sizes around the decoder's own (its scratch's, INLINE_MAX), empty ones most of all.
    sizes = st.sampled_from([0, 0, 0, 1, 8, 1023, 1024, 1025, 2000, 4095, 4096, 4097, 9000])
    sized = st.one_of(sizes.map(lambda n: b"x" * n), st.binary(max_size=40))

    @settings(_fuzz, max_examples=scale.fuzz_examples)
    @given(st.lists(st.tuples(sized, sized, st.integers(0, 255)), min_size=1, max_size=8), cuts)
    def check(results: list[tuple[bytes, bytes, int]], cuts: list[int]) -> None:
        decoder = ResultDecoder(Limits(max_stdout=9000, max_stderr=9000))
        for i, answer in enumerate(results):
            frame = encode_result(*answer)
            points = sorted({c % (len(frame) + 1) for c in cuts[i:]} | {0, len(frame)})
            got: list[CommandResult | None] = []
            for start, stop in itertools.pairwise(points):
                pos = start
                while pos < stop:
                    with decoder.get_buffer(-1) as buf:
                        n = min(len(buf), stop - pos)
                        buf[:n] = frame[pos : pos + n]
                    got.append(decoder.result_updated(n))
                    pos += n
            assert got[-1] == CommandResult(*answer) and not any(got[:-1]), i
            assert not decoder.in_frame

    check()


@pytest.mark.parametrize("feed", [push, lend])
def test_many_oversized_commands_in_one_read_are_all_skipped(feed: Feeder) -> None:
    """Found a RecursionError: each skipped command re-entered the parser once per frame."""
    limit = 0
    data = encode_command(b"x") * 3000 + encode_command(b"")
    decoder = CommandDecoder(limit, skip_oversized=True)
    events, error = run_decoder(decoder, data, [], feed, (limit,))
    assert error is None
    assert events == [OversizedCommand(1, 0)] * 3000 + [Command(b"")]


@pytest.mark.parametrize("feed", [push, lend])
def test_length_bomb_below_the_limit_holds_about_what_arrived(feed: Feeder) -> None:
    """A prefix just under a big limit, then a trickle: memory follows the bytes, not the prefix."""
    limit = 64 * 1024 * 1024
    decoder = ResultDecoder(Limits(max_stdout=limit))
    feed(decoder, struct.pack(">I", limit))
    arrived = 0
    for size in (1, 100, 5000, 70_000, 300_000):
        feed(decoder, b"y" * size)
        arrived += size
        in_chunks, _ = held_bytes(decoder)
        assert in_chunks <= 2 * arrived + FIRST_CHUNK
        check_memory(decoder, (limit, limit))
    assert decoder.next_event() is None


@pytest.mark.parametrize("announced", [0xFFFF_FFFF, 64 * 1024 * 1024 + 1])
def test_length_bomb_above_the_limit_fails_before_allocating(announced: int) -> None:
    decoder = ResultDecoder()
    with pytest.raises(FrameTooLarge) as info:
        decoder.receive_data(struct.pack(">I", announced))
    assert info.value.length == announced and info.value.what == "stdout"
    assert held_bytes(decoder) == (0, 0)
    assert_unusable(decoder)


def lend_until_ended(conn: Fed, piece: bytes) -> None:
    """:func:`lend`, stopping where the connection ends, as an I/O layer stops reading."""
    assert isinstance(conn, HostConnectionV1)
    pos = 0
    while pos < len(piece) and conn.state is not ConnectionState.CLOSED:
        with conn.get_buffer(-1) as buf:
            n = min(len(buf), len(piece) - pos)
            buf[:n] = piece[pos : pos + n]
        conn.buffer_updated(n)
        pos += n


def test_host_connection_on_hostile_bytes(scale: Scale) -> None:
    """The v1 host state machine never raises on what a guest sends: results go to their own
    calls in order, and anything else ends the connection with a ProtocolError (a
    ConnectionLost at the end of the stream), failing every call still unanswered."""

    @settings(_fuzz, max_examples=scale.fuzz_examples)
    @given(
        small_limit,
        small_limit,
        st.integers(min_value=0, max_value=5),
        frames_and_noise(result_frames),
        cuts,
        st.sampled_from([push, lend_until_ended]),
        st.booleans(),
    )
    def check(
        max_out: int,
        max_err: int,
        calls: int,
        data: bytes,
        cuts: list[int],
        feed: Feeder,
        eof: bool,
    ) -> None:
        limits = Limits(max_stdout=max_out, max_stderr=max_err)
        conn: HostConnectionV1[int] = HostConnectionV1(limits)
        for i in range(calls):
            conn.send_command(i, b"c")
        results: list[ResultReceived[int]] = []
        endings: list[ConnectionEnded[int]] = []
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        for a, b in itertools.pairwise(points):
            if endings:
                with pytest.raises(UsageError):
                    conn.receive_data(data[a:b])  # feeding it now is the caller's bug
                break
            feed(conn, data[a:b])
            while (event := conn.next_event()) is not None:
                if isinstance(event, ResultReceived):
                    assert not endings
                    results.append(event)
                else:
                    endings.append(event)
            check_memory(conn._decoder, (max_out, max_err))
        if eof and not endings:
            conn.receive_eof()
            event = conn.next_event()
            assert isinstance(event, ConnectionEnded) and isinstance(event.error, ConnectionLost)
            endings.append(event)
        reference = reference_results(data, limits).events
        assert [r.id for r in results] == list(range(len(results)))
        assert [r.result for r in results] == reference[: len(results)]
        assert len(endings) <= 1 and conn.next_event() is None
        if endings:
            ending = endings[0]
            assert isinstance(ending.error, ProtocolError | ConnectionLost)
            assert ending.unanswered == tuple(range(len(results), calls))
        else:
            assert len(results) <= calls

    check()

"""The sans-I/O v1 codec, with no event loop: whole frames, byte by byte, random chunkings."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsock_async import CommandResult, FrameTooLarge, Limits, ProtocolError, UsageError
from vsock_async.protocol import (
    Command,
    CommandDecoder,
    OversizedCommand,
    ResultDecoder,
    encode_command,
    encode_result,
    result_frame_parts,
)
from vsock_async.protocol.v1 import agent_cut_notes


def feed_chunks(decoder: ResultDecoder | CommandDecoder, data: bytes, cuts: list[int]) -> None:
    """Feed ``data`` split at ``cuts``."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        decoder.receive_data(data[a:b])


def feed_via_buffer(decoder: ResultDecoder | CommandDecoder, data: bytes, step: int) -> None:
    """Feed ``data`` the way a BufferedProtocol does: write into lent memory, then commit."""
    pos = 0
    while pos < len(data):
        buf = decoder.get_buffer(-1)
        n = min(len(buf), step, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        buf.release()
        decoder.buffer_updated(n)
        pos += n


def take_results(decoder: ResultDecoder, data: bytes, step: int) -> list[CommandResult | None]:
    """Feed ``data`` as the host does, through lent memory and ``result_updated()``: what each
    read gave back."""
    got: list[CommandResult | None] = []
    pos = 0
    while pos < len(data):
        with decoder.get_buffer(-1) as buf:
            n = min(len(buf), step, len(data) - pos)
            buf[:n] = data[pos : pos + n]
        got.append(decoder.result_updated(n))
        pos += n
    return got


def drain(decoder: ResultDecoder | CommandDecoder) -> list[object]:
    events: list[object] = []
    while (event := decoder.next_event()) is not None:
        events.append(event)
    return events


# -- encoders ---------------------------------------------------------------------------


def test_command_frame_is_length_prefixed_big_endian() -> None:
    assert encode_command(b"uname -a") == b"\x00\x00\x00\x08uname -a"
    assert encode_command(b":") == b"\x00\x00\x00\x01:"
    assert encode_command(b"") == b"\x00\x00\x00\x00"


def test_result_frame_layout() -> None:
    assert encode_result(b"out", b"er", 7) == b"\0\0\0\x03out\0\0\0\x02er\x07"
    assert encode_result(b"", b"", 0) == b"\0\0\0\0\0\0\0\0\0"
    assert b"".join(result_frame_parts(b"a", b"", 255)) == b"\0\0\0\x01a\0\0\0\0\xff"


@pytest.mark.parametrize("code", [-1, 256, 1000])
def test_result_exit_code_must_fit_one_byte(code: int) -> None:
    with pytest.raises(UsageError, match=r"outside 0\.\.255"):
        encode_result(b"", b"", code)


def test_limits_reject_nonsense() -> None:
    with pytest.raises(UsageError, match="max_stdout"):
        Limits(max_stdout=-1)
    with pytest.raises(UsageError, match="max_command"):
        Limits(max_command=1 << 40)


# -- result decoder ---------------------------------------------------------------------

RESULTS = [
    (b"", b"", 0),
    (b"hello\n", b"", 0),
    (b"", b"boom", 1),
    (b"x" * 5000, b"y" * 3, 255),  # body above the inline size
    (bytes(range(256)) * 400, b"\0" * 70_000, 42),  # bodies spanning several chunks
]


@pytest.mark.parametrize("result", RESULTS)
def test_result_whole_and_byte_by_byte(result: tuple[bytes, bytes, int]) -> None:
    frame = encode_result(*result)
    whole = ResultDecoder()
    whole.receive_data(frame)
    assert drain(whole) == [CommandResult(*result)]
    assert not whole.in_frame

    if len(frame) < 20_000:
        bytewise = ResultDecoder()
        for i in range(len(frame)):
            assert bytewise.next_event() is None
            bytewise.receive_data(frame[i : i + 1])
        assert drain(bytewise) == [CommandResult(*result)]


@pytest.mark.parametrize("step", [1, 3, 4096, 8192, 100_000])
def test_result_through_lent_buffers(step: int) -> None:
    frames = [encode_result(*r) for r in RESULTS]
    decoder = ResultDecoder()
    for frame in frames:
        feed_via_buffer(decoder, frame, step)
    assert drain(decoder) == [CommandResult(*r) for r in RESULTS]


@settings(max_examples=200, deadline=None)
@given(
    results=st.lists(
        st.tuples(st.binary(max_size=12_000), st.binary(max_size=300), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_result_any_chunking(results: list[tuple[bytes, bytes, int]], cuts: list[int]) -> None:
    data = b"".join(encode_result(*r) for r in results)
    decoder = ResultDecoder()
    feed_chunks(decoder, data, cuts)
    assert drain(decoder) == [CommandResult(*r) for r in results]
    assert not decoder.in_frame


def test_oversized_stdout_fails_before_allocating() -> None:
    decoder = ResultDecoder(Limits(max_stdout=10))
    with pytest.raises(FrameTooLarge) as info:
        decoder.receive_data(b"\x00\x00\x00\x0b")
    assert (info.value.what, info.value.length, info.value.limit) == ("stdout", 11, 10)
    assert "limit of 10 bytes" in str(info.value)


def test_oversized_stderr_named_in_error() -> None:
    decoder = ResultDecoder(Limits(max_stderr=2))
    with pytest.raises(FrameTooLarge, match="stderr of 3 bytes"):
        decoder.receive_data(b"\0\0\0\0\0\0\0\x03")


def test_length_bomb_allocates_only_what_arrives() -> None:
    decoder = ResultDecoder()  # 64 MiB default limit
    decoder.receive_data(b"\x03\xff\xff\xff"[:1] + b"\xff\xff\xff")  # 0x03ffffff: 64 MiB - 1
    decoder.receive_data(b"a" * 100)
    assert decoder._body is not None
    held = sum(len(c) for c in decoder._body.chunks or [])
    assert held <= 64 * 1024  # the first chunk, not the 64 MiB the prefix claims
    assert decoder.in_frame


def test_chunks_grow_with_what_arrived() -> None:
    decoder = ResultDecoder()
    decoder.receive_data(b"\x01\x00\x00\x00")  # 16 MiB announced
    received = 0
    for _ in range(40):
        decoder.receive_data(b"q" * 10_000)
        received += 10_000
        assert decoder._body is not None
        held = sum(len(c) for c in decoder._body.chunks or [])
        assert held <= 2 * received + 64 * 1024


def test_truncated_frame_is_reported_in_frame() -> None:
    frame = encode_result(b"abc", b"de", 1)
    for cut in range(1, len(frame)):
        decoder = ResultDecoder()
        decoder.receive_data(frame[:cut])
        decoder.receive_eof()
        assert decoder.next_event() is None
        assert decoder.in_frame
        assert decoder.bytes_in_frame() == cut


@pytest.mark.parametrize("make", [ResultDecoder, CommandDecoder])
def test_data_after_eof_is_a_usage_error(make: type[ResultDecoder | CommandDecoder]) -> None:
    """The caller fed bytes after saying the stream ended: its bug, not the peer's."""
    decoder = make()
    decoder.receive_data(b"")
    assert decoder.eof
    with pytest.raises(UsageError, match="after the end of the stream"):
        decoder.receive_data(b"x")
    with pytest.raises(UsageError):
        decoder.get_buffer(-1)


@pytest.mark.parametrize(
    "decoder",
    [ResultDecoder(Limits(max_stdout=1)), CommandDecoder(max_command=1)],
    ids=["result", "command"],
)
def test_use_after_an_error_is_a_usage_error(decoder: ResultDecoder | CommandDecoder) -> None:
    with pytest.raises(FrameTooLarge):
        decoder.receive_data(b"\0\0\0\x02")
    with pytest.raises(UsageError, match="after an earlier error") as info:
        decoder.receive_data(b"\0")
    assert not isinstance(info.value, ProtocolError)
    with pytest.raises(UsageError):
        decoder.get_buffer(-1)


def test_partial_output_shows_what_arrived() -> None:
    decoder = ResultDecoder()
    decoder.receive_data(b"\0\0\0\x05hel")
    assert decoder.partial_output() == (b"hel", b"")
    decoder.receive_data(b"lo\0\0\0\x04er")
    assert decoder.partial_output() == (b"hello", b"er")
    big = ResultDecoder()
    big.receive_data(b"\0\x01\0\0" + b"k" * 9000)
    assert big.partial_output() == (b"k" * 9000, b"")


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=200), cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_garbage_gives_results_or_protocol_errors(garbage: bytes, cuts: list[int]) -> None:
    decoder = ResultDecoder(Limits(max_stdout=64, max_stderr=64))
    try:
        feed_chunks(decoder, garbage, cuts)
    except ProtocolError:
        return
    for event in drain(decoder):
        assert isinstance(event, CommandResult)
        assert len(event.stdout) <= 64 and len(event.stderr) <= 64


# -- command decoder --------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    commands=st.lists(st.binary(max_size=10_000), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_command_any_chunking(commands: list[bytes], cuts: list[int]) -> None:
    data = b"".join(encode_command(c) for c in commands)
    decoder = CommandDecoder()
    feed_chunks(decoder, data, cuts)
    assert drain(decoder) == [Command(c) for c in commands]


def test_command_byte_by_byte() -> None:
    data = encode_command(b"uname -a") + encode_command(b":")
    decoder = CommandDecoder()
    events = []
    for i in range(len(data)):
        decoder.receive_data(data[i : i + 1])
        events += drain(decoder)
    assert events == [Command(b"uname -a"), Command(b":")]


def test_oversized_command_is_fatal_by_default() -> None:
    decoder = CommandDecoder(max_command=4)
    with pytest.raises(FrameTooLarge, match="command of 5 bytes"):
        decoder.receive_data(encode_command(b"12345"))


@pytest.mark.parametrize("step", [1, 7, 8192, 1 << 20])
def test_oversized_command_is_skipped_in_pieces(step: int) -> None:
    body = b"A" * (300 if step == 1 else 50_000)
    data = encode_command(body) + encode_command(b"next") + encode_command(b"C" * 101)
    decoder = CommandDecoder(max_command=100, skip_oversized=True)
    feed_via_buffer(decoder, data, step)
    assert drain(decoder) == [
        OversizedCommand(len(body), 100),
        Command(b"next"),
        OversizedCommand(101, 100),
    ]


def test_skipping_never_lends_more_than_the_rest_of_the_body() -> None:
    decoder = CommandDecoder(max_command=10, skip_oversized=True)
    decoder.receive_data(b"\0\0\0\x14" + b"x" * 5)  # 20 announced, 5 arrived
    buf = decoder.get_buffer(-1)
    assert len(buf) == 15
    buf.release()
    assert decoder.in_frame
    decoder.receive_data(b"y" * 15 + encode_command(b"ok"))
    assert drain(decoder) == [OversizedCommand(20, 10), Command(b"ok")]
    assert not decoder.in_frame


# -- what v1 results say about truncation -----------------------------------------------------

STDOUT_NOTE = b"vsock-async agent: stdout cut to its first 5 bytes of 9 (--max-output)\n"


def stderr_note(cap: int) -> bytes:
    return (
        b"vsock-async agent: stderr cut: the command wrote 999 bytes, more than fit in %d"
        b" (--max-output) with these notes\n" % cap
    )


@pytest.mark.parametrize("fast", [True, False], ids=["one-read", "bytewise"])
def test_results_carry_the_agents_truncation_notes(fast: bool) -> None:
    err = b"some stderr\n" + STDOUT_NOTE + b"vsock-async agent: the command ran longer...\n"
    both = b"x" * 10 + stderr_note(200) + STDOUT_NOTE  # as the agent cuts: mid-line
    both = b"x" * (10 + 200 - len(both)) + stderr_note(200) + STDOUT_NOTE
    assert len(both) == 200
    cases = [
        ((b"abcde", err, 0), (True, False)),
        ((b"abcd", err, 0), (False, False)),  # the length named is not stdout's: not trusted
        ((b"abcde", err + b"more output\n", 0), (False, False)),  # not the last lines
        ((b"abcde", b"", 0), (False, False)),
        ((b"abcde", both, 0), (True, True)),
    ]
    for answer, (out_cut, err_cut) in cases:
        decoder = ResultDecoder()
        data = encode_result(*answer)
        if fast:
            results: list[object] = list(take_results(decoder, data, len(data)))
        else:
            feed_chunks(decoder, data, list(range(len(data))))
            results = drain(decoder)
        (result,) = results
        assert isinstance(result, CommandResult)
        assert (result.stdout_truncated, result.stderr_truncated) == (out_cut, err_cut), answer
        assert result.exit_signal is None  # v1 cannot tell a signal from an exit code


def test_only_the_last_short_lines_count_as_notes() -> None:
    assert agent_cut_notes(b"abcde", STDOUT_NOTE) == (True, False)
    assert agent_cut_notes(b"abcde", STDOUT_NOTE[:-1]) == (False, False)  # no newline
    glued = b"x" * 600 + STDOUT_NOTE  # the command's last line did not end: still the note
    assert agent_cut_notes(b"abcde", glued) == (True, False)
    assert agent_cut_notes(b"abcde", STDOUT_NOTE + b"\n") == (False, False)  # not the last line
    padded = STDOUT_NOTE[:-1] + b" " * 600 + b"\n"
    assert agent_cut_notes(b"abcde", padded) == (False, False)
    notes_then_text = STDOUT_NOTE + b"vsock-async agent: stderr cut: something else\n"
    assert agent_cut_notes(b"abcde", notes_then_text) == (True, False)


def test_old_result_constructors_still_work() -> None:
    result = CommandResult(b"o", b"e", 3, False)
    assert (result.exit_signal, result.stdout_truncated, result.stderr_truncated) == (
        None,
        False,
        False,
    )
    assert result.returncode == 3


def test_idle_scratch_is_small_grows_for_a_frame_that_needs_it_then_shrinks() -> None:
    """Every idle connection holds its decoder's scratch: it lends 1 KiB, grows for a result
    whose inline part does not fit, and the next small answer brings it back."""
    decoder = ResultDecoder()
    with decoder.get_buffer() as idle:
        assert len(idle) == 1024
    big = (b"x" * 3000, b"e" * 100, 0)
    got = take_results(decoder, encode_result(*big), 100_000)  # each read fills what is lent
    assert got[-1] == CommandResult(*big)
    with decoder.get_buffer() as grown:
        assert len(grown) > 1024
    got = take_results(decoder, encode_result(b"ok\n", b"", 0), 100_000)
    assert got == [CommandResult(b"ok\n", b"", 0)]
    with decoder.get_buffer() as again:
        assert len(again) == 1024


def test_commands_pipelined_past_the_small_scratch() -> None:
    """Commands that straddle the end of the small scratch grow it and come out whole."""
    commands = [bytes([65 + i % 26]) * (300 + 37 * i) for i in range(12)]
    decoder = CommandDecoder()
    feed_via_buffer(decoder, b"".join(encode_command(c) for c in commands), 100_000)
    assert drain(decoder) == [Command(c) for c in commands]


# -- the host's one call per read: result_updated() ------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        (b"", b"", 0),  # a probe's answer: shared, parsed from its nine bytes
        (b"", b"", 7),
        (b"ok\n", b"", 0),
        (b"", b"oops\n", 2),  # stderr ending a line: looked at for the agent's notes
        (b"out", b"err", 1),
        (b"x" * 5000, b"e" * 10, 3),  # a body above INLINE_MAX: the parser's own path
    ],
)
def test_result_updated_gives_the_result_in_the_read_that_completes_it(
    answer: tuple[bytes, bytes, int],
) -> None:
    frame = encode_result(*answer)
    want = CommandResult(*answer)
    for step in (len(frame), 1, 4, 9, 10):  # a large body may take more reads than asked
        got = take_results(ResultDecoder(), frame, step)
        assert got == [None] * (len(got) - 1) + [want], step
    for cut in range(1, len(frame)):  # whole but for one split, anywhere
        decoder = ResultDecoder()
        got = take_results(decoder, frame[:cut], cut) + take_results(decoder, frame[cut:], cut)
        assert got == [None] * (len(got) - 1) + [want], cut


@pytest.mark.parametrize(
    "first", [(b"", b"", 0), (b"ok\n", b"", 0), (b"", b"e\n", 0), (b"x" * 5000, b"", 0)]
)
@pytest.mark.parametrize("extra", [b"\0", encode_result(b"", b"", 0), encode_result(b"a", b"", 1)])
def test_result_updated_refuses_bytes_beyond_the_result(
    first: tuple[bytes, bytes, int], extra: bytes
) -> None:
    """A host asks for one result at a time: a byte after it, in the same read, is an error."""
    decoder = ResultDecoder()
    frame = encode_result(*first)
    with pytest.raises(ProtocolError, match="beyond the result"):
        take_results(decoder, frame + extra, len(frame) + len(extra))
    with pytest.raises(UsageError, match="earlier error"):
        decoder.get_buffer()


@pytest.mark.parametrize("size", [1500, 3000, 4000, 5000, 70_000])
def test_one_decoder_answers_in_turn_whatever_the_answer_before(size: int) -> None:
    """The scratch grows for a result of a few KiB and shrinks back at the next empty answer:
    that answer's exit code is taken before (it was once read from the new, zeroed buffer)."""
    decoder = ResultDecoder()
    answers = [(b"o" * size, b"", 0), (b"", b"", 7), (b"x" * size, b"e" * size, 1), (b"", b"", 3)]
    answers += [(b"", b"", 0), (b"ok\n", b"", 5)]
    for answer in answers:
        frame = encode_result(*answer)
        for step in (len(frame), 4096):
            if step == 4096 and len(frame) <= 4096:
                continue
            got = take_results(decoder, frame, step)
            assert got[-1] == CommandResult(*answer), (answer[2], step)


def test_result_updated_with_zero_output_limits_takes_only_an_empty_answer() -> None:
    """A probe's answer may hold no output: its first length prefix above 0 fails it."""
    decoder = ResultDecoder()
    decoder.set_output_limits(0, 0)
    assert take_results(decoder, encode_result(b"", b"", 0), 9) == [CommandResult(b"", b"", 0)]
    with pytest.raises(FrameTooLarge) as info:
        take_results(decoder, encode_result(b"x", b"", 0), 10)
    assert (info.value.what, info.value.length, info.value.limit) == ("stdout", 1, 0)

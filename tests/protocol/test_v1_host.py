"""The host side of a v1 connection, sans I/O: the state machine fed byte by byte, no event loop."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsock_async import (
    ClosedLocally,
    CommandResult,
    ConnectionLost,
    FrameTooLarge,
    Limits,
    ProtocolError,
    UsageError,
)
from vsock_async.protocol import encode_command, encode_result
from vsock_async.protocol.v1_host import (
    ConnectionEnded,
    ConnectionState,
    HostConnectionV1,
    HostEventV1,
    ResultReceived,
)

from .lending import lend

IDLE = ConnectionState.IDLE
AWAITING = ConnectionState.AWAITING_RESULT
CLOSED = ConnectionState.CLOSED


def events(conn: HostConnectionV1[str]) -> list[HostEventV1[str]]:
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def ended(conn: HostConnectionV1[str]) -> ConnectionEnded[str]:
    (event,) = events(conn)
    assert isinstance(event, ConnectionEnded)
    assert conn.state is CLOSED and conn.error is event.error
    return event


# -- one exchange at a time, in order ----------------------------------------------------


def test_first_command_goes_out_at_once_and_the_rest_wait() -> None:
    conn: HostConnectionV1[str] = HostConnectionV1()
    assert conn.state is IDLE and conn.data_to_send() == b""
    conn.send_command("a", b"uname -a")
    assert conn.state is AWAITING and conn.in_flight("a")
    assert conn.data_to_send() == encode_command(b"uname -a")
    assert conn.data_to_send() == b""
    conn.send_command("b", b"true")
    conn.send_command("c", b"false")
    assert conn.queued == 2 and not conn.in_flight("b")
    assert conn.data_to_send() == b""  # one exchange in flight, never two
    assert events(conn) == []


def test_results_come_back_in_order_and_release_the_next_command() -> None:
    conn: HostConnectionV1[str] = HostConnectionV1()
    for id, command in [("a", b"one"), ("b", b"two"), ("c", b"three")]:
        conn.send_command(id, command)
    sent = [conn.data_to_send()]
    for id, answer in [("a", (b"1", b"", 0)), ("b", (b"2", b"e", 1)), ("c", (b"", b"", 2))]:
        conn.receive_data(encode_result(*answer))
        assert events(conn) == [ResultReceived(id, CommandResult(*answer))]
        sent.append(conn.data_to_send())
    assert sent == [encode_command(b"one"), encode_command(b"two"), encode_command(b"three"), b""]
    assert conn.state is IDLE and conn.queued == 0


def test_every_split_of_a_result_gives_the_same_event() -> None:
    frame = encode_result(b"hello", b"world!", 42)
    want = [ResultReceived("x", CommandResult(b"hello", b"world!", 42))]
    for cut in range(len(frame) + 1):
        conn: HostConnectionV1[str] = HostConnectionV1()
        conn.send_command("x", b"cmd")
        if cut:
            conn.receive_data(frame[:cut])  # b"" would be the end of the stream
        assert events(conn) == ([] if cut < len(frame) else want)
        assert conn.state is AWAITING if cut < len(frame) else IDLE
        if cut < len(frame):
            lend(conn, frame[cut:])
        assert events(conn) == ([] if cut == len(frame) else want)
        assert conn.state is IDLE


def test_byte_by_byte_through_lent_memory() -> None:
    conn: HostConnectionV1[str] = HostConnectionV1()
    conn.send_command("a", b"x")
    conn.send_command("b", b"y")
    got = []
    for frame in (encode_result(b"out", b"", 0), encode_result(b"", b"err", 5)):
        for i in range(len(frame)):
            lend(conn, frame[i : i + 1])
            got += events(conn)
    assert got == [
        ResultReceived("a", CommandResult(b"out", b"", 0)),
        ResultReceived("b", CommandResult(b"", b"err", 5)),
    ]


def test_withdrawn_command_is_never_sent() -> None:
    conn: HostConnectionV1[str] = HostConnectionV1()
    conn.send_command("a", b"first")
    conn.send_command("b", b"rm -rf /tmp/x")
    conn.send_command("c", b"third")
    conn.data_to_send()
    assert conn.withdraw("b") and not conn.withdraw("b") and not conn.withdraw("a")
    conn.receive_data(encode_result(b"", b"", 0))
    assert conn.data_to_send() == encode_command(b"third")


def test_abandoned_command_is_skipped_when_its_turn_comes() -> None:
    gave_up = {"b"}
    conn: HostConnectionV1[str] = HostConnectionV1(abandoned=gave_up.__contains__)
    for id in "abc":
        conn.send_command(id, id.encode())
    conn.data_to_send()
    conn.receive_data(encode_result(b"", b"", 0))
    assert conn.data_to_send() == encode_command(b"c") and conn.in_flight("c")


def test_data_to_send_keeps_every_frame_until_taken() -> None:
    """A driver that answers before it writes still sends both commands, in order."""
    conn: HostConnectionV1[str] = HostConnectionV1()
    conn.send_command("a", b"one")
    conn.send_command("b", b"two")
    conn.receive_data(encode_result(b"", b"", 0))
    assert conn.data_to_send() == encode_command(b"one") + encode_command(b"two")


def test_the_result_of_a_call_given_up_in_flight_is_dropped() -> None:
    gave_up: set[str] = set()
    conn: HostConnectionV1[str] = HostConnectionV1(abandoned=gave_up.__contains__)
    conn.send_command("a", b"x")
    conn.send_command("b", b"y")
    gave_up.add("a")  # its caller left while the guest was running it
    conn.receive_data(encode_result(b"late", b"", 0))
    assert events(conn) == [] and conn.in_flight("b")  # the stream is in step: b goes on
    conn.receive_data(encode_result(b"", b"", 0))
    assert events(conn) == [ResultReceived("b", CommandResult(b"", b"", 0))]


def test_command_frame_hands_the_frame_to_its_caller() -> None:
    """For an I/O layer that writes at once: the frame to write now, or b"" when queued (its
    frame then goes to output_ready, here data_to_send, when its turn comes)."""
    conn: HostConnectionV1[str] = HostConnectionV1()
    assert conn.command_frame("a", b"one") == encode_command(b"one")
    assert conn.in_flight("a") and conn.data_to_send() == b""
    assert conn.command_frame("b", b"two", probe=True) == b"" and conn.queued == 1
    conn.receive_data(encode_result(b"1", b"", 0))
    assert events(conn) == [ResultReceived("a", CommandResult(b"1", b"", 0))]
    assert conn.data_to_send() == encode_command(b"two") and conn.in_flight("b")
    conn.receive_data(encode_result(b"x", b"", 0))  # b was a probe: no output allowed
    assert isinstance(ended(conn).error, FrameTooLarge)
    with pytest.raises(FrameTooLarge):
        conn.command_frame("c", b"three")
    assert conn.bytes_sent == len(encode_command(b"one") + encode_command(b"two"))
    assert conn.bytes_received == 2 * len(encode_result(b"1", b"", 0))  # every byte read


class Immediate(HostConnectionV1[str]):
    """A subclass whose hooks act at once, as the asyncio layer's do: here, a log."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.log: list[tuple[str, object]] = []

    def result_received(self, id: str, result: CommandResult) -> None:
        self.log.append(("result", (id, result)))

    def output_ready(self, data: bytes) -> None:
        self.log.append(("write", data))

    def connection_ended(self, event: ConnectionEnded[str]) -> None:
        assert self.state is CLOSED and self.error is event.error
        self.log.append(("ended", event))


def test_hooks_get_each_output_in_the_call_that_produced_it() -> None:
    conn = Immediate()
    conn.send_command("a", b"one")
    conn.send_command("b", b"two")
    assert conn.log == [("write", encode_command(b"one"))]
    frame = encode_result(b"out", b"err", 3)
    for i in range(len(frame)):  # byte by byte: the last byte completes it, and only it
        conn.log.clear()
        lend(conn, frame[i : i + 1])
        if i < len(frame) - 1:
            assert conn.log == []
    # the next command goes out before the result is reported: a hook that sends a command
    # of its own then queues it behind those already waiting
    assert conn.log == [
        ("write", encode_command(b"two")),
        ("result", ("a", CommandResult(b"out", b"err", 3))),
    ]
    conn.log.clear()
    lend(conn, encode_result(b"", b"", 0) + b"\0")  # bytes beyond the result: the end
    (what, event) = conn.log[0]
    assert what == "ended" and len(conn.log) == 1
    assert isinstance(event, ConnectionEnded) and event.unanswered == ("b",)
    assert conn.next_event() is None and conn.data_to_send() == b""
    conn.close(ClosedLocally("again"))
    assert len(conn.log) == 1  # once


def test_hooks_see_eof_and_close_at_once() -> None:
    conn = Immediate()
    conn.send_command("a", b"x")
    conn.receive_eof()
    assert [w for w, _ in conn.log] == ["write", "ended"]
    other = Immediate(abandoned=lambda id: id == "a")
    other.send_command("a", b"x")
    other.receive_data(encode_result(b"", b"", 0))  # "a" was given up: no result
    other.close(ClosedLocally("bye"))
    assert [w for w, _ in other.log] == ["write", "ended"]


# -- limits --------------------------------------------------------------------------------


def test_a_command_above_max_command_is_refused_and_nothing_changes() -> None:
    conn: HostConnectionV1[str] = HostConnectionV1(Limits(max_command=4))
    with pytest.raises(UsageError, match=r"5 bytes is longer than Limits\.max_command"):
        conn.send_command("a", b"12345")
    assert conn.state is IDLE and conn.data_to_send() == b"" and events(conn) == []
    conn.send_command("b", b"1234")
    assert conn.data_to_send() == encode_command(b"1234")


def test_probe_limits_are_zero_and_apply_only_to_probes() -> None:
    conn: HostConnectionV1[str] = HostConnectionV1(Limits(max_stdout=10, max_stderr=10))
    conn.send_command("run", b":")  # an ordinary command that happens to be ':'
    conn.receive_data(encode_result(b"out", b"err", 0))
    assert events(conn) == [ResultReceived("run", CommandResult(b"out", b"err", 0))]
    conn.send_command("probe", b":", probe=True)
    conn.receive_data(encode_result(b"", b"", 0))
    assert events(conn) == [ResultReceived("probe", CommandResult(b"", b"", 0))]
    conn.send_command("probe2", b":", probe=True)
    conn.send_command("after", b"x")
    conn.receive_data(encode_result(b"", b"", 0))
    conn.receive_data(encode_result(b"0123456789", b"", 0))  # the full limits are back
    assert [e.result.stdout for e in events(conn) if isinstance(e, ResultReceived)] == [
        b"",
        b"0123456789",
    ]


def test_a_probe_answer_with_output_fails_at_its_prefix() -> None:
    conn: HostConnectionV1[str] = HostConnectionV1()
    conn.send_command("p", b":", probe=True)
    conn.send_command("q", b"queued")
    conn.receive_data(b"\0\0\0\x01")  # one byte of stdout announced: never read
    event = ended(conn)
    assert isinstance(event.error, FrameTooLarge) and event.error.limit == 0
    assert event.unanswered == ("p", "q")


def test_output_above_the_limit_fails_the_connection() -> None:
    conn: HostConnectionV1[str] = HostConnectionV1(Limits(max_stdout=3))
    conn.send_command("a", b"x")
    conn.receive_data(encode_result(b"four", b"", 0))
    assert isinstance(ended(conn).error, FrameTooLarge)


# -- what the guest may not do --------------------------------------------------------------


@pytest.mark.parametrize("feed", [HostConnectionV1.receive_data, lend], ids=["push", "lend"])
def test_bytes_while_nothing_is_pending_are_a_protocol_error(feed: object) -> None:
    conn: HostConnectionV1[str] = HostConnectionV1()
    feed(conn, b"\0")  # type: ignore[operator]
    event = ended(conn)
    assert isinstance(event.error, ProtocolError) and "no command was pending" in str(event.error)
    assert event.unanswered == ()


def test_bytes_after_a_result_with_nothing_pending_are_a_protocol_error() -> None:
    conn: HostConnectionV1[str] = HostConnectionV1()
    conn.send_command("a", b"x")
    conn.receive_data(encode_result(b"", b"", 0))
    assert len(events(conn)) == 1
    conn.receive_data(b"\0")
    assert "no command was pending" in str(ended(conn).error)


@pytest.mark.parametrize("extra", [b"\0", encode_result(b"", b"", 0)], ids=["byte", "result"])
def test_bytes_beyond_the_result_fail_it_and_everything_queued(extra: bytes) -> None:
    conn: HostConnectionV1[str] = HostConnectionV1()
    conn.send_command("a", b"x")
    conn.send_command("b", b"y")
    conn.data_to_send()
    lend(conn, encode_result(b"ok", b"", 0) + extra)  # in one read
    event = ended(conn)  # no ResultReceived: the stream is not to be trusted
    assert isinstance(event.error, ProtocolError) and "beyond the result" in str(event.error)
    assert event.unanswered == ("a", "b")
    assert conn.data_to_send() == b""  # "y" is never sent


def test_eof_at_every_byte_of_a_result() -> None:
    frame = encode_result(b"out", b"err", 9)
    for cut in range(len(frame)):
        conn: HostConnectionV1[str] = HostConnectionV1()
        conn.send_command("a", b"x")
        conn.send_command("b", b"y")
        lend(conn, frame[:cut])
        conn.receive_eof()
        event = ended(conn)
        assert isinstance(event.error, ConnectionLost) and event.unanswered == ("a", "b")
        if cut:
            assert f"after {cut} bytes of a result" in str(event.error)
        else:
            assert "before it answered" in str(event.error)


def test_eof_while_idle_ends_the_connection_with_nothing_unanswered() -> None:
    conn: HostConnectionV1[str] = HostConnectionV1()
    conn.receive_data(b"")  # b"" is the end of the stream
    event = ended(conn)
    assert isinstance(event.error, ConnectionLost) and event.unanswered == ()


# -- closing and misuse ------------------------------------------------------------------------


def test_local_close_fails_what_is_pending_and_is_final() -> None:
    conn: HostConnectionV1[str] = HostConnectionV1()
    conn.send_command("a", b"x")
    conn.send_command("b", b"y")
    conn.close(ClosedLocally("done"))
    event = ended(conn)
    assert isinstance(event.error, ClosedLocally) and event.unanswered == ("a", "b")
    conn.close(ClosedLocally("again"))
    conn.receive_eof()
    assert events(conn) == [] and str(conn.error) == "done"
    with pytest.raises(ClosedLocally, match="done") as info:
        conn.send_command("c", b"z")
    assert info.value is not conn.error  # a fresh exception per raise


def test_a_closed_connection_never_sends_what_was_waiting() -> None:
    conn: HostConnectionV1[str] = HostConnectionV1()
    conn.send_command("a", b"x")  # not yet taken by the I/O layer
    conn.close(ClosedLocally("bye"))
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(
    "end",
    [
        lambda c: c.close(ClosedLocally("bye")),
        lambda c: c.receive_eof(),
        lambda c: c.receive_data(b"\xff\xff\xff\xff"),
    ],
    ids=["closed", "eof", "failed"],
)
def test_bytes_fed_after_the_end_are_a_usage_error(end: object) -> None:
    conn: HostConnectionV1[str] = HostConnectionV1()
    conn.send_command("a", b"x")
    end(conn)  # type: ignore[operator]
    with pytest.raises(UsageError):
        conn.receive_data(b"\0")
    with pytest.raises(UsageError):
        lend(conn, b"\0")


def test_partial_output_of_the_result_in_progress() -> None:
    conn: HostConnectionV1[str] = HostConnectionV1()
    conn.send_command("a", b"x")
    conn.receive_data(b"\0\0\0\x05hel")
    assert conn.partial_output() == (b"hel", b"")


# -- any stream, any chunking -------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    answers=st.lists(
        st.tuples(st.binary(max_size=20), st.binary(max_size=20), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
    garbage=st.binary(max_size=12),
)
def test_any_chunking_of_answers_then_garbage(
    answers: list[tuple[bytes, bytes, int]], cuts: list[int], garbage: bytes
) -> None:
    """Results come back to their own calls, in order. A read that holds the end of one
    result and more bytes, or bytes with nothing pending, ends the connection with a
    ProtocolError; nothing else is ever raised."""
    conn: HostConnectionV1[int] = HostConnectionV1(Limits(max_stdout=20, max_stderr=20))
    for i in range(len(answers)):
        conn.send_command(i, b"c%d" % i)
    frames = [encode_result(*a) for a in answers]
    data = b"".join(frames) + garbage
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    got: list[HostEventV1[int]] = []
    for a, b in itertools.pairwise(points):
        if conn.state is CLOSED:
            break
        conn.receive_data(data[a:b])
        got += events(conn)  # type: ignore[arg-type]
    results = [e for e in got if isinstance(e, ResultReceived)]
    expected = [ResultReceived(i, CommandResult(*a)) for i, a in enumerate(answers)]
    assert results == expected[: len(results)]
    ends = {sum(map(len, frames[: i + 1])) for i in range(len(frames))}
    if conn.state is CLOSED:
        assert isinstance(got[-1], ConnectionEnded) and isinstance(got[-1].error, ProtocolError)
        assert got[-1].unanswered == tuple(range(len(results), len(answers)))
    else:
        assert results == expected and not garbage
    if ends <= set(points) and not garbage:  # every read ended at a frame boundary
        assert results == expected and conn.state is IDLE

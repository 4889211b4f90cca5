"""The v2 host and agent sessions without an event loop: every rule, both directions.

Each side is fed frames by hand (the peer is hostile) and, in the end-to-end
tests, the two are wired to each other in memory: what one queues in
``data_to_send()`` is what the other receives.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest

from vsock_async import FrameTooLarge, ProtocolError, UsageError
from vsock_async.protocol.v2 import (
    FLAG_END,
    HEADER,
    MAX_CREDIT,
    AgentLimits,
    AgentSession,
    Channel,
    CloseRequested,
    CommitRequested,
    ExecRequested,
    Exited,
    FileRequested,
    FileResult,
    Frame,
    FrameDecoder,
    FrameType,
    HelloAnswer,
    HelloRequest,
    HostSession,
    Output,
    OutputCredit,
    Pong,
    RequestFailed,
    ResizeRequested,
    SignalRequested,
    Started,
    StdinCredit,
    StdinData,
    StreamError,
    encode_frame,
    encode_json,
    encode_window,
)

from .lending import lend

ALL_CAPS = frozenset({"exec", "pty", "signal", "resize", "user", "ping", "files", "brief"})
NONCE = "0123456789abcdef"
T = FrameType


def host(
    limits: AgentLimits | None = None, caps: frozenset[str] = ALL_CAPS, **kw: Any
) -> HostSession:
    return HostSession(HelloAnswer(2, limits or AgentLimits(), caps, "test"), **kw)


def agent(
    limits: AgentLimits | None = None, host_max_frame: int = 1 << 20, **kw: Any
) -> AgentSession:
    return AgentSession(HelloRequest((2,), NONCE, host_max_frame), limits or AgentLimits(), **kw)


def sent(session: HostSession | AgentSession) -> list[Frame]:
    """The frames a session queued, decoded."""
    decoder = FrameDecoder(max_frame=1 << 30, max_control=1 << 30)
    for chunk in session.data_to_send():
        decoder.receive_data(bytes(chunk))
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def events(session: HostSession | AgentSession) -> list[Any]:
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def error_of(frame: Frame) -> dict[str, Any]:
    assert frame.type == T.ERROR
    obj: dict[str, Any] = json.loads(bytes(frame.payload))
    return obj


def jframe(stream: int, type: int, obj: dict[str, Any]) -> bytes:
    return encode_json(stream, type, obj)


def started_host(window: int = 100, stdin: bool = False, **request: Any) -> HostSession:
    """A host session whose stream 1 has started (pid 7); frames sent so far are dropped."""
    h = host()
    assert h.open_exec({"argv": ["x"], "stdin": stdin, **request}, window) == 1
    h.receive_data(jframe(1, T.STARTED, {"pid": 7}))
    assert events(h) == [Started(1, 7)]
    h.data_to_send()
    return h


def started_agent(stdin: bool = False, window: int = 100, **kw: Any) -> AgentSession:
    """An agent session whose stream 1 has started; frames sent so far are dropped."""
    a = agent(**kw)
    a.receive_data(jframe(1, T.EXEC, {"argv": ["x"], "stdin": stdin, "window": window}))
    (event,) = events(a)
    assert isinstance(event, ExecRequested)
    a.started(1, 7)
    a.data_to_send()
    return a


EXIT0 = {"exit_code": 0, "signal": None, "timed_out": False, "output_incomplete": False}


def ends() -> bytes:
    return encode_frame(1, T.STDOUT, FLAG_END) + encode_frame(1, T.STDERR, FLAG_END)


# -- host session: opening streams -------------------------------------------------------


def test_stream_ids_are_odd_and_increasing() -> None:
    h = host()
    ids = [h.open_exec({"argv": ["true"]}) for _ in range(4)]
    assert ids == [1, 3, 5, 7]
    frames = sent(h)
    assert [(f.stream, f.type) for f in frames] == [(i, T.EXEC) for i in ids]
    assert json.loads(bytes(frames[0].payload)) == {"argv": ["true"], "window": 262144}
    assert h.streams == frozenset(ids)


def test_window_argument_replaces_the_request_field() -> None:
    h = host()
    h.open_exec({"command": "ls", "window": 5}, 9)
    (frame,) = sent(h)
    assert json.loads(bytes(frame.payload)) == {"command": "ls", "window": 9}
    assert h.credit(1, Channel.STDOUT) == h.credit(1, Channel.STDERR) == 9


def test_max_streams_is_refused_locally_until_one_ends() -> None:
    h = host(AgentLimits(max_streams=2))
    h.open_exec({"argv": ["a"]})
    h.open_exec({"argv": ["b"]})
    with pytest.raises(UsageError, match="2 open streams"):
        h.open_exec({"argv": ["c"]})
    h.receive_data(jframe(1, T.ERROR, {"code": "spawn_failed", "message": "no", "type": 1}))
    assert h.open_exec({"argv": ["c"]}) == 5


@pytest.mark.parametrize(
    ("request_", "missing"),
    [
        ({"argv": ["x"]}, "exec"),
        ({"argv": ["x"], "pty": {"rows": 1, "cols": 1}}, "pty"),
        ({"argv": ["x"], "user": "app"}, "user"),
        ({"argv": ["x"], "brief": True}, "brief"),
    ],
)
def test_open_exec_needs_the_capabilities(request_: dict[str, Any], missing: str) -> None:
    h = host(caps=ALL_CAPS - {missing})
    with pytest.raises(UsageError, match=missing):
        h.open_exec(request_)
    assert h.data_to_send() == [] and h.streams == frozenset()


def test_other_requests_need_their_capabilities() -> None:
    cases: list[tuple[str, Callable[[HostSession], object]]] = [
        ("signal", lambda h: h.send_signal(1, 2)),
        ("resize", lambda h: h.send_resize(1, 2, 3)),
        ("ping", lambda h: h.ping(b"")),
    ]
    for missing, call in cases:
        h = host(caps=ALL_CAPS - {missing})
        h.open_exec({"argv": ["x"], "pty": {"rows": 1, "cols": 1}})
        h.data_to_send()
        with pytest.raises(UsageError, match=missing):
            call(h)
        assert h.data_to_send() == []


def test_an_exec_larger_than_the_agents_max_frame_is_refused_without_using_an_id() -> None:
    h = host(AgentLimits(max_frame=100_000))
    with pytest.raises(UsageError, match="max_frame"):
        h.open_exec({"argv": ["x" * 100_000]})
    assert h.data_to_send() == []
    assert h.open_exec({"argv": ["x"]}) == 1


@pytest.mark.parametrize("window", [-1, MAX_CREDIT + 1, True, 1.0])
def test_bad_windows_are_usage_errors(window: Any) -> None:
    with pytest.raises(UsageError):
        host().open_exec({"argv": ["x"]}, window)


def test_stdin_must_be_a_bool() -> None:
    with pytest.raises(UsageError):
        host().open_exec({"argv": ["x"], "stdin": 1})


# -- host session: what the agent sends --------------------------------------------------


def test_output_is_limited_by_credit() -> None:
    h = started_host(window=5)
    h.receive_data(encode_frame(1, T.STDOUT, 0, b"abc") + encode_frame(1, T.STDERR, 0, b"12345"))
    assert events(h) == [
        Output(1, Channel.STDOUT, b"abc", False),
        Output(1, Channel.STDERR, b"12345", False),
    ]
    assert (h.credit(1, Channel.STDOUT), h.credit(1, Channel.STDERR)) == (2, 0)
    with pytest.raises(ProtocolError, match="credit"):
        h.receive_data(encode_frame(1, T.STDERR, 0, b"x"))
    with pytest.raises(UsageError):  # a failed session takes nothing more
        h.receive_data(b"\0")
    with pytest.raises(UsageError):
        h.open_exec({"argv": ["x"]})


def test_granted_credit_lets_more_output_through() -> None:
    h = started_host(window=2)
    h.receive_data(encode_frame(1, T.STDOUT, 0, b"ab"))
    h.grant(1, Channel.STDOUT, 3)
    assert sent(h) == [Frame(1, T.WINDOW, 0, b"\x01\x00\x00\x00\x03")]
    h.receive_data(encode_frame(1, T.STDOUT, FLAG_END, b"cde"))
    assert events(h)[-1] == Output(1, Channel.STDOUT, b"cde", True)


def test_an_empty_end_needs_no_credit() -> None:
    h = started_host(window=0)
    h.receive_data(ends())
    assert events(h) == [Output(1, Channel.STDOUT, b"", True), Output(1, Channel.STDERR, b"", True)]


def test_output_after_end_is_a_violation() -> None:
    h = started_host()
    h.receive_data(encode_frame(1, T.STDOUT, FLAG_END, b"a"))
    with pytest.raises(ProtocolError, match="ended"):
        h.receive_data(encode_frame(1, T.STDOUT, 0, b"b"))


def test_output_before_started_is_a_violation() -> None:
    h = host()
    h.open_exec({"argv": ["x"]})
    with pytest.raises(ProtocolError, match="STARTED"):
        h.receive_data(encode_frame(1, T.STDOUT, 0, b"a"))


def test_exit_only_after_end_on_both_channels() -> None:
    h = started_host()
    h.receive_data(encode_frame(1, T.STDOUT, FLAG_END))
    with pytest.raises(ProtocolError, match="END"):
        h.receive_data(jframe(1, T.EXIT, EXIT0))


def test_exit_ends_the_stream_and_late_frames_are_ignored() -> None:
    h = started_host()
    h.receive_data(ends() + jframe(1, T.EXIT, {"signal": 9, "timed_out": True}))
    assert events(h)[-1] == Exited(1, None, 9, True, False)
    assert h.streams == frozenset()
    h.receive_data(encode_frame(1, T.STDOUT, 0, b"late") + jframe(1, T.EXIT, EXIT0))
    h.receive_data(encode_window(1, Channel.STDIN, 5))
    assert events(h) == [] and h.data_to_send() == []
    with pytest.raises(UsageError, match="not open"):
        h.send_signal(1, 15)
    h.grant(1, Channel.STDOUT, 10)  # consuming output after the exit is normal: no-op
    h.send_close(1)
    assert h.data_to_send() == []


@pytest.mark.parametrize(
    "payload",
    [
        {"exit_code": 0, "signal": 9},
        {"exit_code": None, "signal": None},
        {},
        {"exit_code": 256},
        {"exit_code": True},
        {"signal": 0},
        {"exit_code": 0, "timed_out": 1},
        {"exit_code": 0, "output_incomplete": "no"},
    ],
)
def test_malformed_exit_is_a_violation(payload: dict[str, Any]) -> None:
    h = started_host()
    h.receive_data(ends())
    with pytest.raises(ProtocolError):
        h.receive_data(jframe(1, T.EXIT, payload))


@pytest.mark.parametrize("payload", [b"", b"[]", b"{", b'{"pid": 0}', b'{"pid": "7"}', b"\xff"])
def test_malformed_started_is_a_violation(payload: bytes) -> None:
    h = host()
    h.open_exec({"argv": ["x"]})
    with pytest.raises(ProtocolError):
        h.receive_data(encode_frame(1, T.STARTED, 0, payload))


def test_started_twice_is_a_violation() -> None:
    h = started_host()
    with pytest.raises(ProtocolError, match="already"):
        h.receive_data(jframe(1, T.STARTED, {"pid": 8}))


def test_unknown_fields_are_ignored() -> None:
    h = host()
    h.open_exec({"argv": ["x"]})
    h.receive_data(jframe(1, T.STARTED, {"pid": 3, "future": [1, {"a": None}]}))
    h.receive_data(ends() + jframe(1, T.EXIT, {**EXIT0, "cpu_seconds": 1.5}))
    assert events(h)[-1] == Exited(1, 0, None, False, False)


def test_stdin_credit_from_window() -> None:
    h = started_host(stdin=True)
    h.receive_data(encode_window(1, Channel.STDIN, 10) + encode_window(1, Channel.STDIN, 0))
    assert events(h) == [StdinCredit(1, 10)]
    assert h.credit(1, Channel.STDIN) == AgentLimits().stdin_window + 10


@pytest.mark.parametrize(
    "window",
    [
        encode_window(1, Channel.STDOUT, 1),  # output credit flows host to agent only
        encode_frame(1, T.WINDOW, 0, b"\x07\x00\x00\x00\x01"),
        encode_frame(1, T.WINDOW, 0, b"\x00\x00\x00\x01"),
        encode_frame(1, T.WINDOW, 0, b"\x00\x00\x00\x00\x01\x00"),
        encode_window(1, Channel.STDIN, MAX_CREDIT),  # overflows what is already there
    ],
)
def test_bad_window_from_the_agent_is_a_violation(window: bytes) -> None:
    h = started_host(stdin=True)
    with pytest.raises(ProtocolError):
        h.receive_data(window)


@pytest.mark.parametrize("type", [T.EXEC, T.STDIN, T.SIGNAL, T.RESIZE, T.CLOSE])
def test_types_the_host_never_receives_are_violations(type: int) -> None:
    h = started_host()
    with pytest.raises(ProtocolError, match="direction"):
        h.receive_data(encode_frame(1, type, 0, b"{}"))


@pytest.mark.parametrize("type", [T.STARTED, T.STDOUT, T.WINDOW, T.EXIT])
def test_stream_types_on_stream_0_are_violations(type: int) -> None:
    with pytest.raises(ProtocolError, match="stream 0"):
        started_host().receive_data(encode_frame(0, type, 0, b"{}"))


def test_error_before_started_ends_the_stream() -> None:
    h = host()
    h.open_exec({"argv": ["nope"]})
    h.receive_data(
        jframe(
            1,
            T.ERROR,
            {"code": "spawn_failed", "message": "no such file", "errno": "ENOENT", "type": 1},
        )
    )
    assert events(h) == [StreamError(1, "spawn_failed", "no such file", "ENOENT")]
    assert h.streams == frozenset()
    h.receive_data(jframe(1, T.STARTED, {"pid": 3}))  # late: ignored
    assert events(h) == []


def test_error_without_a_type_before_started_ends_the_stream() -> None:
    h = host()
    h.open_exec({"argv": ["x"]})
    h.receive_data(jframe(1, T.ERROR, {"code": "internal", "message": "boom"}))
    assert events(h) == [StreamError(1, "internal", "boom", None)]


def test_error_for_another_request_ends_nothing() -> None:
    h = started_host()
    h.receive_data(jframe(1, T.ERROR, {"code": "unsupported", "message": "no pty", "type": 0x31}))
    h.receive_data(jframe(0, T.ERROR, {"code": "unknown_type", "message": "?", "type": 0x99}))
    h.receive_data(jframe(9, T.ERROR, {"code": "x", "message": "y"}))
    assert events(h) == [
        RequestFailed(1, 0x31, "unsupported", "no pty", None),
        RequestFailed(0, 0x99, "unknown_type", "?", None),
        RequestFailed(9, None, "x", "y", None),
    ]
    assert h.streams == frozenset({1})
    assert h.data_to_send() == []  # an ERROR is never answered with an ERROR


def test_an_error_for_another_frame_before_started_ends_nothing() -> None:
    """The host may send a frame right behind its EXEC; an ERROR for that one is not for EXEC."""
    h = host()
    h.open_exec({"argv": ["x"]})
    h.receive_data(jframe(1, T.ERROR, {"code": "unknown_type", "message": "?", "type": 0x7F}))
    assert events(h) == [RequestFailed(1, 0x7F, "unknown_type", "?", None)]
    h.receive_data(jframe(1, T.STARTED, {"pid": 3}))
    assert events(h) == [Started(1, 3)]


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"code": 1, "message": "x"},
        {"code": "x", "message": 2},
        {"code": "x", "errno": 2},
        {"code": "x", "type": 256},
    ],
)
def test_malformed_error_is_a_violation(payload: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        started_host().receive_data(jframe(1, T.ERROR, payload))


def test_unknown_type_is_answered_and_skipped() -> None:
    h = started_host()
    h.receive_data(
        encode_frame(1, 0x7F, 0x80, b"future" * 1000) + encode_frame(1, T.STDOUT, 0, b"ok")
    )
    (answer,) = sent(h)
    assert answer.stream == 1
    assert error_of(answer) == {
        "code": "unknown_type",
        "message": "frame type 127 is not known",
        "type": 127,
    }
    assert events(h) == [Output(1, Channel.STDOUT, b"ok", False)]


def test_frames_on_a_stream_never_opened_are_answered() -> None:
    h = started_host()
    h.receive_data(encode_frame(3, T.STDOUT, 0, b"x") + encode_frame(2, T.STDOUT, 0, b"y"))
    answers = sent(h)
    assert [(f.stream, error_of(f)["code"], error_of(f)["type"]) for f in answers] == [
        (3, "unknown_stream", T.STDOUT),
        (2, "unknown_stream", T.STDOUT),
    ]
    assert events(h) == []


def test_ping_is_answered_and_pong_reported() -> None:
    h = host()
    h.ping(b"abc")
    assert sent(h) == [Frame(0, T.PING, 0, b"abc")]
    h.receive_data(encode_frame(0, T.PING, 0, b"x" * 64) + encode_frame(0, T.PONG, 0, b"abc"))
    assert sent(h) == [Frame(0, T.PONG, 0, b"x" * 64)]
    assert events(h) == [Pong(b"abc")]
    with pytest.raises(UsageError):
        h.ping(b"x" * 65)


def test_answered_counts_the_bytes_of_answers_only() -> None:
    """PONG and ERROR are what a peer makes us write by sending alone; our own frames are not."""
    h = host()
    h.ping(b"abc")
    h.open_exec({"argv": ["true"]})
    h.data_to_send()
    assert h.answered == 0
    h.receive_data(encode_frame(0, T.PING, 0, b"x" * 64) + encode_frame(5, 0x7F, 0, b"zz"))
    assert h.answered == sum(len(chunk) for chunk in h.data_to_send()) > 74


@pytest.mark.parametrize(
    "frame",
    [
        encode_frame(1, T.PING, 0, b""),
        encode_frame(3, T.PONG, 0, b""),
        encode_frame(0, T.PING, 0, b"x" * 65),
    ],
)
def test_bad_ping_is_a_violation(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        started_host().receive_data(frame)


def test_events_before_a_violation_in_the_same_read_still_come_out() -> None:
    h = started_host(window=3)
    with pytest.raises(ProtocolError):
        h.receive_data(encode_frame(1, T.STDOUT, 0, b"abc") + encode_frame(1, T.STDOUT, 0, b"d"))
    assert events(h) == [Output(1, Channel.STDOUT, b"abc", False)]


def test_a_payload_over_the_hosts_max_frame_is_refused() -> None:
    h = started_host(window=MAX_CREDIT)
    h2 = host(max_frame=10)
    h2.open_exec({"argv": ["x"]})
    with pytest.raises(FrameTooLarge):
        h2.receive_data(encode_frame(1, T.STDOUT, 0, b"x" * 11))
    with pytest.raises(FrameTooLarge):  # control frames: 64 KiB
        h.receive_data(encode_frame(1, T.EXIT, 0, b" " * 65537))


# -- host session: what the host sends --------------------------------------------------


def test_send_stdin_is_limited_by_credit_and_split_by_the_agents_max_frame() -> None:
    h = host(AgentLimits(max_frame=4, stdin_window=10))
    h.open_exec({"argv": ["cat"], "stdin": True})
    h.data_to_send()
    assert h.send_stdin(1, b"0123456789abc", end=True) == 10
    frames = sent(h)
    assert [f.payload for f in frames] == [b"0123", b"4567", b"89"]
    assert all(f.flags == 0 for f in frames)  # not all of it went: no END yet
    assert h.send_stdin(1, b"abc", end=True) == 0
    h.receive_data(encode_window(1, Channel.STDIN, 3))
    assert h.send_stdin(1, b"abc", end=True) == 3
    assert sent(h) == [Frame(1, T.STDIN, FLAG_END, b"abc")]
    with pytest.raises(UsageError, match="already ended"):
        h.send_stdin(1, b"", end=True)


def test_send_stdin_end_alone_needs_no_credit() -> None:
    h = host(AgentLimits(stdin_window=0))
    h.open_exec({"argv": ["cat"], "stdin": True})
    h.data_to_send()
    assert h.send_stdin(1, b"", end=True) == 0
    assert sent(h) == [Frame(1, T.STDIN, FLAG_END)]


def test_send_stdin_needs_a_pipe() -> None:
    h = started_host(stdin=False)
    with pytest.raises(UsageError, match="stdin"):
        h.send_stdin(1, b"x")


def test_send_stdin_copies_a_mutable_buffer() -> None:
    h = started_host(stdin=True)
    buffer = bytearray(b"abc")
    h.send_stdin(1, buffer)
    buffer[:] = b"xyz"
    assert sent(h) == [Frame(1, T.STDIN, 0, b"abc")]


def test_send_stdin_does_not_copy_bytes() -> None:
    h = started_host(stdin=True)
    data = b"q" * 100_000
    h.send_stdin(1, data)
    _, body = h.data_to_send()
    assert isinstance(body, memoryview) and body.obj is data


def test_signal_resize_close() -> None:
    h = started_host(pty={"rows": 24, "cols": 80})
    h.send_signal(1, 2)
    h.send_resize(1, 50, 132)
    h.send_close(1)
    h.send_close(1)
    assert sent(h) == [
        Frame(1, T.SIGNAL, 0, b'{"signal":2}'),
        Frame(1, T.RESIZE, 0, b'{"rows":50,"cols":132}'),
        Frame(1, T.CLOSE),
    ]
    calls: list[Callable[[], object]] = [
        lambda: h.send_signal(1, 0),
        lambda: h.send_signal(1, True),
        lambda: h.send_resize(1, -1, 5),
    ]
    for call in calls:
        with pytest.raises(UsageError):
            call()


def test_resize_needs_a_pty() -> None:
    with pytest.raises(UsageError, match="pty"):
        started_host().send_resize(1, 10, 10)


@pytest.mark.parametrize("n", [-1, True])
def test_grant_checks(n: Any) -> None:
    h = started_host()
    with pytest.raises(UsageError):
        h.grant(1, Channel.STDOUT, n)
    with pytest.raises(UsageError):
        h.grant(1, Channel.STDIN, 1)
    with pytest.raises(UsageError, match="above"):
        h.grant(1, Channel.STDOUT, MAX_CREDIT)
    h.receive_data(encode_frame(1, T.STDOUT, FLAG_END))
    h.grant(1, Channel.STDOUT, 5)  # ended channel: nothing to grant
    assert h.data_to_send() == []


# -- agent session -----------------------------------------------------------------------


def test_exec_is_reported_with_the_request_as_sent() -> None:
    a = agent()
    request = {"argv": ["ls", {"b64": "/w=="}], "env": {"A": "b"}, "future": 1}
    a.receive_data(jframe(1, T.EXEC, request))
    assert events(a) == [ExecRequested(1, request)]
    assert a.credit(1, Channel.STDOUT) == 262144 and a.credit(1, Channel.STDIN) == 0


@pytest.mark.parametrize(
    "frames",
    [
        [jframe(2, T.EXEC, {})],
        [jframe(0, T.EXEC, {})],
        [jframe(3, T.EXEC, {}), jframe(1, T.EXEC, {})],
        [jframe(3, T.EXEC, {}), jframe(3, T.EXEC, {})],
        [encode_frame(1, T.EXEC, 0, b"[]")],
        [encode_frame(1, T.EXEC, 0, b"{bad")],
        [encode_frame(1, T.EXEC, 0, b'{"a": Infinity}')],
    ],
)
def test_bad_exec_frames_are_violations(frames: list[bytes]) -> None:
    a = agent()
    with pytest.raises(ProtocolError):
        a.receive_data(b"".join(frames))


@pytest.mark.parametrize(
    "request_", [{"stdin": 1}, {"window": -1}, {"window": 2**31}, {"window": "5"}]
)
def test_bad_session_fields_are_refused_with_bad_request(request_: dict[str, Any]) -> None:
    a = agent()
    a.receive_data(
        jframe(1, T.EXEC, {"argv": ["x"], **request_}) + encode_frame(1, T.STDIN, 0, b"late")
    )
    (answer,) = sent(a)
    assert (answer.stream, error_of(answer)["code"], error_of(answer)["type"]) == (
        1,
        "bad_request",
        1,
    )
    assert events(a) == [] and a.streams == frozenset()


def test_max_streams_is_refused_with_limit() -> None:
    a = agent(AgentLimits(max_streams=1))
    a.receive_data(jframe(1, T.EXEC, {"argv": ["x"]}) + jframe(3, T.EXEC, {"argv": ["y"]}))
    assert [type(e) for e in events(a)] == [ExecRequested]
    (answer,) = sent(a)
    assert (answer.stream, error_of(answer)["code"]) == (3, "limit")
    a.exec_failed(1, "spawn_failed", "no", "ENOENT")
    assert error_of(sent(a)[0]) == {
        "code": "spawn_failed",
        "message": "no",
        "type": 1,
        "errno": "ENOENT",
    }
    a.receive_data(jframe(5, T.EXEC, {"argv": ["z"]}))
    assert events(a) == [ExecRequested(5, {"argv": ["z"]})]


def test_stdin_is_limited_by_credit() -> None:
    a = started_agent(stdin=True, limits=AgentLimits(stdin_window=4))
    a.receive_data(encode_frame(1, T.STDIN, 0, b"abcd"))
    assert events(a) == [StdinData(1, b"abcd", False)]
    with pytest.raises(ProtocolError, match="credit"):
        a.receive_data(encode_frame(1, T.STDIN, 0, b"e"))


def test_stdin_credit_is_returned_as_consumed() -> None:
    a = started_agent(stdin=True, limits=AgentLimits(stdin_window=4))
    a.receive_data(encode_frame(1, T.STDIN, 0, b"abcd"))
    a.stdin_consumed(1, 4)
    assert sent(a) == [Frame(1, T.WINDOW, 0, b"\x00\x00\x00\x00\x04")]
    a.receive_data(encode_frame(1, T.STDIN, FLAG_END, b"efgh"))
    assert events(a)[-1] == StdinData(1, b"efgh", True)
    a.stdin_consumed(1, 4)  # stdin ended: no more credit to give
    assert a.data_to_send() == []
    with pytest.raises(ProtocolError, match="ended"):
        a.receive_data(encode_frame(1, T.STDIN, 0, b""))


def test_stdin_without_a_pipe_is_a_violation() -> None:
    with pytest.raises(ProtocolError, match="stdin"):
        started_agent(stdin=False).receive_data(encode_frame(1, T.STDIN, FLAG_END))


def test_frames_for_a_finished_stream_are_ignored_and_for_an_unopened_one_answered() -> None:
    a = started_agent(stdin=True)
    a.send_output(1, Channel.STDOUT, b"", end=True)
    a.send_output(1, Channel.STDERR, b"", end=True)
    a.exited(1, exit_code=0)
    a.data_to_send()
    late = encode_frame(1, T.STDIN, 0, b"x" * 10) + jframe(1, T.SIGNAL, {"signal": 9})
    late += encode_frame(1, T.CLOSE) + encode_window(1, Channel.STDOUT, 5)
    a.receive_data(late)
    assert events(a) == [] and a.data_to_send() == []
    a.receive_data(encode_frame(5, T.CLOSE) + encode_frame(4, T.STDIN, 0, b"x"))
    assert [(f.stream, error_of(f)["code"]) for f in sent(a)] == [
        (5, "unknown_stream"),
        (4, "unknown_stream"),
    ]


def test_output_credit_and_splitting_by_the_hosts_max_frame() -> None:
    a = started_agent(window=10, host_max_frame=4)
    assert a.send_output(1, Channel.STDOUT, b"0123456789abc", end=True) == 10
    frames = sent(a)
    assert [(f.payload, f.flags) for f in frames] == [(b"0123", 0), (b"4567", 0), (b"89", 0)]
    assert a.send_output(1, Channel.STDOUT, b"abc", end=True) == 0
    a.receive_data(encode_window(1, Channel.STDOUT, 2))
    assert events(a) == [OutputCredit(1, Channel.STDOUT, 2)]
    assert a.send_output(1, Channel.STDOUT, b"abc", end=True) == 2
    a.receive_data(encode_window(1, Channel.STDOUT, 2))
    assert a.send_output(1, Channel.STDOUT, b"c", end=True) == 1
    assert [(f.payload, f.flags) for f in sent(a)] == [(b"ab", 0), (b"c", FLAG_END)]
    with pytest.raises(UsageError, match="ended"):
        a.send_output(1, Channel.STDOUT, b"")


def test_exit_requires_end_on_both_channels() -> None:
    a = started_agent()
    with pytest.raises(UsageError, match="END"):
        a.exited(1, exit_code=0)
    a.send_output(1, Channel.STDOUT, b"", end=True)
    with pytest.raises(UsageError, match="END"):
        a.exited(1, exit_code=0)
    a.send_output(1, Channel.STDERR, b"", end=True)
    bad_exits: list[dict[str, Any]] = [
        {"exit_code": 0, "signal": 9},
        {},
        {"exit_code": 256},
        {"signal": 0},
    ]
    for bad in bad_exits:
        with pytest.raises(UsageError):
            a.exited(1, **bad)
    a.exited(1, signal=15, timed_out=True, output_incomplete=True)
    assert sent(a)[-1] == Frame(
        1,
        T.EXIT,
        0,
        b'{"exit_code":null,"signal":15,"timed_out":true,"output_incomplete":true}',
    )
    assert a.streams == frozenset()


def test_agent_misuse_is_refused() -> None:
    a = agent()
    a.receive_data(jframe(1, T.EXEC, {"argv": ["x"]}))
    with pytest.raises(UsageError, match="started"):
        a.send_output(1, Channel.STDOUT, b"x")
    with pytest.raises(UsageError, match="never started"):
        a.exited(1, exit_code=0)
    a.started(1, 5)
    with pytest.raises(UsageError):
        a.started(1, 5)
    with pytest.raises(UsageError, match="exited"):
        a.exec_failed(1, "internal", "x")
    with pytest.raises(UsageError):
        a.send_output(1, Channel.STDIN, b"x")
    with pytest.raises(UsageError):
        a.request_failed(1, T.EXEC, "x", "y")
    with pytest.raises(UsageError, match="not open"):
        a.started(3, 5)


def test_signal_resize_close_events() -> None:
    a = agent()
    a.receive_data(jframe(1, T.EXEC, {"argv": ["sh"], "pty": {"rows": 1, "cols": 2}}))
    a.started(1, 9)
    events(a)
    a.data_to_send()
    a.receive_data(
        jframe(1, T.SIGNAL, {"signal": 2})
        + jframe(1, T.RESIZE, {"rows": 3, "cols": 4})
        + encode_frame(1, T.CLOSE)
        + encode_frame(1, T.CLOSE)
    )
    assert events(a) == [SignalRequested(1, 2), ResizeRequested(1, 3, 4), CloseRequested(1)]
    assert a.data_to_send() == []


def test_bad_signal_and_resize_are_answered_and_end_nothing() -> None:
    a = started_agent()
    a.receive_data(
        jframe(1, T.SIGNAL, {"signal": 0})
        + jframe(1, T.SIGNAL, {})
        + jframe(1, T.RESIZE, {"rows": 3, "cols": 4})  # no pty on this stream
    )
    answers = [(f.stream, error_of(f)["code"], error_of(f)["type"]) for f in sent(a)]
    assert answers == [(1, "bad_request", 0x30), (1, "bad_request", 0x30), (1, "unsupported", 0x31)]
    assert a.streams == frozenset({1})
    a.request_failed(1, T.SIGNAL, "failed", "ESRCH", "ESRCH")
    assert error_of(sent(a)[0])["errno"] == "ESRCH"


def test_after_close_output_is_dropped_but_end_and_exit_go_out() -> None:
    a = started_agent(window=1)
    a.receive_data(encode_frame(1, T.CLOSE))
    assert a.send_output(1, Channel.STDOUT, b"lots of output") == 14
    assert a.send_output(1, Channel.STDOUT, b"more", end=True) == 4
    assert a.send_output(1, Channel.STDERR, bytearray(b"e"), end=True) == 1
    a.exited(1, signal=15)
    assert [(f.type, f.flags, f.payload) for f in sent(a)] == [
        (T.STDOUT, FLAG_END, b""),
        (T.STDERR, FLAG_END, b""),
        (T.EXIT, 0, b'{"exit_code":null,"signal":15,"timed_out":false,"output_incomplete":false}'),
    ]


@pytest.mark.parametrize(
    "frame",
    [
        encode_window(1, Channel.STDIN, 1),
        encode_window(1, Channel.STDOUT, MAX_CREDIT),
        encode_frame(1, T.STDOUT, 0, b"x"),
        jframe(1, T.STARTED, {"pid": 1}),
        jframe(1, T.EXIT, EXIT0),
        encode_frame(1, T.SIGNAL, 0, b"[]"),
    ],
)
def test_agent_violations(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        started_agent().receive_data(frame)


def test_an_exec_larger_than_max_control_but_within_max_frame_is_accepted() -> None:
    a = agent(AgentLimits(max_frame=200_000))
    request = {"argv": ["x" * 100_000]}
    a.receive_data(jframe(1, T.EXEC, request))
    assert events(a) == [ExecRequested(1, request)]


# -- the two sessions talking ------------------------------------------------------------


def pump(h: HostSession, a: AgentSession) -> None:
    """Deliver everything queued, both ways, until both are quiet."""
    while True:
        to_agent, to_host = h.data_to_send(), a.data_to_send()
        if not to_agent and not to_host:
            return
        for chunk in to_agent:
            a.receive_data(chunk)
        for chunk in to_host:
            h.receive_data(chunk)


def test_a_whole_exec_with_stdin_tiny_windows_signal_and_exit() -> None:
    limits = AgentLimits(max_frame=3, stdin_window=5)
    h = HostSession(HelloAnswer(2, limits, ALL_CAPS, "test"), max_frame=2)
    a = AgentSession(HelloRequest((2,), NONCE, 2), limits)
    stream = h.open_exec({"argv": ["cat"], "stdin": True}, window=3)
    pump(h, a)
    (exec_,) = events(a)
    assert exec_ == ExecRequested(stream, {"argv": ["cat"], "stdin": True, "window": 3})
    a.started(stream, 4242)
    pump(h, a)
    assert events(h) == [Started(stream, 4242)]

    # The host streams 12 bytes of stdin through a 5-byte window; the agent "writes" them.
    to_send, received, ended = b"hello, world", b"", False
    while not ended:
        to_send = to_send[h.send_stdin(stream, to_send, end=True) :]
        pump(h, a)
        for event in events(a):
            assert isinstance(event, StdinData) and len(event.data) <= 3  # the agent's max_frame
            received += event.data
            a.stdin_consumed(stream, len(event.data))
            ended = event.end
        pump(h, a)
        assert all(isinstance(e, StdinCredit) for e in events(h))
    assert received == b"hello, world"

    # The agent echoes it back through a 3-byte output window, the host consuming slowly.
    output, pending = b"", b"hello, world"
    while True:
        taken = a.send_output(stream, Channel.STDOUT, pending, end=True)
        pending = pending[taken:]
        pump(h, a)
        ended = False
        for event in events(h):
            assert isinstance(event, Output) and event.channel == Channel.STDOUT
            assert len(event.data) <= 2  # the host's max_frame
            output += event.data
            h.grant(stream, Channel.STDOUT, len(event.data))
            ended = event.end
        pump(h, a)
        assert all(isinstance(e, OutputCredit) for e in events(a))
        if ended:
            break
    assert output == b"hello, world"

    h.send_signal(stream, 15)
    pump(h, a)
    assert events(a) == [SignalRequested(stream, 15)]
    a.send_output(stream, Channel.STDERR, b"", end=True)
    a.exited(stream, signal=15)
    h.ping(b"still there?")
    pump(h, a)
    assert events(h) == [
        Output(stream, Channel.STDERR, b"", True),
        Exited(stream, None, 15, False, False),
        Pong(b"still there?"),
    ]
    assert h.streams == a.streams == frozenset()


def test_a_stalled_stream_does_not_hold_up_another() -> None:
    h, a = host(), agent()
    slow = h.open_exec({"argv": ["yes"]}, window=4)
    fast = h.open_exec({"argv": ["echo"]}, window=4)
    pump(h, a)
    events(a)
    a.started(slow, 1)
    a.started(fast, 2)
    assert a.send_output(slow, Channel.STDOUT, b"y\ny\ny\n") == 4  # and nobody grants more
    assert a.send_output(slow, Channel.STDOUT, b"y\n") == 0
    for _ in range(5):
        assert a.send_output(fast, Channel.STDOUT, b"abcd") == 4
        pump(h, a)
        h.grant(fast, Channel.STDOUT, 4)
        pump(h, a)
    assert a.credit(slow, Channel.STDOUT) == 0 and a.credit(fast, Channel.STDOUT) == 4


def test_a_host_transcript_in_every_chunking_gives_the_same_events() -> None:
    h = host()
    h.open_exec({"argv": ["x"]}, 10)
    h.data_to_send()
    wire = (
        jframe(1, T.STARTED, {"pid": 7})
        + encode_frame(1, T.STDOUT, 0, b"hi\n")
        + encode_frame(0, T.PING, 0, b"p")
        + encode_frame(1, 0x7F, 0, b"??")
        + encode_frame(1, T.STDOUT, FLAG_END, b"")
        + encode_frame(1, T.STDERR, FLAG_END, b"e")
        + jframe(1, T.EXIT, EXIT0)
    )
    h.receive_data(wire)
    expected_events, expected_sent = events(h), sent(h)
    for cut in range(1, len(wire)):
        for first_at in range(0, cut, 7):
            s = host()
            s.open_exec({"argv": ["x"]}, 10)
            s.data_to_send()
            for piece in (wire[:first_at], wire[first_at:cut], wire[cut:]):
                if piece:
                    s.receive_data(piece)
            assert events(s) == expected_events
            assert sent(s) == expected_sent


def test_get_buffer_path_matches_receive_data() -> None:
    h = started_host()
    wire = encode_frame(1, T.STDOUT, 0, b"x" * 50) + ends() + jframe(1, T.EXIT, EXIT0)
    pos = 0
    while pos < len(wire):
        with h.get_buffer(-1) as buf:
            n = min(len(buf), len(wire) - pos, 7)
            buf[:n] = wire[pos : pos + n]
        h.buffer_updated(n)
        pos += n
    assert [type(e) for e in events(h)] == [Output, Output, Output, Exited]


def test_eof_mid_frame_is_visible() -> None:
    h = started_host()
    h.receive_data(encode_frame(1, T.STDOUT, 0, b"abc")[:5])
    assert h.in_frame
    h.receive_data(b"")
    with pytest.raises(UsageError):
        h.receive_data(b"x")


# -- output written outside the session (spliced) --------------------------------------


def test_output_header_takes_credit_and_frames_a_payload_written_after_it() -> None:
    a = started_agent(window=100)
    header = a.output_header(1, Channel.STDOUT, 60)
    assert a.data_to_send() == [] and a.credit(1, Channel.STDOUT) == 40
    assert header == encode_frame(1, T.STDOUT, 0, bytes(60))[: HEADER.size]
    h = started_host(window=100)
    h.receive_data(header + b"x" * 60)
    assert events(h) == [Output(1, Channel.STDOUT, b"x" * 60, False)]
    with pytest.raises(UsageError, match="credit"):
        a.output_header(1, Channel.STDOUT, 41)
    a.send_output(1, Channel.STDOUT, b"rest", end=True)
    assert a.credit(1, Channel.STDOUT) == 0 and a.credit(1, Channel.STDERR) == 100


@pytest.mark.parametrize(
    ("setup", "n", "match"),
    [
        (lambda a: None, 0, "credit"),
        (lambda a: None, 101, "credit"),
        (lambda a: a.send_output(1, Channel.STDOUT, b"q"), 5, "queued"),
        (lambda a: a.send_output(1, Channel.STDOUT, b"", end=True), 5, "no output"),
        (lambda a: a.receive_data(encode_frame(1, T.CLOSE)), 5, "no output"),
    ],
    ids=["empty", "beyond-credit", "frames-queued", "ended", "closing"],
)
def test_output_header_refuses_what_would_break_the_stream(
    setup: Callable[[AgentSession], object], n: int, match: str
) -> None:
    a = started_agent(window=100)
    setup(a)
    credit = a.credit(1, Channel.STDOUT)
    with pytest.raises(UsageError, match=match):
        a.output_header(1, Channel.STDOUT, n)
    assert a.credit(1, Channel.STDOUT) == credit


def test_output_header_keeps_to_the_hosts_max_frame_and_to_output_channels() -> None:
    a = started_agent(window=1000, host_max_frame=16)
    with pytest.raises(UsageError, match="max_frame"):
        a.output_header(1, Channel.STDOUT, 17)
    with pytest.raises(UsageError, match="STDOUT or STDERR"):
        a.output_header(1, Channel.STDIN, 1)
    assert len(a.output_header(1, Channel.STDERR, 16)) == HEADER.size


# -- brief process streams -------------------------------------------------------------


def brief_agent(window: int = 100, stdin: bool = False) -> AgentSession:
    """An agent session whose stream 1 is a brief EXEC, started (pid 7): nothing was sent."""
    a = agent()
    a.receive_data(
        jframe(1, T.EXEC, {"argv": ["x"], "stdin": stdin, "window": window, "brief": True})
    )
    (event,) = events(a)
    assert isinstance(event, ExecRequested) and event.request["brief"] is True
    a.started(1, 7)
    assert a.data_to_send() == [], "no STARTED on a brief stream"
    return a


def test_a_brief_stream_sends_only_its_output_and_the_exit() -> None:
    a = brief_agent()
    assert a.send_output(1, Channel.STDOUT, b"hi\n", end=True) == 3
    assert a.send_output(1, Channel.STDERR, b"", end=True) == 0
    a.exited(1, exit_code=3)
    exit3 = b'{"exit_code":3,"signal":null,"timed_out":false,"output_incomplete":false}'
    assert b"".join(bytes(c) for c in a.data_to_send()) == (
        encode_frame(1, T.STDOUT, 0, b"hi\n") + encode_frame(1, T.EXIT, 0, exit3)
    )
    assert a.streams == frozenset()


def test_a_brief_stream_still_keeps_to_credit_and_end_rules_inside_the_agent() -> None:
    a = brief_agent(window=2)
    assert a.send_output(1, Channel.STDOUT, b"abc", end=True) == 2  # 'c' waits for credit
    with pytest.raises(UsageError, match="END"):
        a.exited(1, exit_code=0)  # the agent still owes the rest of stdout, and stderr's end
    a.receive_data(encode_window(1, Channel.STDOUT, 5))
    assert events(a) == [OutputCredit(1, Channel.STDOUT, 5)]
    assert a.send_output(1, Channel.STDOUT, b"c", end=True) == 1
    with pytest.raises(UsageError, match="already ended"):
        a.send_output(1, Channel.STDOUT, b"d")
    a.send_output(1, Channel.STDERR, b"", end=True)
    a.exited(1, exit_code=0)
    assert [(f.type, f.flags, bytes(f.payload)) for f in sent(a)] == [
        (T.STDOUT, 0, b"ab"),
        (T.STDOUT, 0, b"c"),
        (T.EXIT, 0, b'{"exit_code":0,"signal":null,"timed_out":false,"output_incomplete":false}'),
    ]


def test_a_brief_stream_after_close_sends_the_exit_alone() -> None:
    a = brief_agent(window=1)
    a.receive_data(encode_frame(1, T.CLOSE))
    assert events(a) == [CloseRequested(1)]
    assert a.send_output(1, Channel.STDOUT, b"dropped", end=True) == 7
    a.send_output(1, Channel.STDERR, b"", end=True)
    a.exited(1, signal=15)
    assert [f.type for f in sent(a)] == [T.EXIT]


def test_a_brief_exec_that_cannot_start_is_refused_as_any_other() -> None:
    a = agent()
    a.receive_data(jframe(1, T.EXEC, {"argv": ["nope"], "brief": True}))
    events(a)
    a.exec_failed(1, "spawn_failed", "no such file", "ENOENT")
    (frame,) = sent(a)
    assert error_of(frame) == {
        "code": "spawn_failed",
        "message": "no such file",
        "errno": "ENOENT",
        "type": 1,
    }


@pytest.mark.parametrize("brief", [1, "yes", None, []])
def test_a_brief_that_is_not_a_bool_is_a_bad_request(brief: Any) -> None:
    a = agent()
    a.receive_data(jframe(1, T.EXEC, {"argv": ["x"], "brief": brief}))
    assert events(a) == []
    (frame,) = sent(a)
    assert error_of(frame)["code"] == "bad_request" and "brief" in error_of(frame)["message"]
    assert a.streams == frozenset()


@pytest.mark.parametrize("brief", [1, "yes", None])
def test_the_host_refuses_a_brief_that_is_not_a_bool(brief: Any) -> None:
    h = host()
    with pytest.raises(UsageError, match="brief"):
        h.open_exec({"argv": ["x"], "brief": brief})
    assert h.data_to_send() == [] and h.streams == frozenset()


def brief_host(window: int = 100) -> HostSession:
    h = host()
    assert h.open_exec({"argv": ["x"], "brief": True}, window) == 1
    (frame,) = sent(h)
    assert json.loads(bytes(frame.payload))["brief"] is True
    return h


def test_the_host_takes_output_then_an_exit_that_ends_everything() -> None:
    h = brief_host(window=4)
    h.receive_data(
        encode_frame(1, T.STDOUT, 0, b"hi\n")
        + encode_frame(1, T.STDERR, 0, b"oops")
        + jframe(1, T.EXIT, EXIT0)
    )
    assert events(h) == [
        Output(1, Channel.STDOUT, b"hi\n", False),
        Output(1, Channel.STDERR, b"oops", False),
        Exited(1, 0, None, False, False),
    ]
    assert h.streams == frozenset()
    h.receive_data(encode_frame(1, T.STDOUT, 0, b"late"))  # crossed the EXIT: ignored
    assert events(h) == []


def test_the_host_takes_a_bare_exit() -> None:
    h = brief_host()
    h.receive_data(jframe(1, T.EXIT, {**EXIT0, "exit_code": None, "signal": 9}))
    assert events(h) == [Exited(1, None, 9, False, False)]


@pytest.mark.parametrize(
    "frame",
    [
        jframe(1, T.STARTED, {"pid": 7}),
        encode_frame(1, T.STDOUT, FLAG_END),
        encode_frame(1, T.STDERR, FLAG_END, b"x"),
    ],
    ids=["started", "stdout-end", "stderr-end-with-data"],
)
def test_started_or_end_on_a_brief_stream_is_a_violation(frame: bytes) -> None:
    h = brief_host()
    with pytest.raises(ProtocolError, match="brief"):
        h.receive_data(frame)


def test_output_beyond_credit_on_a_brief_stream_is_a_violation() -> None:
    h = brief_host(window=2)
    with pytest.raises(ProtocolError, match="credit"):
        h.receive_data(encode_frame(1, T.STDOUT, 0, b"abc"))


def test_an_exec_error_ends_a_brief_stream_only_before_anything_else_came() -> None:
    h = brief_host()
    h.receive_data(jframe(1, T.ERROR, {"code": "spawn_failed", "message": "no", "type": 1}))
    assert events(h) == [StreamError(1, "spawn_failed", "no", None)]
    assert h.streams == frozenset()

    h.open_exec({"argv": ["x"], "brief": True})
    h.receive_data(encode_frame(3, T.STDOUT, 0, b"running"))
    h.receive_data(jframe(3, T.ERROR, {"code": "internal", "message": "odd", "type": 1}))
    assert events(h) == [
        Output(3, Channel.STDOUT, b"running", False),
        RequestFailed(3, 1, "internal", "odd", None),
    ]
    assert h.streams == frozenset({3})


def test_an_error_without_a_type_never_ends_a_brief_stream() -> None:
    h = brief_host()
    h.receive_data(encode_window(1, Channel.STDIN, 0))  # any frame but output: still unstarted
    h.receive_data(jframe(1, T.ERROR, {"code": "bad_request", "message": "a SIGNAL?"}))
    assert events(h) == [RequestFailed(1, None, "bad_request", "a SIGNAL?", None)]
    assert h.streams == frozenset({1})
    h.receive_data(jframe(1, T.EXIT, EXIT0))
    assert events(h) == [Exited(1, 0, None, False, False)]


def test_a_brief_and_a_full_stream_side_by_side_in_every_chunking() -> None:
    h, a = host(), agent()
    full = h.open_exec({"argv": ["a"]}, window=3)
    brief = h.open_exec({"argv": ["b"], "brief": True, "stdin": True}, window=3)
    h.send_stdin(brief, b"in", end=True)
    for chunk in h.data_to_send():
        a.receive_data(bytes(chunk))
    got = events(a)
    assert [type(e) for e in got[:2]] == [ExecRequested, ExecRequested]
    assert got[2:] == [StdinData(brief, b"in", True)], "a brief stream's stdin still ends"
    for stream, pid in ((full, 10), (brief, 11)):
        a.started(stream, pid)
        a.send_output(stream, Channel.STDOUT, b"out", end=True)
        a.send_output(stream, Channel.STDERR, b"e", end=True)
        a.exited(stream, exit_code=0)
    wire = b"".join(bytes(c) for c in a.data_to_send())
    for size in (1, 2, 7, len(wire)):
        h2 = host()
        h2.open_exec({"argv": ["a"]}, window=3)
        h2.open_exec({"argv": ["b"], "brief": True, "stdin": True}, window=3)
        for i in range(0, len(wire), size):
            h2.receive_data(wire[i : i + size])
        assert events(h2) == [
            Started(full, 10),
            Output(full, Channel.STDOUT, b"out", True),
            Output(full, Channel.STDERR, b"e", True),
            Exited(full, 0, None, False, False),
            Output(brief, Channel.STDOUT, b"out", False),
            Output(brief, Channel.STDERR, b"e", False),
            Exited(brief, 0, None, False, False),
        ]
        assert h2.streams == frozenset()


# -- file streams ----------------------------------------------------------------------

DIGEST = "ab" * 32


def wired(limits: AgentLimits | None = None) -> tuple[HostSession, AgentSession]:
    return host(limits), agent(limits)


def to_agent(h: HostSession, a: AgentSession) -> list[Any]:
    for chunk in h.data_to_send():
        a.receive_data(bytes(chunk))
    return events(a)


def to_host(a: AgentSession, h: HostSession) -> list[Any]:
    for chunk in a.data_to_send():
        h.receive_data(bytes(chunk))
    return events(h)


def test_a_put_streams_within_the_file_window_and_ends_with_commit_and_result() -> None:
    h, a = wired(AgentLimits(file_window=4))
    stream = h.open_file({"op": "put", "path": "/f"})
    assert (h.credit(stream, Channel.STDIN), h.credit(stream, Channel.STDOUT)) == (4, 0)
    assert to_agent(h, a) == [FileRequested(stream, "put", {"op": "put", "path": "/f"})]
    assert h.send_stdin(stream, b"abcdef") == 4
    with pytest.raises(UsageError, match="before its bytes ended"):
        h.send_commit(stream, DIGEST)
    assert to_agent(h, a) == [StdinData(stream, b"abcd", False)]
    a.stdin_consumed(stream, 4)
    assert to_host(a, h) == [StdinCredit(stream, 4)]
    assert h.send_stdin(stream, b"ef", end=True) == 2
    with pytest.raises(UsageError, match="64 lowercase hex"):
        h.send_commit(stream, "AB" * 32)
    h.send_commit(stream, DIGEST)
    with pytest.raises(UsageError, match="already committed"):
        h.send_commit(stream, DIGEST)
    assert to_agent(h, a) == [StdinData(stream, b"ef", True), CommitRequested(stream, DIGEST)]
    a.file_done(stream, {"size": 6, "sha256": DIGEST})
    assert to_host(a, h) == [FileResult(stream, {"size": 6, "sha256": DIGEST})]
    assert h.streams == a.streams == frozenset()


def test_a_get_sends_stdout_within_its_window_then_end_then_result() -> None:
    h, a = wired()
    stream = h.open_file({"op": "get", "path": "/f"}, 3)
    (event,) = to_agent(h, a)
    assert event == FileRequested(stream, "get", {"op": "get", "path": "/f", "window": 3})
    assert a.send_output(stream, Channel.STDOUT, b"hello") == 3
    with pytest.raises(UsageError, match="STDERR"):
        a.send_output(stream, Channel.STDERR, b"", end=True)
    with pytest.raises(UsageError, match="before END"):
        a.file_done(stream, {})
    assert to_host(a, h) == [Output(stream, Channel.STDOUT, b"hel", False)]
    h.grant(stream, Channel.STDOUT, 3)
    to_agent(h, a)
    assert a.send_output(stream, Channel.STDOUT, b"lo", end=True) == 2
    a.file_done(stream, {"size": 5})
    assert to_host(a, h) == [
        Output(stream, Channel.STDOUT, b"lo", True),
        FileResult(stream, {"size": 5}),
    ]


def test_a_file_stream_fails_with_one_error_at_any_point() -> None:
    h, a = wired()
    stream = h.open_file({"op": "put", "path": "/f"})
    to_agent(h, a)
    h.send_stdin(stream, b"partial")
    a.file_failed(stream, "file_error", "No space left on device", "ENOSPC")
    assert a.streams == frozenset()
    assert to_agent(h, a) == []  # the STDIN crossed the ERROR: ignored
    assert to_host(a, h) == [StreamError(stream, "file_error", "No space left on device", "ENOSPC")]
    assert h.streams == frozenset()
    with pytest.raises(UsageError):
        h.send_stdin(stream, b"more")


def test_an_error_answering_another_frame_ends_no_file_stream() -> None:
    h, a = wired()
    stream = h.open_file({"op": "get", "path": "/f"})
    to_agent(h, a)
    a.receive_data(jframe(stream, T.SIGNAL, {"signal": 9}))  # a file stream runs no process
    (error,) = sent(a)
    assert error_of(error)["code"] == "unsupported" and error_of(error)["type"] == T.SIGNAL
    h.receive_data(encode_frame(error.stream, error.type, 0, error.payload))
    (failed,) = events(h)
    assert isinstance(failed, RequestFailed)
    assert (failed.stream, failed.type, failed.code) == (stream, T.SIGNAL, "unsupported")
    assert h.streams == a.streams == frozenset({stream})


def test_open_file_needs_the_files_capability_and_room() -> None:
    h = host(caps=ALL_CAPS - {"files"})
    with pytest.raises(UsageError, match="files"):
        h.open_file({"op": "stat", "path": "/"})
    h = host(AgentLimits(max_files=1, max_streams=3))
    h.open_file({"op": "stat", "path": "/"})
    with pytest.raises(UsageError, match="1 open file streams"):
        h.open_file({"op": "stat", "path": "/"})
    h.open_exec({"argv": ["x"]})  # processes still have room
    with pytest.raises(UsageError, match="op must be a string"):
        h.open_file({"path": "/"})
    assert [f.type for f in sent(h)] == [T.FILE, T.EXEC]
    h = host()
    with pytest.raises(UsageError, match="max_control"):
        h.open_file({"op": "x", "path": "/" * 70_000})
    assert h.data_to_send() == [] and h.open_file({"op": "x"}) == 1


def test_a_process_stream_is_not_a_file_stream_nor_the_reverse() -> None:
    h = started_host()
    with pytest.raises(UsageError, match="nothing to commit"):
        h.send_commit(1, DIGEST)
    with pytest.raises(ProtocolError, match="RESULT ends a file stream"):
        h.receive_data(jframe(1, T.RESULT, {}))
    a = started_agent()
    with pytest.raises(UsageError, match="runs a process"):
        a.file_done(1, {})
    h, a = wired()
    stream = h.open_file({"op": "get", "path": "/f"})
    with pytest.raises(UsageError, match="file stream"):
        h.send_signal(stream, 9)
    to_agent(h, a)
    with pytest.raises(UsageError, match="file stream"):
        a.started(stream, 5)
    with pytest.raises(UsageError, match="file stream"):
        a.exited(stream, exit_code=0)
    with pytest.raises(UsageError, match="file stream"):
        a.exec_failed(stream, "x", "y")


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (encode_frame(1, T.STDERR, FLAG_END), "only STDOUT"),
        (jframe(1, T.STARTED, {"pid": 4}), "only STDOUT"),
        (jframe(1, T.EXIT, EXIT0), "only STDOUT"),
        (jframe(1, T.RESULT, {}), "RESULT before END"),
        (encode_frame(1, T.STDOUT, 0, b"x" * 11), "credit"),
        (encode_frame(1, T.RESULT, 0, b"[]"), None),
    ],
)
def test_what_a_host_refuses_on_a_get_stream(frame: bytes, why: str | None) -> None:
    h = host()
    h.open_file({"op": "get", "path": "/f"}, 10)
    if why is None:  # a RESULT that is not an object, after END
        h.receive_data(encode_frame(1, T.STDOUT, FLAG_END))
        why = "not an object"
    with pytest.raises(ProtocolError, match=why):
        h.receive_data(frame)


def test_a_host_refuses_the_result_of_a_put_before_its_commit() -> None:
    h = host()
    h.open_file({"op": "put", "path": "/f"})
    with pytest.raises(ProtocolError, match="before its COMMIT"):
        h.receive_data(jframe(1, T.RESULT, {"size": 0}))


def put_agent() -> AgentSession:
    a = agent()
    a.receive_data(jframe(1, T.FILE, {"op": "put", "path": "/f"}))
    assert [type(e) for e in events(a)] == [FileRequested]
    return a


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        ([jframe(1, T.COMMIT, {"sha256": DIGEST})], "before the put's bytes ended"),
        ([encode_frame(1, T.STDIN, FLAG_END), jframe(1, T.COMMIT, {"sha256": "x"})], "64"),
        ([encode_frame(1, T.STDIN, FLAG_END), jframe(1, T.COMMIT, {})], "64"),
        (
            [encode_frame(1, T.STDIN, FLAG_END)] + [jframe(1, T.COMMIT, {"sha256": DIGEST})] * 2,
            "already committed",
        ),
        ([encode_frame(1, T.STDIN, 0, b"x" * (1 << 20 + 1))], None),
    ],
)
def test_what_an_agent_refuses_on_a_put_stream(frames: list[bytes], why: str | None) -> None:
    a = put_agent()
    with pytest.raises(ProtocolError, match=why or "exceed"):
        for frame in frames:
            a.receive_data(frame)


def test_commit_and_stdin_belong_to_a_put() -> None:
    for frame, why in (
        (jframe(1, T.COMMIT, {"sha256": DIGEST}), "only a put"),
        (encode_frame(1, T.STDIN, 0, b"x"), "without a stdin pipe"),
    ):
        a = agent()
        a.receive_data(jframe(1, T.FILE, {"op": "get", "path": "/f"}))
        with pytest.raises(ProtocolError, match=why):
            a.receive_data(frame)


def test_a_put_result_waits_for_its_commit() -> None:
    a = put_agent()
    a.receive_data(encode_frame(1, T.STDIN, FLAG_END))
    with pytest.raises(UsageError, match="before its COMMIT"):
        a.file_done(1, {})


def test_the_agent_refuses_a_bad_file_request_and_too_many_files() -> None:
    a = agent(AgentLimits(max_files=1))
    a.receive_data(jframe(1, T.FILE, {"op": 7}) + jframe(3, T.FILE, {"op": "get", "window": -1}))
    assert events(a) == []
    assert [(f.stream, error_of(f)["code"], error_of(f)["type"]) for f in sent(a)] == [
        (1, "bad_request", T.FILE),
        (3, "bad_request", T.FILE),
    ]
    a.receive_data(jframe(5, T.FILE, {"op": "stat"}) + jframe(7, T.FILE, {"op": "stat"}))
    assert events(a) == [FileRequested(5, "stat", {"op": "stat"})]
    (refused,) = sent(a)
    assert (refused.stream, error_of(refused)["code"]) == (7, "limit")
    with pytest.raises(ProtocolError, match="odd and increasing"):
        a.receive_data(jframe(7, T.FILE, {"op": "stat"}))


def test_an_unknown_op_opens_a_stream_with_no_data_channel() -> None:
    a = agent()
    a.receive_data(jframe(1, T.FILE, {"op": "chmod"}))
    assert events(a) == [FileRequested(1, "chmod", {"op": "chmod"})]
    assert [a.credit(1, c) for c in Channel] == [0, 0, 0]
    a.file_done(1, {})  # STDOUT never flowed: nothing to end first
    assert [f.type for f in sent(a)] == [T.RESULT]


def test_close_on_a_file_stream_drops_its_output() -> None:
    h, a = wired()
    stream = h.open_file({"op": "get", "path": "/f"}, 10)
    to_agent(h, a)
    h.send_close(stream)
    assert to_agent(h, a) == [CloseRequested(stream)]
    assert a.send_output(stream, Channel.STDOUT, b"dropped") == 7
    a.file_failed(stream, "closed", "the host closed the stream")
    assert to_host(a, h) == [StreamError(stream, "closed", "the host closed the stream", None)]


# -- streamed data payloads (stream_data=True, what the host and the agent use) ----------------


def lent(session: HostSession | AgentSession, data: bytes) -> list[Any]:
    """``data`` through lent memory, as an I/O layer feeds it, events (copied) after each
    commit; an event's data is only valid until the session lends memory again."""
    out: list[Any] = []

    def take() -> None:
        for event in events(session):
            if isinstance(event, Output | StdinData):
                event = dataclasses.replace(event, data=bytes(event.data))
            out.append(event)

    lend(session, data, take)
    return out


def test_a_streamed_stdout_frame_arrives_in_pieces_that_add_up() -> None:
    h = host(stream_data=True)
    h.open_exec({"argv": ["x"]}, 1 << 20)
    h.receive_data(jframe(1, T.STARTED, {"pid": 7}))
    events(h)
    payload = bytes(range(256)) * 3000  # 768,000 bytes: several pieces
    got = lent(h, encode_frame(1, T.STDOUT, FLAG_END, payload))
    assert len(got) > 2
    assert all(isinstance(e, Output) and e.stream == 1 for e in got)
    assert b"".join(e.data for e in got) == payload
    assert [e.end for e in got] == [False] * (len(got) - 1) + [True]
    assert h.credit(1, Channel.STDOUT) == 0  # the channel ended


def test_a_streamed_frame_beyond_credit_is_refused_before_any_piece_is_delivered() -> None:
    a = agent(stream_data=True)
    a.receive_data(jframe(1, T.EXEC, {"argv": ["x"], "stdin": True}))
    events(a)
    a.started(1, 7)
    window = a.limits.stdin_window
    # The header alone first: the payload's first bytes come through the data buffer.
    a.receive_data(HEADER.pack(window + 1, 1, T.STDIN, 0))
    assert events(a) == []
    with a.get_buffer(-1) as buf:
        buf[:10] = b"x" * 10
    with pytest.raises(ProtocolError, match="exceed"):
        a.buffer_updated(10)
    assert [e for e in events(a) if isinstance(e, StdinData)] == []


def test_pieces_of_a_frame_for_a_stream_never_opened_get_one_error() -> None:
    a = agent(stream_data=True)
    got = lent(a, encode_frame(5, T.STDIN, 0, b"s" * 600_000))
    assert got == []
    errors = [f for f in sent(a) if f.type == T.ERROR]
    assert len(errors) == 1 and error_of(errors[0])["code"] == "unknown_stream"


def test_without_stream_data_a_large_frame_is_one_event_of_bytes() -> None:
    h = started_host(window=1 << 20)
    h.receive_data(encode_frame(1, T.STDOUT, 0, b"o" * 600_000))
    (event,) = events(h)
    assert isinstance(event.data, bytes) and len(event.data) == 600_000

"""Hostile bytes into the v2 decoder and into both v2 sessions, in any chunking.

The decoder is checked against a reference parser written the plainest way
over the whole byte string, and its memory is measured after every step.
The sessions are fed mixtures of well-formed frames (with fields right and
wrong), raw hostile headers and noise, while the host also acts (grants,
stdin, close): the only exception a received byte may cause is
``ProtocolError`` (``FrameTooLarge`` included), after which the session
refuses more input with ``UsageError``; every invariant of the state (credit
within bounds, events well formed, every frame sent decodable) holds after
every step.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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

from .conftest import Scale
from .test_fuzz_decoders import lend, push  # the two input paths, for any decoder or session

T = FrameType
SCRATCH = 8 * 1024
FIRST_CHUNK = 64 * 1024
CONTROL = {
    T.STARTED, T.FILE, T.WINDOW, T.SIGNAL, T.RESIZE, T.CLOSE, T.COMMIT, T.EXIT, T.RESULT,
    T.ERROR, T.PING, T.PONG,
}  # fmt: skip
KNOWN = set(FrameType)

_fuzz = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

# -- the frame decoder -------------------------------------------------------------------


def limit_of(type: int, max_frame: int, max_control: int) -> int:
    if type in CONTROL:
        return max_control
    return max(max_frame, max_control) if type == T.EXEC else max_frame


def reference_frames(
    data: bytes, max_frame: int, max_control: int
) -> tuple[list[Frame], type[ProtocolError] | None]:
    """Frames, parsed the obvious way, and the error the stream must end in."""
    frames: list[Frame] = []
    pos = 0
    while len(data) - pos >= HEADER.size:
        length, stream, type, flags = HEADER.unpack_from(data, pos)
        if length > limit_of(type, max_frame, max_control):
            return frames, FrameTooLarge
        if len(data) - pos - HEADER.size < length:
            break
        body = data[pos + HEADER.size : pos + HEADER.size + length]
        frames.append(Frame(stream, type, flags, body if type in KNOWN else b""))
        pos += HEADER.size + length
    return frames, None


def check_memory(decoder: FrameDecoder) -> None:
    """The decoder holds its scratch, and beyond it no more than has arrived (or its limit)."""
    assert len(decoder._scratch) == SCRATCH
    limit = max(decoder.max_frame, decoder.max_control)
    body = decoder._body
    if body is not None and body.chunks is not None:
        held = sum(len(c) for c in body.chunks)
        assert held <= decoder._length <= limit
        assert held <= 2 * body.received + FIRST_CHUNK
    if body is not None and body.whole is not None:
        assert body.whole.length == decoder._length <= limit
    if decoder._skip:  # an unknown type's payload is never kept
        assert body is None


Feeder = Callable[[Any, bytes], None]


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


small_limit = st.integers(min_value=0, max_value=6000)
cuts = st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=40)
feeders = st.sampled_from([push, lend])
types = st.one_of(st.sampled_from(sorted(KNOWN)), st.integers(0, 255))
streams = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 7]), st.integers(0, 0xFFFF_FFFF))
body = st.one_of(st.binary(max_size=40), st.integers(0, 9000).map(lambda n: b"x" * n))
frames = st.builds(encode_frame, streams, types, st.integers(0, 255), body)
raw_headers = st.builds(
    HEADER.pack, st.integers(0, 0xFFFF_FFFF), streams, types, st.integers(0, 255)
)


def mixture(*parts: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Byte strings made of the given pieces, hostile headers and noise, in any order."""
    piece = st.one_of(*parts, raw_headers, st.binary(max_size=24))
    return st.lists(piece, max_size=14).map(b"".join)


def test_streaming_frame_decoder_on_hostile_bytes(scale: Scale) -> None:
    """``stream_data``: the pieces of each data payload, copied as an I/O layer must before
    the next input, add up to the frames the reference decoder finds, in order."""

    @settings(_fuzz, max_examples=scale.fuzz_examples)
    @given(small_limit, small_limit, mixture(frames), cuts)
    def check(max_frame: int, max_control: int, data: bytes, cuts: list[int]) -> None:
        decoder = FrameDecoder(max_frame, max_control, stream_data=True)
        got: list[Frame] = []
        partial: list[Frame] = []
        error: ProtocolError | None = None
        for piece in pieces(data, cuts):
            try:
                decoder.receive_data(piece)
            except ProtocolError as exc:
                error = exc
            while (frame := decoder.next_frame()) is not None:
                assert frame.offset == sum(len(p.payload) for p in partial)
                partial.append(frame)
                if not frame.more:
                    payload = b"".join(bytes(p.payload) for p in partial)
                    got.append(Frame(frame.stream, frame.type, frame.flags, payload))
                    partial.clear()
            if error is not None:
                break
        expected, expected_error = reference_frames(data, max_frame, max_control)
        assert got == expected
        assert (error is None) == (expected_error is None)

    check()


def test_frame_decoder_on_hostile_bytes(scale: Scale) -> None:
    @settings(_fuzz, max_examples=scale.fuzz_examples)
    @given(small_limit, small_limit, mixture(frames), cuts, feeders)
    def check(max_frame: int, max_control: int, data: bytes, cuts: list[int], feed: Feeder) -> None:
        decoder = FrameDecoder(max_frame, max_control)
        got: list[Frame] = []
        error: ProtocolError | None = None
        for piece in pieces(data, cuts):
            try:
                feed(decoder, piece)
            except ProtocolError as exc:
                error = exc
            while (frame := decoder.next_frame()) is not None:
                got.append(frame)
            if error is not None:
                break
            check_memory(decoder)
        expected, expected_error = reference_frames(data, max_frame, max_control)
        assert got == expected
        if expected_error is None:
            assert error is None
        else:
            assert type(error) is expected_error
            for again in (lambda: decoder.receive_data(b"\0"), lambda: decoder.get_buffer()):
                try:
                    again()
                except UsageError:
                    continue
                raise AssertionError("a failed decoder took more input")

    check()


# -- the sessions --------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**33), 2**33),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = [
    "pid", "exit_code", "signal", "timed_out", "output_incomplete", "code", "message",
    "errno", "type", "rows", "cols", "stdin", "window", "argv", "pty", "op", "path",
    "sha256", "size",
]  # fmt: skip


def objects(*good: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed objects, the same with one field changed, and random ones."""
    base = st.sampled_from(good)
    return st.one_of(
        base,
        st.builds(lambda g, k, v: {**g, k: v}, base, st.sampled_from(FIELDS), json_values),
        st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5),
    )


json_payload = st.one_of(
    st.binary(max_size=12), st.sampled_from([b"[]", b"{", b"null", b'{"a":NaN}', b"\xff{}"])
)
stream_ids = st.sampled_from([0, 1, 2, 3, 5, 7, 9])
data_flags = st.sampled_from([0, FLAG_END, 0xFE, 0xFF])


def json_frames(type: T, *good: dict[str, Any]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(encode_json, stream_ids, st.just(type), objects(*good)),
        st.builds(encode_frame, stream_ids, st.just(type), st.just(0), json_payload),
    )


def data_frames(type: T) -> st.SearchStrategy[bytes]:
    return st.builds(encode_frame, stream_ids, st.just(type), data_flags, body)


windows = st.one_of(
    st.builds(encode_window, stream_ids, st.sampled_from(Channel), st.integers(0, MAX_CREDIT)),
    st.builds(encode_frame, stream_ids, st.just(T.WINDOW), st.just(0), st.binary(max_size=7)),
)
pings = st.builds(
    encode_frame,
    st.sampled_from([0, 0, 1]),
    st.sampled_from([T.PING, T.PONG]),
    st.just(0),
    st.binary(max_size=70),
)
errors = json_frames(
    T.ERROR,
    {"code": "spawn_failed", "message": "x", "errno": "ENOENT", "type": 1},
    {"code": "x", "message": ""},
)
agent_frames = st.one_of(
    json_frames(T.STARTED, {"pid": 7}),
    data_frames(T.STDOUT),
    data_frames(T.STDERR),
    windows,
    json_frames(
        T.EXIT,
        {"exit_code": 0, "signal": None, "timed_out": False, "output_incomplete": False},
        {"signal": 9, "timed_out": True},
    ),
    json_frames(T.RESULT, {"size": 1, "sha256": "ab" * 32}, {}),
    errors,
    pings,
    frames,
)
host_frames = st.one_of(
    json_frames(
        T.EXEC,
        {"argv": ["x"]},
        {"argv": ["x"], "stdin": True, "window": 5},
        {"command": "y", "pty": {}},
    ),
    data_frames(T.STDIN),
    windows,
    json_frames(T.SIGNAL, {"signal": 15}),
    json_frames(T.RESIZE, {"rows": 24, "cols": 80}),
    st.builds(encode_frame, stream_ids, st.just(T.CLOSE), st.just(0), st.binary(max_size=3)),
    json_frames(T.FILE, {"op": "put", "path": "/x"}, {"op": "get", "window": 5}, {"op": "stat"}),
    json_frames(T.COMMIT, {"sha256": "ab" * 32}),
    errors,
    pings,
    frames,
)
limits = st.builds(
    AgentLimits,
    max_frame=st.integers(1, 6000),
    max_streams=st.integers(1, 4),
    stdin_window=st.integers(0, 100),
    max_files=st.integers(1, 3),
    file_window=st.integers(1, 100),
)
# What the host does between reads: (action, stream, amount).
actions = st.lists(
    st.tuples(
        st.sampled_from(["grant", "stdin", "close", "signal", "ping"]),
        st.sampled_from([1, 3, 5]),
        st.integers(0, 50),
    ),
    max_size=10,
)


def sent_frames(session: HostSession | AgentSession) -> list[Frame]:
    """What a session queued must always decode as well-formed frames."""
    decoder = FrameDecoder(0xFFFF_FFFF, 0xFFFF_FFFF)
    for chunk in session.data_to_send():
        decoder.receive_data(bytes(chunk))
    assert not decoder.in_frame
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def check_credit(session: HostSession | AgentSession) -> None:
    for stream in session.streams:
        for channel in Channel:
            assert 0 <= session.credit(stream, channel) <= MAX_CREDIT


def feed_until_error(
    session: Any, data: bytes, cuts: list[int], feed: Feeder, step: Callable[[], None]
) -> bool:
    """Feed ``data`` in pieces, calling ``step`` after each; True if it ended in an error."""
    for piece in pieces(data, cuts):
        try:
            feed(session, piece)
        except ProtocolError:
            step()
            try:
                session.receive_data(b"\0")
            except UsageError:
                return True
            raise AssertionError("a failed session took more input") from None
        step()
    return False


def test_host_session_on_hostile_bytes(scale: Scale) -> None:
    @settings(_fuzz, max_examples=scale.fuzz_examples)
    @given(
        limits,
        st.integers(1, 6000),
        st.lists(st.tuples(st.booleans(), st.integers(0, 50)), min_size=1, max_size=3),
        mixture(agent_frames),
        cuts,
        feeders,
        actions,
    )
    def check(
        agent: AgentLimits,
        max_frame: int,
        opened: list[tuple[bool, int]],
        data: bytes,
        cuts: list[int],
        feed: Feeder,
        todo: list[tuple[str, int, int]],
    ) -> None:
        caps = frozenset({"exec", "signal", "ping", "files", "brief"})
        host = HostSession(HelloAnswer(2, agent, caps, "fuzz"), max_frame)
        file_streams = set()
        for i, (stdin, window) in enumerate(opened[: agent.max_streams]):
            if i % 2 and host.files < agent.max_files:
                op = "put" if stdin else "get"
                file_streams.add(host.open_file({"op": op, "path": "/x"}, window))
            else:
                brief = i % 4 == 2
                host.open_exec({"argv": ["x"], "stdin": stdin, "brief": brief}, window)
        ended: set[int] = set()
        actions = iter(todo)

        def step() -> None:
            while (event := host.next_event()) is not None:
                if isinstance(event, Output):
                    assert event.channel in (Channel.STDOUT, Channel.STDERR)
                    assert len(event.data) <= max_frame
                elif isinstance(event, Exited):
                    assert (event.exit_code is None) != (event.signal is None)
                    ended.add(event.stream)
                elif isinstance(event, StreamError | FileResult):
                    ended.add(event.stream)
                else:
                    assert isinstance(event, Started | StdinCredit | Pong | RequestFailed)
                if isinstance(event, Exited | StreamError | FileResult):
                    assert event.stream not in host.streams
            check_credit(host)
            for frame in sent_frames(host):
                if frame.type == T.STDIN:
                    assert len(frame.payload) <= agent.max_frame
            act = next(actions, None)
            if act is None or host._error is not None:
                return
            what, stream, n = act
            try:
                if what == "grant":
                    host.grant(stream, Channel.STDOUT, n)
                elif what == "stdin":
                    host.send_stdin(stream, b"s" * n, end=n % 2 == 0)
                elif what == "close":
                    host.send_close(stream)
                elif what == "signal":
                    host.send_signal(stream, n + 1)
                else:
                    host.ping(b"p")
            except UsageError:
                # stdin and signals make no sense on some streams, whatever their state
                assert stream not in host.streams or what in ("stdin", "grant", "signal")
                assert what != "signal" or stream in file_streams or stream not in host.streams

        feed_until_error(host, data, cuts, feed, step)

    check()


def test_agent_session_on_hostile_bytes(scale: Scale) -> None:
    @settings(_fuzz, max_examples=scale.fuzz_examples)
    @given(limits, st.integers(1, 6000), mixture(host_frames), cuts, feeders, st.booleans())
    def check(
        limits: AgentLimits,
        host_max_frame: int,
        data: bytes,
        cuts: list[int],
        feed: Feeder,
        answer: bool,
    ) -> None:
        agent = AgentSession(HelloRequest((2,), "0123456789abcdef", host_max_frame), limits)
        last = 0

        def step() -> None:
            nonlocal last
            while (event := agent.next_event()) is not None:
                if isinstance(event, ExecRequested):
                    assert event.stream % 2 == 1 and event.stream > last
                    last = event.stream
                    assert len(agent.streams) <= limits.max_streams
                    if answer and agent._error is None:  # start it, write some output
                        agent.started(event.stream, 1)
                        agent.send_output(event.stream, Channel.STDOUT, b"out" * 100, end=True)
                elif isinstance(event, StdinData):
                    assert len(event.data) <= limits.max_frame
                    agent.stdin_consumed(event.stream, len(event.data))
                elif isinstance(event, FileRequested):
                    assert event.stream % 2 == 1 and event.stream > last
                    last = event.stream
                    assert agent.files <= limits.max_files
                    if answer and event.op == "get" and agent._error is None:
                        sent = agent.send_output(event.stream, Channel.STDOUT, b"f" * 100)
                        agent.send_output(event.stream, Channel.STDOUT, b"", end=True)
                        agent.file_done(event.stream, {"size": sent})
                elif isinstance(event, CommitRequested):
                    assert len(event.sha256) == 64
                    if answer and agent._error is None:
                        agent.file_done(event.stream, {})
                else:
                    assert isinstance(
                        event,
                        SignalRequested
                        | ResizeRequested
                        | CloseRequested
                        | OutputCredit
                        | RequestFailed,
                    )
            check_credit(agent)
            for frame in sent_frames(agent):
                if frame.type in (T.STDOUT, T.STDERR):
                    assert len(frame.payload) <= host_max_frame
                if frame.type == T.ERROR:
                    assert set(json.loads(bytes(frame.payload))) <= {
                        "code",
                        "message",
                        "type",
                        "errno",
                    }

        feed_until_error(agent, data, cuts, feed, step)

    check()


# -- an honest peer driven at random, with hostile bytes slipped into one direction --------

stream_index = st.integers(0, 7)
output_channel = st.sampled_from([Channel.STDOUT, Channel.STDERR])
amount = st.integers(0, 120)
hostile = st.one_of(frames, raw_headers, st.binary(min_size=1, max_size=12))
# Common steps of a process's life come up more often than the rest.
KINDS = [
    *["open"] * 3, *["start"] * 3, *["output"] * 4, *["exit"] * 3, *["grant"] * 3,
    *["stdin"] * 3, *["consume"] * 2, *["hold"] * 2, *["inject"] * 2,
    "refuse", "close", "signal", "resize", "ping", "deliver",
    *["file"] * 2, "commit", "done", "fail",
]  # fmt: skip
# (kind, stream index, channel, amount, flag, hostile bytes)
operations = st.lists(
    st.tuples(st.sampled_from(KINDS), stream_index, output_channel, amount, st.booleans(), hostile),
    max_size=80,
)


class Duel:
    """A host session and an agent session wired together; one of them gets hostile bytes too."""

    def __init__(self, limits: AgentLimits, host_max_frame: int, victim: str, feed: Feeder) -> None:
        caps = frozenset({"exec", "signal", "resize", "pty", "ping", "files", "brief"})
        self.host = HostSession(HelloAnswer(2, limits, caps, "duel"), host_max_frame)
        self.agent = AgentSession(HelloRequest((2,), "0123456789abcdef", host_max_frame), limits)
        self.limits = limits
        self.host_max_frame = host_max_frame
        self.victim = victim
        self.feed = feed
        self.ids: list[int] = []
        self.to_agent = bytearray()
        self.to_host = bytearray()
        self.failed = False  # the victim raised ProtocolError: the duel is over
        self.held = 0  # operations left before bytes move again (so that frames cross)

    def run(self, ops: list[tuple[Any, ...]]) -> None:
        for op in ops:
            if self.failed:
                return
            self.apply(op)
            if self.held:
                self.held -= 1
            else:
                self.deliver([])
        self.deliver([])

    def stream(self, index: int, side: HostSession | AgentSession | None = None) -> int:
        """Mostly a stream open on ``side``; sometimes any id ever opened."""
        open_now = sorted(side.streams) if side is not None else []
        if open_now and index < 6:
            return open_now[index % len(open_now)]
        return self.ids[index % len(self.ids)] if self.ids else 1

    def apply(self, op: tuple[Any, ...]) -> None:
        host, agent = self.host, self.agent
        what, index, channel, n, flag, hostile = op
        try:
            if what == "open":
                request: dict[str, Any] = {"argv": ["x"], "stdin": flag}
                if index % 2:
                    request["pty"] = {"rows": 24, "cols": 80}
                if index % 3 == 2:
                    request["brief"] = True
                self.ids.append(host.open_exec(request, n))
            elif what == "start":
                agent.started(self.stream(index, agent), 100 + index)
            elif what == "refuse":
                agent.exec_failed(self.stream(index, agent), "spawn_failed", "no", "ENOENT")
            elif what == "output":
                agent.send_output(self.stream(index, agent), channel, b"o" * n, end=flag)
            elif what == "exit":  # as an agent does: END on what is still open, then EXIT
                stream = self.stream(index, agent)
                for end in (Channel.STDOUT, Channel.STDERR):
                    if agent.credit(stream, end) or not flag:
                        agent.send_output(stream, end, b"", end=True)
                agent.exited(stream, exit_code=0 if flag else None, signal=None if flag else 9)
            elif what == "grant":
                host.grant(self.stream(index, host), channel, n)
            elif what == "stdin":
                host.send_stdin(self.stream(index, host), b"i" * n, end=flag)
            elif what == "consume":
                agent.stdin_consumed(self.stream(index, agent), n)
            elif what == "close":
                host.send_close(self.stream(index, host))
            elif what == "signal":
                host.send_signal(self.stream(index, host), 15)
            elif what == "resize":
                host.send_resize(self.stream(index, host), 30, 100)
            elif what == "ping":
                host.ping(b"p")
            elif what == "deliver":
                self.deliver([n, 2 * n + index])
            elif what == "file":
                kind = ("put", "get", "listdir", "stat")[index % 4]
                self.ids.append(host.open_file({"op": kind, "path": "/x"}, n))
            elif what == "commit":  # as a host does: the rest of the bytes with END, then COMMIT
                stream = self.stream(index, host)
                host.send_stdin(stream, b"", end=True)
                host.send_commit(stream, "ab" * 32)
            elif what == "done":  # as an agent does: END on STDOUT if it flows, then RESULT
                stream = self.stream(index, agent)
                if agent.credit(stream, Channel.STDOUT) or flag:
                    agent.send_output(stream, Channel.STDOUT, b"", end=True)
                agent.file_done(stream, {"size": n})
            elif what == "fail":
                agent.file_failed(self.stream(index, agent), "file_error", "no", "ENOENT")
            elif what == "hold":
                self.held = index % 6 + 1
            else:
                (self.to_host if self.victim == "host" else self.to_agent).extend(hostile)
        except UsageError:
            pass  # an operation that makes no sense right now; the sessions refuse it whole

    def deliver(self, cuts: list[int]) -> None:
        """Move the queued bytes both ways, in pieces, until both are quiet."""
        while not self.failed:
            for chunk in self.host.data_to_send():
                self.to_agent.extend(chunk)
            for chunk in self.agent.data_to_send():
                self.to_host.extend(chunk)
            if not self.to_agent and not self.to_host:
                return
            for side, buffer in (("agent", self.to_agent), ("host", self.to_host)):
                session = self.agent if side == "agent" else self.host
                data = bytes(buffer)
                buffer.clear()
                for piece in pieces(data, cuts):
                    try:
                        self.feed(session, piece)
                    except ProtocolError:
                        assert side == self.victim, "an honest peer broke the protocol"
                        self.failed = True
                        self.check_refuses_input(session)
                        return
                    self.check()

    def check_refuses_input(self, session: HostSession | AgentSession) -> None:
        try:
            session.receive_data(b"\0")
        except UsageError:
            return
        raise AssertionError("a failed session took more input")

    def check(self) -> None:
        host, agent = self.host, self.agent
        while (event := host.next_event()) is not None:
            if isinstance(event, Output):
                assert len(event.data) <= self.host_max_frame
            elif isinstance(event, Exited):
                assert (event.exit_code is None) != (event.signal is None)
            if isinstance(event, Exited | StreamError | FileResult):
                assert event.stream not in host.streams
        while (agent_event := agent.next_event()) is not None:
            if isinstance(agent_event, StdinData):
                assert len(agent_event.data) <= self.limits.max_frame
            elif isinstance(agent_event, ExecRequested | FileRequested):
                assert len(agent.streams) <= self.limits.max_streams
                assert agent.files <= self.limits.max_files
        check_credit(host)
        check_credit(agent)
        if self.victim == "agent":  # no hostile bytes went to the host: the views agree
            for stream in agent.streams & host.streams:
                for channel in (Channel.STDOUT, Channel.STDERR):
                    assert agent.credit(stream, channel) <= host.credit(stream, channel)


def test_sessions_in_a_duel_with_hostile_bytes(scale: Scale) -> None:
    @settings(_fuzz, max_examples=scale.fuzz_examples)
    @given(limits, st.integers(1, 200), st.sampled_from(["host", "agent"]), feeders, operations)
    def check(
        limits: AgentLimits,
        host_max_frame: int,
        victim: str,
        feed: Feeder,
        ops: list[tuple[Any, ...]],
    ) -> None:
        Duel(limits, host_max_frame, victim, feed).run(ops)

    check()


def test_an_honest_duel_never_fails(scale: Scale) -> None:
    """Without injected bytes, no sequence of legal calls makes either side see a violation."""

    @settings(_fuzz, max_examples=scale.fuzz_examples)
    @given(limits, st.integers(1, 200), feeders, operations)
    def check(
        limits: AgentLimits, host_max_frame: int, feed: Feeder, ops: list[tuple[Any, ...]]
    ) -> None:
        duel = Duel(limits, host_max_frame, "nobody", feed)
        duel.run([op for op in ops if op[0] != "inject"])
        assert not duel.failed

    check()


def test_a_flood_of_unknown_types_is_answered_one_error_each() -> None:
    """Each unknown frame costs the sender 10 bytes and the receiver one ERROR of its own."""
    agent = AgentSession(HelloRequest((2,), "0123456789abcdef"))
    agent.receive_data(encode_frame(0, 0x99) * 1000)
    answers = sent_frames(agent)
    assert len(answers) == 1000
    assert {(f.stream, f.type) for f in answers} == {(0, T.ERROR)}


def test_hostile_header_lengths_never_allocate() -> None:
    for type in [*KNOWN, 0x99]:
        for length in (0xFFFF_FFFF, (1 << 20) + 1):
            decoder = FrameDecoder()
            try:
                decoder.receive_data(struct.pack(">IIBB", length, 1, type, 0))
            except FrameTooLarge:
                pass
            else:
                raise AssertionError(f"a {length}-byte {type} payload was accepted")
            assert decoder._body is None

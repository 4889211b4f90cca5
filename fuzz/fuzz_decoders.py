"""Coverage-guided fuzzing of the v1 decoders and the host's v1 state machine with atheris
(``fuzz/run.sh``; see docs/security.md).

The input chooses the target (results, commands, commands with
``skip_oversized``, or :class:`HostConnectionV1` with some calls pending),
its limit, the input path (``receive_data`` or ``get_buffer``/``buffer_updated``)
and the chunking; the rest is the byte stream. A crash is: a decoder raising
anything but ``ProtocolError``, the state machine raising at all on the guest's
bytes, a frame above the limit, a result out of order, or more memory held than
the limit allows. Feeding either after it failed must be a ``UsageError``.

``VSOCK_ASYNC_FUZZ_TARGET=v2 fuzz/run.sh`` fuzzes protocol v2 instead
(:func:`test_one_input_v2`): the v2 frame decoder, and the host and agent
sessions with streams open.
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports():
    from vsock_async import CommandResult, ConnectionLost, ProtocolError, UsageError
    from vsock_async.protocol import (
        Command,
        CommandDecoder,
        Limits,
        OversizedCommand,
        ResultDecoder,
    )
    from vsock_async.protocol.v1_host import ConnectionEnded, HostConnectionV1, ResultReceived
    from vsock_async.protocol.v2 import (
        AgentLimits,
        AgentSession,
        Channel,
        ExecRequested,
        Exited,
        FrameDecoder,
        FrameType,
        HelloAnswer,
        HelloRequest,
        HostSession,
        Output,
        StdinData,
        encode_json,
    )

SLACK = 64 * 1024 + 8 * 1024  # first chunk + scratch buffer


Fed = ResultDecoder | CommandDecoder | HostConnectionV1[int]


def feed(decoder: Fed, piece: bytes, lend: bool) -> None:
    if not lend:
        decoder.receive_data(piece)
        return
    pos = 0
    while pos < len(piece):
        with decoder.get_buffer(-1) as buf:
            if not len(buf):
                raise AssertionError("an empty buffer was lent")
            n = min(len(buf), len(piece) - pos)
            buf[:n] = piece[pos : pos + n]
        decoder.buffer_updated(n)
        pos += n


def held(decoder: ResultDecoder | CommandDecoder) -> int:
    body = decoder._body
    chunks = sum(len(c) for c in body.chunks or []) if body is not None else 0
    whole = body.whole.length if body is not None and body.whole is not None else 0
    fields = sum(len(f) if isinstance(f, bytes) else f.length for f in decoder._fields)
    return chunks + whole + fields


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.ConsumeIntInRange(0, 3)
    limit = fdp.ConsumeIntInRange(0, 100_000)
    lend = fdp.ConsumeBool()
    cuts = [fdp.ConsumeIntInRange(1, 4096) for _ in range(fdp.ConsumeIntInRange(0, 16))]
    calls = fdp.ConsumeIntInRange(0, 8)
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    if kind == 3:
        fuzz_host_connection(stream, cuts, limit, lend, calls)
        return

    decoder: ResultDecoder | CommandDecoder
    if kind == 0:
        decoder = ResultDecoder(Limits(max_stdout=limit, max_stderr=limit))
    else:
        decoder = CommandDecoder(limit, skip_oversized=kind == 2)
    pos = 0
    for size in [*cuts, len(stream)]:
        piece = stream[pos : pos + size]
        pos += len(piece)
        try:
            feed(decoder, piece, lend)
        except ProtocolError:
            try:
                decoder.receive_data(b"x")
            except UsageError:
                return
            raise AssertionError("a failed decoder accepted more input") from None
        if held(decoder) > 2 * limit + SLACK:
            raise AssertionError(f"decoder holds {held(decoder)} bytes with a limit of {limit}")
        while (event := decoder.next_event()) is not None:
            if isinstance(event, CommandResult):
                ok = len(event.stdout) <= limit and len(event.stderr) <= limit
                ok = ok and event.exit_code is not None and 0 <= event.exit_code <= 255
            elif isinstance(event, Command):
                ok = len(event.command) <= limit
            else:
                ok = isinstance(event, OversizedCommand) and event.length > limit and kind == 2
            if not ok:
                raise AssertionError(f"invalid event {event!r} with a limit of {limit}")


def fuzz_host_connection(
    stream: bytes, cuts: list[int], limit: int, lend: bool, calls: int
) -> None:
    """The guest's bytes never make the state machine raise; results come in call order."""
    conn: HostConnectionV1[int] = HostConnectionV1(Limits(max_stdout=limit, max_stderr=limit))
    for i in range(calls):
        conn.send_command(i, b"c", probe=i % 3 == 2)
    answered = 0
    pos = 0
    for size in [*cuts, len(stream)]:
        piece = stream[pos : pos + size]
        pos += len(piece)
        feed(conn, piece, lend)
        if held(conn._decoder) > 2 * limit + SLACK:
            raise AssertionError(f"connection holds {held(conn._decoder)} bytes, limit {limit}")
        while (event := conn.next_event()) is not None:
            if isinstance(event, ResultReceived):
                if event.id != answered or len(event.result.stdout) > limit:
                    raise AssertionError(f"result {event!r} out of order or too large")
                answered += 1
                continue
            assert isinstance(event, ConnectionEnded)
            if not isinstance(event.error, ProtocolError | ConnectionLost):
                raise AssertionError(f"ended with {event.error!r}")
            if event.unanswered != tuple(range(answered, calls)):
                raise AssertionError(f"{event.unanswered} unanswered after {answered} results")
            try:
                conn.receive_data(b"x")
            except UsageError:
                return
            raise AssertionError("an ended connection accepted more input")
    conn.receive_eof()


# -- protocol v2 ---------------------------------------------------------------------------

U32_MAX = 0xFFFF_FFFF
KNOWN_V2 = set(FrameType)
CONTROL_V2 = KNOWN_V2 - {FrameType.EXEC, FrameType.STDIN, FrameType.STDOUT, FrameType.STDERR}


def test_one_input_v2(data: bytes) -> None:
    """Bytes into the v2 decoder, or into a host or agent session with streams open."""
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.ConsumeIntInRange(0, 2)
    max_frame = fdp.ConsumeIntInRange(1, 100_000)
    max_control = fdp.ConsumeIntInRange(0, 100_000)
    window = fdp.ConsumeIntInRange(0, 5000)
    lend = fdp.ConsumeBool()
    cuts = [fdp.ConsumeIntInRange(1, 4096) for _ in range(fdp.ConsumeIntInRange(0, 16))]
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    if kind == 0:
        fuzz_v2_decoder(stream, cuts, max_frame, max_control, lend)
    else:
        fuzz_v2_session(stream, cuts, max_frame, window, lend, host=kind == 1)


def pieces_of(stream: bytes, cuts: list[int]) -> list[bytes]:
    out, pos = [], 0
    for size in [*cuts, len(stream)]:
        out.append(stream[pos : pos + size])
        pos += size
    return [piece for piece in out if piece]


def fed(target: FrameDecoder | HostSession | AgentSession, piece: bytes, lend: bool) -> bool:
    """Feed one piece; False once the target failed (after checking it refuses more input)."""
    try:
        feed(target, piece, lend)  # duck-typed: v2 has the same input methods as v1
    except ProtocolError:
        try:
            target.receive_data(b"x")
        except UsageError:
            return False
        raise AssertionError(f"a failed {type(target).__name__} accepted more input") from None
    return True


def fuzz_v2_decoder(
    stream: bytes, cuts: list[int], max_frame: int, max_control: int, lend: bool
) -> None:
    """Only FrameTooLarge escapes; frames keep within their type's limit; memory follows."""
    decoder = FrameDecoder(max_frame, max_control)
    limit = max(max_frame, max_control)
    for piece in pieces_of(stream, cuts):
        if not fed(decoder, piece, lend):
            return
        body = decoder._body
        held = sum(len(c) for c in body.chunks or []) if body is not None else 0
        held += body.whole.length if body is not None and body.whole is not None else 0
        if held > 2 * limit + SLACK:
            raise AssertionError(f"v2 decoder holds {held} bytes with limits {limit}")
        while (frame := decoder.next_frame()) is not None:
            if frame.type in CONTROL_V2:
                ok = len(frame.payload) <= max_control
            elif frame.type in KNOWN_V2:
                ok = len(frame.payload) <= limit
            else:
                ok = frame.payload == b""  # unknown types are skipped
            if not ok:
                raise AssertionError(f"invalid frame {frame!r}")


def fuzz_v2_session(
    stream: bytes, cuts: list[int], max_frame: int, window: int, lend: bool, host: bool
) -> None:
    """A peer's bytes only ever raise ProtocolError; credit stays in bounds; what is sent parses."""
    limits = AgentLimits(max_frame=max_frame, max_streams=4, stdin_window=window)
    session: HostSession | AgentSession
    if host:
        caps = frozenset({"exec", "signal", "resize", "pty", "ping"})
        session = HostSession(HelloAnswer(2, limits, caps, "fuzz"), max_frame)
        session.open_exec({"argv": ["a"], "stdin": True, "pty": {}}, window)
        session.open_exec({"argv": ["b"]}, window)
        prelude = encode_json(1, FrameType.STARTED, {"pid": 1})
    else:
        session = AgentSession(HelloRequest((2,), "0123456789abcdef", max_frame), limits)
        prelude = encode_json(1, FrameType.EXEC, {"argv": ["a"], "stdin": True, "pty": {}})
        prelude += encode_json(3, FrameType.EXEC, {"argv": ["b"], "window": window})
    for piece in [prelude, *pieces_of(stream, cuts)]:
        if not fed(session, piece, lend):
            return
        check_v2_session(session, max_frame)
    session.receive_eof()


def check_v2_session(session: HostSession | AgentSession, max_frame: int) -> None:
    if isinstance(session, HostSession):
        while (event := session.next_event()) is not None:
            if isinstance(event, Output) and len(event.data) > max_frame:
                raise AssertionError(f"{event!r} is above max_frame {max_frame}")
            if isinstance(event, Exited) and (event.exit_code is None) == (event.signal is None):
                raise AssertionError(f"{event!r} has not exactly one of exit_code and signal")
    else:
        while (agent_event := session.next_event()) is not None:
            if isinstance(agent_event, ExecRequested):
                session.started(agent_event.stream, 1)
                session.send_output(agent_event.stream, Channel.STDOUT, b"o" * 100, end=True)
            elif isinstance(agent_event, StdinData):
                session.stdin_consumed(agent_event.stream, len(agent_event.data))
    for stream in session.streams:
        for channel in Channel:
            if not 0 <= session.credit(stream, channel) <= 2**31 - 1:
                raise AssertionError(f"credit of stream {stream} {channel!r} out of bounds")
    sent = FrameDecoder(U32_MAX, U32_MAX)
    for chunk in session.data_to_send():
        sent.receive_data(bytes(chunk))
    if sent.in_frame:
        raise AssertionError("a session queued part of a frame")
    while (frame := sent.next_frame()) is not None:
        if frame.type in (FrameType.STDOUT, FrameType.STDERR) and len(frame.payload) > max_frame:
            raise AssertionError(f"sent {frame!r} above the peer's max_frame")


def main() -> None:
    target = (
        test_one_input_v2 if os.environ.get("VSOCK_ASYNC_FUZZ_TARGET") == "v2" else test_one_input
    )
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

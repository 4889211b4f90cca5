"""Coverage-guided fuzzing of the v1 decoders and the host's v1 state machine with atheris
(``fuzz/run.sh``; see docs/security.md).

The input chooses the target (results, commands, commands with
``skip_oversized``, or :class:`HostConnectionV1` with some calls pending),
its limit, the input path (``receive_data`` or ``get_buffer``/``buffer_updated``)
and the chunking; the rest is the byte stream. A crash is: a decoder raising
anything but ``ProtocolError``, the state machine raising at all on the guest's
bytes, a frame above the limit, a result out of order, or more memory held than
the limit allows. Feeding either after it failed must be a ``UsageError``.
"""

from __future__ import annotations

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
    from vsock_async.protocol.v1_host import (
        ConnectionEnded,
        ConnectionState,
        HostConnectionV1,
        ResultReceived,
    )

SLACK = 64 * 1024 + 8 * 1024  # first chunk + scratch buffer


Fed = ResultDecoder | CommandDecoder | HostConnectionV1[int]


def feed(decoder: Fed, piece: bytes, lend: bool) -> None:
    if not lend:
        decoder.receive_data(piece)
        return
    pos = 0
    while pos < len(piece) and not ended(decoder):  # an I/O layer stops reading there
        with decoder.get_buffer(-1) as buf:
            if not len(buf):
                raise AssertionError("an empty buffer was lent")
            n = min(len(buf), len(piece) - pos)
            buf[:n] = piece[pos : pos + n]
        decoder.buffer_updated(n)
        pos += n


def ended(decoder: Fed) -> bool:
    return isinstance(decoder, HostConnectionV1) and decoder.state is ConnectionState.CLOSED


def held(decoder: ResultDecoder | CommandDecoder) -> int:
    chunks = sum(len(c) for c in decoder._chunks or [])
    whole = decoder._whole.length if decoder._whole is not None else 0
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


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

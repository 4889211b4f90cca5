"""Coverage-guided fuzzing of the v1 decoders with atheris (``fuzz/run.sh``; see docs/security.md).

The input chooses the decoder (results, commands, commands with
``skip_oversized``), its limit, the input path (``receive_data`` or
``get_buffer``/``buffer_updated``) and the chunking; the rest is the byte
stream. Any exception other than ``ProtocolError`` is a crash, and so is a
frame above the limit or a decoder holding more memory than its limit allows.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from vsock_async import CommandResult, ProtocolError
    from vsock_async.protocol import (
        Command,
        CommandDecoder,
        Limits,
        OversizedCommand,
        ResultDecoder,
    )

SLACK = 64 * 1024 + 8 * 1024  # first chunk + scratch buffer


def feed(decoder: ResultDecoder | CommandDecoder, piece: bytes, lend: bool) -> None:
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
    chunks = sum(len(c) for c in decoder._chunks or [])
    whole = decoder._whole.length if getattr(decoder, "_whole", None) is not None else 0
    fields = sum(len(f) if isinstance(f, bytes) else f.length for f in decoder._fields)
    return chunks + whole + fields


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.ConsumeIntInRange(0, 2)
    limit = fdp.ConsumeIntInRange(0, 100_000)
    lend = fdp.ConsumeBool()
    cuts = [fdp.ConsumeIntInRange(1, 4096) for _ in range(fdp.ConsumeIntInRange(0, 16))]
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())

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
            except ProtocolError:
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


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

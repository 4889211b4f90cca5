"""The guard on the size of a client's exec WebSocket messages, frame by frame, with no I/O:
what it passes on to aiohttp is the client's bytes less the oversized messages, however the
reads cut them; an oversized message is reported once."""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

import pytest

from vsock_async.serve.control_exec import MessageGuard, limit_messages

TEXT, BINARY, CONTINUATION, CLOSE, PING = 0x1, 0x2, 0x0, 0x8, 0x9


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """One frame as a client sends it (the mask key is all zero: the payload goes as it is)."""
    first = (0x80 if fin else 0) | opcode
    mask = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        header = struct.pack(">BB", first, mask | n)
    elif n < 1 << 16:
        header = struct.pack(">BBH", first, mask | 126, n)
    else:
        header = struct.pack(">BBQ", first, mask | 127, n)
    return header + (b"\0\0\0\0" if masked else b"") + payload


def feed(guard: MessageGuard, data: bytes, step: int) -> tuple[bytes, list[int]]:
    """``data`` fed ``step`` bytes at a time: what went on, and the sizes reported."""
    passed, found = b"", []
    for start in range(0, len(data), step):
        pieces, too_big = guard.feed(data[start : start + step])
        passed += b"".join(pieces)
        if too_big is not None:
            found.append(too_big)
    return passed, found


STEPS = [1, 2, 3, 7, 14, 100, 1 << 20]


@pytest.mark.parametrize("step", STEPS)
def test_frames_within_the_limit_pass_unchanged(step: int) -> None:
    stream = (
        frame(TEXT, b'{"command": "cat"}')
        + frame(BINARY, b"\0" + b"x" * 200)  # a 16-bit length
        + frame(PING, b"ping")
        + frame(BINARY, b"\0" + b"y" * 999, fin=False)
        + frame(PING, b"")  # a control frame between fragments
        + frame(CONTINUATION, b"z" * 1000)  # the message is 2000 bytes: at the limit
        + frame(BINARY, b"", masked=False)
        + frame(CLOSE, b"\x03\xe8")
    )
    assert feed(MessageGuard(2000), stream, step) == (stream, [])


@pytest.mark.parametrize("step", STEPS)
def test_a_message_over_the_limit_is_dropped_and_reported_once(step: int) -> None:
    before, after = frame(TEXT, b"a" * 10), frame(BINARY, b"b" * 10) + frame(CLOSE, b"")
    big = frame(BINARY, b"x" * 70000)  # a 64-bit length
    assert feed(MessageGuard(100), before + big + after, step) == (before + after, [70000])


@pytest.mark.parametrize("step", STEPS)
def test_a_fragmented_message_is_dropped_from_the_fragment_that_goes_over(step: int) -> None:
    first = frame(BINARY, b"x" * 60, fin=False)
    ping = frame(PING, b"p")
    rest = frame(CONTINUATION, b"y" * 60, fin=False) + ping + frame(CONTINUATION, b"z" * 60)
    after = frame(TEXT, b"next")
    passed, found = feed(MessageGuard(100), first + rest + after, step)
    assert (passed, found) == (first + ping + after, [120])


def test_an_aiohttp_without_the_parser_to_wrap_keeps_its_own_limit() -> None:
    """The guard reaches into aiohttp's private parser and message queue; where they are
    missing (another aiohttp), nothing is wrapped and the exec route carries on."""
    request: Any = SimpleNamespace(protocol=SimpleNamespace())
    ws: Any = SimpleNamespace(_reader=None)
    assert limit_messages(ws, request, 100) is False
    assert vars(request.protocol) == {}

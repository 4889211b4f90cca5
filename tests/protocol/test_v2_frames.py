"""v2 frames without an event loop: encoders, the decoder in any chunking, hostile lengths."""

from __future__ import annotations

import struct

import pytest

from vsock_async import FrameTooLarge, ProtocolError, UsageError
from vsock_async.protocol.v2 import (
    DEFAULT_MAX_FRAME,
    FLAG_END,
    HEADER,
    MAX_CONTROL,
    Channel,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_json,
    encode_window,
    frame_parts,
    write_pieces,
)
from vsock_async.protocol.v2_frames import DATA_BUFFER

from .lending import lend


def frames_of(decoder: FrameDecoder) -> list[Frame]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


SAMPLE = [
    Frame(1, FrameType.EXEC, 0, b'{"argv":["echo","hi"]}'),
    Frame(1, FrameType.STARTED, 0, b'{"pid":42}'),
    Frame(1, FrameType.STDOUT, FLAG_END, b"hi\n"),
    Frame(1, FrameType.STDERR, FLAG_END, b""),
    Frame(3, FrameType.STDIN, 0, bytes(range(256)) * 40),  # above the inline size
    Frame(0, FrameType.PING, 0, b"12345678"),
    Frame(1, FrameType.WINDOW, 0, b"\x01\x00\x01\x00\x00"),
    Frame(5, FrameType.STDOUT, 0, b"z" * 200_000),  # large: chunks, then its final object
    Frame(1, FrameType.EXIT, 0, b'{"exit_code":0}'),
]
WIRE = b"".join(encode_frame(f.stream, f.type, f.flags, f.payload) for f in SAMPLE)


def test_header_layout() -> None:
    assert HEADER.size == 10
    assert encode_frame(7, FrameType.STDOUT, FLAG_END, b"ab") == bytes.fromhex(
        "00000002 00000007 11 01 6162"
    )


@pytest.mark.parametrize("path", ["push", "lend"])
def test_round_trip_in_one_piece(path: str) -> None:
    decoder = FrameDecoder()
    (decoder.receive_data if path == "push" else lambda d: lend(decoder, d))(WIRE)
    assert frames_of(decoder) == SAMPLE
    assert not decoder.in_frame


@pytest.mark.parametrize("path", ["push", "lend"])
def test_every_split_point_of_small_frames(path: str) -> None:
    frames = [f for f in SAMPLE if len(f.payload) < 5000]
    wire = b"".join(encode_frame(f.stream, f.type, f.flags, f.payload) for f in frames)
    for cut in range(len(wire) + 1):
        decoder = FrameDecoder()
        feed = decoder.receive_data if path == "push" else lambda d, dec=decoder: lend(dec, d)
        got = []
        for piece in (wire[:cut], wire[cut:]):
            if piece:  # b"" would mean end of stream
                feed(piece)
            got += frames_of(decoder)
        assert got == frames


@pytest.mark.parametrize("path", ["push", "lend"])
def test_byte_by_byte(path: str) -> None:
    decoder = FrameDecoder()
    got = []
    for i in range(len(WIRE)):
        if path == "push":
            decoder.receive_data(WIRE[i : i + 1])
        else:
            lend(decoder, WIRE[i : i + 1])
        got += frames_of(decoder)
    assert got == SAMPLE


def test_large_payload_is_received_in_place() -> None:
    """A lent buffer for a large payload is the payload's own memory, not the scratch."""
    decoder = FrameDecoder()
    decoder.receive_data(HEADER.pack(300_000, 1, FrameType.STDOUT, 0))
    sizes = []
    received = 0
    while received < 300_000:
        with decoder.get_buffer(-1) as buf:
            n = min(len(buf), 300_000 - received)
            sizes.append(len(buf))
            buf[:n] = b"q" * n
        decoder.buffer_updated(n)
        received += n
    assert max(sizes) > 8 * 1024  # not limited to the scratch buffer
    assert frames_of(decoder) == [Frame(1, FrameType.STDOUT, 0, b"q" * 300_000)]


def joined(pieces: list[Frame]) -> list[Frame]:
    """Streamed pieces put back together as the frames they came from, checking each piece's
    offset and that only a frame's last piece carries END."""
    out: list[Frame] = []
    payload = bytearray()
    for piece in pieces:
        assert piece.offset == len(payload)
        if piece.more:
            assert not piece.end
        payload += piece.payload
        if not piece.more:
            out.append(Frame(piece.stream, piece.type, piece.flags, bytes(payload)))
            payload.clear()
    assert not payload
    return out


def copied(frames: list[Frame]) -> list[Frame]:
    """Pieces are views of memory the decoder reuses: what a caller keeps, it copies."""
    return [Frame(f.stream, f.type, f.flags, bytes(f.payload), f.offset, f.length) for f in frames]


@pytest.mark.parametrize("chunk", [1, 7, 4096, 65_536, 1 << 20])
@pytest.mark.parametrize("path", ["push", "lend"])
def test_streamed_data_payloads_are_the_same_bytes_in_any_chunking(path: str, chunk: int) -> None:
    decoder = FrameDecoder(stream_data=True)
    got: list[Frame] = []

    def take() -> None:  # as an I/O layer does after each commit, and a pusher after each push
        got.extend(copied(frames_of(decoder)))

    def feed(data: bytes) -> None:
        if path == "push":
            decoder.receive_data(data)
            take()
        else:
            lend(decoder, data, take)

    want = SAMPLE if chunk > 1 else [f for f in SAMPLE if len(f.payload) < 20_000]  # quicker
    wire = b"".join(encode_frame(f.stream, f.type, f.flags, f.payload) for f in want)
    for start in range(0, len(wire), chunk):
        feed(wire[start : start + chunk])
    assert joined(got) == want
    assert not decoder.in_frame


def test_streamed_pieces_share_one_reused_buffer_and_carry_the_whole_length() -> None:
    decoder = FrameDecoder(stream_data=True)
    size = 3 * DATA_BUFFER + 5
    decoder.receive_data(HEADER.pack(size, 9, FrameType.STDOUT, FLAG_END) + b"ab")
    first = frames_of(decoder)
    assert [(f.offset, f.length, bytes(f.payload), f.more, f.end) for f in first] == [
        (0, size, b"ab", True, False)
    ]
    buffers = set()
    pieces = []
    received = 2
    while received < size:
        with decoder.get_buffer(-1) as buf:
            assert len(buf) == min(DATA_BUFFER, size - received)  # never past the payload
            buffers.add(id(buf.obj))
            n = len(buf)
            buf[:n] = b"q" * n
        decoder.buffer_updated(n)
        received += n
        pieces += [(f.offset, len(f.payload), f.more, f.end) for f in frames_of(decoder)]
    assert len(buffers) == 1  # every piece went through the same memory
    assert pieces[-1] == (size - (size - 2) % DATA_BUFFER, (size - 2) % DATA_BUFFER, False, True)
    assert [p[0] for p in pieces] == [2 + i * DATA_BUFFER for i in range(len(pieces))]
    assert all(not end for *_, end in pieces[:-1])
    # The next frame's header is parsed in the scratch again.
    decoder.receive_data(encode_frame(9, FrameType.EXIT, 0, b"{}"))
    assert frames_of(decoder) == [Frame(9, FrameType.EXIT, 0, b"{}")]


def test_only_data_payloads_stream_and_small_ones_stay_whole() -> None:
    decoder = FrameDecoder(max_control=1 << 20, stream_data=True)
    frames = [
        Frame(1, FrameType.EXEC, 0, b"x" * 100_000),  # a control payload is assembled whole
        Frame(1, FrameType.STDIN, 0, b"y" * 4000),  # inline: whole
        Frame(2, 0x7F, 0, b""),  # an unknown type is skipped, not streamed
    ]
    decoder.receive_data(encode_frame(1, FrameType.EXEC, 0, b"x" * 100_000))
    decoder.receive_data(encode_frame(1, FrameType.STDIN, 0, b"y" * 4000))
    decoder.receive_data(encode_frame(2, 0x7F, 0, b"z" * 100_000))
    got = frames_of(decoder)
    assert got == frames
    assert all(isinstance(f.payload, bytes) for f in got)


def test_release_frees_the_data_buffer_only_between_payloads() -> None:
    decoder = FrameDecoder(stream_data=True)
    decoder.receive_data(HEADER.pack(100_000, 1, FrameType.STDOUT, 0))
    with decoder.get_buffer(-1) as buf:
        held = buf.obj
        buf[:50_000] = b"a" * 50_000
    decoder.buffer_updated(50_000)
    decoder.release()  # mid-payload: kept
    with decoder.get_buffer(-1) as buf:
        assert buf.obj is held
        buf[:50_000] = b"b" * 50_000
    decoder.buffer_updated(50_000)
    assert [(f.offset, f.more) for f in frames_of(decoder)] == [(0, True), (50_000, False)]
    decoder.release()
    decoder.receive_data(HEADER.pack(100_000, 1, FrameType.STDOUT, 0))
    with decoder.get_buffer(-1) as buf:
        assert buf.obj is not held  # a new one, made when needed


def test_write_pieces_joins_small_parts_and_passes_payloads_uncopied() -> None:
    payload = memoryview(b"p" * DEFAULT_MAX_FRAME)
    header, body = frame_parts(1, FrameType.STDOUT, 0, payload)
    window = encode_window(1, Channel.STDOUT, 5)
    pieces = write_pieces([window, window, header, payload, window])
    assert len(pieces) == 3
    assert (pieces[0], pieces[2]) == (window + window + header, window)
    assert pieces[1] is payload and body is payload
    assert write_pieces([]) == []


@pytest.mark.parametrize(
    ("type", "limit_name"),
    [
        (FrameType.STDOUT, "max_frame"),
        (FrameType.STDIN, "max_frame"),
        (0x7F, "max_frame"),
        (FrameType.EXIT, "max_control"),
        (FrameType.PING, "max_control"),
        (FrameType.WINDOW, "max_control"),
        (FrameType.ERROR, "max_control"),
    ],
)
def test_payload_over_its_limit_fails_before_allocating(type: int, limit_name: str) -> None:
    decoder = FrameDecoder(max_frame=5000, max_control=100)
    limit = getattr(decoder, limit_name)
    decoder.receive_data(HEADER.pack(limit, 1, type, 0) + b"x" * limit)
    assert len(frames_of(decoder)) == 1
    with pytest.raises(FrameTooLarge) as info:
        decoder.receive_data(HEADER.pack(limit + 1, 3, type, 0))
    assert (info.value.length, info.value.limit) == (limit + 1, limit)
    assert "stream 3" in str(info.value)
    assert decoder._body is None
    with pytest.raises(UsageError):
        decoder.receive_data(b"x")
    with pytest.raises(UsageError):
        decoder.get_buffer()


@pytest.mark.parametrize(("max_frame", "max_control"), [(5000, 100), (100, 5000)])
def test_exec_is_limited_by_the_larger_limit(max_frame: int, max_control: int) -> None:
    decoder = FrameDecoder(max_frame=max_frame, max_control=max_control)
    decoder.receive_data(HEADER.pack(5000, 1, FrameType.EXEC, 0) + b"x" * 5000)
    assert len(frames_of(decoder)) == 1
    with pytest.raises(FrameTooLarge):
        decoder.receive_data(HEADER.pack(5001, 3, FrameType.EXEC, 0))


def test_u32_max_length_is_refused_at_once() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameTooLarge):
        decoder.receive_data(b"\xff\xff\xff\xff\x00\x00\x00\x01\x11\x00")


def test_below_the_limit_memory_follows_what_arrived() -> None:
    limit = 64 * 1024 * 1024
    decoder = FrameDecoder(max_frame=limit)
    decoder.receive_data(HEADER.pack(limit, 1, FrameType.STDOUT, 0))
    arrived = 0
    for size in (1, 100, 5000, 70_000, 300_000):
        decoder.receive_data(b"y" * size)
        arrived += size
        assert decoder._body is not None
        held = sum(len(c) for c in decoder._body.chunks or [])
        assert held <= 2 * arrived + 64 * 1024
    assert decoder.next_frame() is None and decoder.in_frame


def test_unknown_type_payload_is_skipped_not_stored() -> None:
    decoder = FrameDecoder(max_frame=1 << 20)
    decoder.receive_data(HEADER.pack(900_000, 9, 0x77, 0x5A))
    for _ in range(90):
        decoder.receive_data(b"u" * 10_000)
        assert decoder._body is None
        assert decoder._end - decoder._start <= 10_000
    decoder.receive_data(encode_frame(0, FrameType.PING, 0, b"p"))
    assert frames_of(decoder) == [Frame(9, 0x77, 0x5A, b""), Frame(0, FrameType.PING, 0, b"p")]


def test_flags_and_stream_are_kept_as_sent() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(0xFFFF_FFFF, FrameType.STDERR, 0xFF, b""))
    (frame,) = frames_of(decoder)
    assert (frame.stream, frame.flags, frame.end) == (0xFFFF_FFFF, 0xFF, True)


def test_eof_then_more_data_is_misuse() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"\0\0")
    decoder.receive_data(b"")
    assert decoder.eof and decoder.in_frame
    with pytest.raises(UsageError):
        decoder.receive_data(b"x")


def test_buffer_updated_must_match_a_lent_buffer() -> None:
    decoder = FrameDecoder()
    with pytest.raises(UsageError):
        decoder.buffer_updated(1)
    buf = decoder.get_buffer()
    with pytest.raises(UsageError):
        decoder.buffer_updated(len(buf) + 1)
    buf = decoder.get_buffer()
    buf[:10] = HEADER.pack(0, 1, FrameType.CLOSE, 0)
    decoder.buffer_updated(10)
    with pytest.raises(UsageError):  # that buffer was committed already
        decoder.buffer_updated(1)
    assert frames_of(decoder) == [Frame(1, FrameType.CLOSE)]


def test_bad_limits_are_usage_errors() -> None:
    for kwargs in ({"max_frame": -1}, {"max_control": 2**32}, {"max_frame": True}):
        with pytest.raises(UsageError):
            FrameDecoder(**kwargs)


def test_frame_parts_does_not_copy_the_payload() -> None:
    payload = memoryview(b"abcdef")[2:]
    header, body = frame_parts(3, FrameType.STDOUT, FLAG_END, payload)
    assert body is payload
    assert header == HEADER.pack(4, 3, FrameType.STDOUT, FLAG_END)


@pytest.mark.parametrize(
    ("stream", "type", "flags"), [(-1, 1, 0), (2**32, 1, 0), (1, 256, 0), (1, 1, -1)]
)
def test_encoder_refuses_fields_that_do_not_fit(stream: int, type: int, flags: int) -> None:
    with pytest.raises(UsageError):
        encode_frame(stream, type, flags)


def test_encode_json_is_compact_utf8() -> None:
    frame = encode_json(1, FrameType.STARTED, {"pid": 7, "é": "ü"})
    assert frame[HEADER.size :] == '{"pid":7,"é":"ü"}'.encode()
    for bad in ({"x": float("nan")}, {"x": object()}, {"x": "\udc80"}):
        with pytest.raises(UsageError):
            encode_json(1, FrameType.EXIT, bad)


def test_encode_window() -> None:
    assert encode_window(5, Channel.STDERR, 65536) == bytes.fromhex(
        "00000005 00000005 20 00 02 00010000"
    )
    with pytest.raises(UsageError):
        encode_window(5, Channel.STDIN, 2**31)
    with pytest.raises(UsageError):
        encode_window(5, Channel.STDIN, -1)


def test_control_limit_default() -> None:
    decoder = FrameDecoder()
    assert decoder.max_control == MAX_CONTROL == 65536
    decoder.receive_data(struct.pack(">IIBB", MAX_CONTROL, 0, FrameType.PONG, 0))
    assert decoder.in_frame
    with pytest.raises(ProtocolError):
        FrameDecoder().receive_data(struct.pack(">IIBB", MAX_CONTROL + 1, 0, FrameType.PONG, 0))

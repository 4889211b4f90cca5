"""The worked hex examples of docs/protocol.md ("Wire protocol v2") are what the encoders produce.

Each example in the page is a fenced ``hex`` block after a marker line
``<!-- v2-example: NAME -->``; text after ``#`` on a line is a comment. The
bytes come from a host session and an agent session talking to each other,
so the page cannot drift from the code. ``python -m tests.protocol.test_v2_docs``
prints every block, laid out, for pasting into the page.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from vsock_async import CommandResult
from vsock_async.protocol import encode_command, encode_result
from vsock_async.protocol.v2 import (
    HEADER,
    AgentLimits,
    AgentSession,
    Channel,
    CommitRequested,
    ExecRequested,
    Exited,
    FileRequested,
    FileResult,
    FrameType,
    HostSession,
    Output,
    Pong,
    RequestFailed,
    Started,
    StdinCredit,
    StdinData,
    StreamError,
    encode_frame,
    hello_answer,
    hello_command,
    parse_hello_answer,
    parse_hello_command,
)

PAGE = Path(__file__).parents[2] / "docs" / "protocol.md"
NONCE = "0123456789abcdef"
CAPABILITIES = ["exec", "pty", "signal", "resize", "ping", "files", "brief"]
MARKER = re.compile(r"<!-- v2-example: ([a-z0-9-]+) -->\n```hex\n(.*?)```", re.S)


def joined(chunks: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


def examples() -> dict[str, bytes]:
    """Every example of the page, produced by the sessions in order (and checked on the way)."""
    command = hello_command(NONCE, 1048576)
    request = parse_hello_command(command)
    assert request is not None
    answer = hello_answer(request, AgentLimits(), CAPABILITIES, "vsock_async/0.2.0")
    assert answer is not None
    agreed = parse_hello_answer(CommandResult(answer, b"", 0), NONCE)
    assert agreed is not None
    host, agent = HostSession(agreed), AgentSession(request)
    out = {"hello-command": encode_command(command), "hello-answer": encode_result(answer, b"", 0)}

    def to_agent(name: str) -> None:
        out[name] = joined(host.data_to_send())
        assert out[name], name
        agent.receive_data(out[name])

    def to_host(name: str) -> None:
        out[name] = joined(agent.data_to_send())
        assert out[name], name
        host.receive_data(out[name])

    # echo hi, from EXEC to EXIT.
    stream = host.open_exec({"argv": ["echo", "hi"]})
    to_agent("exec")
    agent.next_event()
    agent.started(stream, 4242)
    to_host("started")
    agent.send_output(stream, Channel.STDOUT, b"hi\n", end=True)
    to_host("stdout")
    agent.send_output(stream, Channel.STDERR, b"", end=True)
    to_host("stderr")
    agent.exited(stream, exit_code=0)
    to_host("exit")
    assert [host.next_event() for _ in range(4)] == [
        Started(1, 4242),
        Output(1, Channel.STDOUT, b"hi\n", True),
        Output(1, Channel.STDERR, b"", True),
        Exited(1, 0, None, False, False),
    ]

    # cat with stdin: credit comes back both ways.
    stream = host.open_exec({"argv": ["cat"], "stdin": True}, window=65536)
    to_agent("exec-cat")
    agent.next_event()
    agent.started(stream, 4243)
    to_host("started-cat")
    host.send_stdin(stream, b"hello\n")
    to_agent("stdin")
    agent.next_event()
    agent.stdin_consumed(stream, 6)
    to_host("window-stdin")
    agent.send_output(stream, Channel.STDOUT, b"hello\n")
    to_host("stdout-cat")
    host.grant(stream, Channel.STDOUT, 6)
    to_agent("window-stdout")
    host.send_stdin(stream, b"", end=True)
    to_agent("stdin-end")
    assert [host.next_event() for _ in range(3)] == [
        Started(3, 4243),
        StdinCredit(3, 6),
        Output(3, Channel.STDOUT, b"hello\n", False),
    ]

    # A frame of a type the agent does not know, and a PING.
    out["unknown-type"] = encode_frame(3, 0x7F, 0, b"\x01\x02")
    agent.receive_data(out["unknown-type"])
    to_host("unknown-type-error")
    assert host.next_event() == RequestFailed(
        3, 0x7F, "unknown_type", "frame type 127 is not known", None
    )
    host.ping(b"12345678")
    to_agent("ping")
    to_host("pong")
    assert host.next_event() == Pong(b"12345678")

    # A program that does not exist.
    stream = host.open_exec({"argv": ["nope"]})
    to_agent("exec-nope")
    agent.next_event()
    agent.exec_failed(stream, "spawn_failed", "nope: No such file or directory", "ENOENT")
    to_host("spawn-failed")
    assert host.next_event() == StreamError(
        5, "spawn_failed", "nope: No such file or directory", "ENOENT"
    )

    # A put of 6 bytes, then a get of them, then a stat of a file that is not there.
    # (Events above that nobody read: cat's end of input, and the EXEC of nope.)
    assert [type(agent.next_event()) for _ in range(2)] == [StdinData, ExecRequested]
    stream = host.open_file({"op": "put", "path": "/work/hi.txt", "mode": 420})
    to_agent("file-put")
    assert agent.next_event() == FileRequested(
        7, "put", {"op": "put", "path": "/work/hi.txt", "mode": 420}
    )
    host.send_stdin(stream, b"hello\n")
    to_agent("put-data")
    agent.next_event()
    agent.stdin_consumed(stream, 6)
    to_host("put-window")
    host.send_stdin(stream, b"", end=True)
    digest = hashlib.sha256(b"hello\n").hexdigest()
    host.send_commit(stream, digest)
    to_agent("put-commit")
    assert agent.next_event() == StdinData(7, b"", True)
    assert agent.next_event() == CommitRequested(7, digest)
    agent.file_done(stream, {"size": 6, "sha256": digest})
    to_host("put-result")
    assert [host.next_event() for _ in range(2)] == [
        StdinCredit(7, 6),
        FileResult(7, {"size": 6, "sha256": digest}),
    ]
    stream = host.open_file({"op": "get", "path": "/work/hi.txt"}, window=65536)
    to_agent("file-get")
    agent.next_event()
    agent.send_output(stream, Channel.STDOUT, b"hello\n", end=True)
    to_host("get-data")
    result = {"size": 6, "sha256": digest, "mode": 420, "mtime_ns": 1700000000000000000}
    agent.file_done(stream, result)
    to_host("get-result")
    assert [host.next_event() for _ in range(2)] == [
        Output(9, Channel.STDOUT, b"hello\n", True),
        FileResult(9, result),
    ]
    stream = host.open_file({"op": "stat", "path": "/nope"})
    to_agent("file-stat")
    agent.next_event()
    agent.file_failed(stream, "file_error", "No such file or directory", "ENOENT")
    to_host("stat-error")
    assert host.next_event() == StreamError(11, "file_error", "No such file or directory", "ENOENT")

    # echo hi again, as a brief stream: the output, then EXIT, in one write.
    stream = host.open_exec({"argv": ["echo", "hi"], "brief": True})
    to_agent("exec-brief")
    agent.next_event()
    agent.started(stream, 4244)
    agent.send_output(stream, Channel.STDOUT, b"hi\n", end=True)
    agent.send_output(stream, Channel.STDERR, b"", end=True)
    agent.exited(stream, exit_code=0)
    to_host("brief-answer")
    assert [host.next_event() for _ in range(3)] == [
        Output(13, Channel.STDOUT, b"hi\n", False),
        Exited(13, 0, None, False, False),
        None,
    ]
    return out


def page_examples() -> dict[str, bytes]:
    found = {}
    for name, block in MARKER.findall(PAGE.read_text()):
        text = " ".join(line.split("#", 1)[0] for line in block.splitlines())
        assert name not in found, f"example {name} appears twice"
        found[name] = bytes.fromhex(text)
    return found


def test_every_hex_example_in_the_page_is_what_the_code_sends() -> None:
    expected = examples()
    found = page_examples()
    assert sorted(found) == sorted(expected)
    for name, data in expected.items():
        assert found[name] == data, f"example {name!r} drifted; it is now:\n{render(name, data)}"


# -- laying the examples out -------------------------------------------------------------


def ascii_of(data: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in data)


def payload_lines(data: bytes, width: int = 16) -> list[str]:
    return [
        f"{data[i : i + width].hex(' '):<{3 * width - 1}}  # {ascii_of(data[i : i + width])}"
        for i in range(0, len(data), width)
    ]


def render(name: str, data: bytes) -> str:
    """Annotated hex: v1 fields for the hello, one header line per v2 frame then its payload."""
    lines: list[str] = []
    if name == "hello-command":
        lines.append(f"{data[:4].hex(' '):<47}  # v1 command length {len(data) - 4}")
        lines += payload_lines(data[4:])
    elif name == "hello-answer":
        size = int.from_bytes(data[:4], "big")
        lines.append(f"{data[:4].hex(' '):<47}  # v1 stdout length {size}")
        lines += payload_lines(data[4 : 4 + size])
        lines.append(f"{data[4 + size : 8 + size].hex(' '):<47}  # v1 stderr length 0")
        lines.append(f"{data[8 + size :].hex(' '):<47}  # exit code 0")
    else:
        pos = 0
        while pos < len(data):
            length, stream, type, flags = HEADER.unpack_from(data, pos)
            name_of = FrameType(type).name if type in set(FrameType) else f"{type:#04x}"
            header = data[pos : pos + HEADER.size]
            lines.append(
                f"{header.hex(' '):<47}  # length {length}, stream {stream}, {name_of},"
                f" flags {flags:#04x}"
            )
            payload = data[pos + HEADER.size : pos + HEADER.size + length]
            if type == FrameType.WINDOW:
                channel, increment = payload[0], int.from_bytes(payload[1:], "big")
                lines.append(
                    f"{payload.hex(' '):<47}  # channel {channel} ({Channel(channel).name}),"
                    f" increment {increment}"
                )
            else:
                lines += payload_lines(payload)
            pos += HEADER.size + length
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for name, data in examples().items():
        print(f"<!-- v2-example: {name} -->\n```hex\n{render(name, data)}```\n")

"""The messages of the streaming exec, with no event loop: the request both ways, the data
and control messages, the frames of the plain HTTP stream, and what is refused."""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest

from vsock_async.errors import ProtocolError, UsageError
from vsock_async.serve.exec_stream import (
    CONTROL,
    EOF,
    FRAME_HEADER,
    STDIN,
    STDOUT,
    ExecRequest,
    ExitStatus,
    Resize,
    SendSignal,
    Started,
    StreamError,
    data_message,
    error_message,
    frame,
    parse_client_message,
    parse_request,
    parse_server_message,
    parse_signal,
    split_data_message,
)
from vsock_async.timeouts import DEFAULT


def test_a_full_request_round_trips_through_json() -> None:
    request = ExecRequest(
        ("ls", "-l", "/"),
        env={"LANG": "C"},
        cwd="/tmp",
        user="nobody",
        tty=(24, 80),
        stdin=True,
        stderr="stdout",
        timeout=None,
    )
    text = json.dumps(request.to_json())
    assert json.loads(text) == {
        "command": ["ls", "-l", "/"],
        "env": {"LANG": "C"},
        "cwd": "/tmp",
        "user": "nobody",
        "tty": {"rows": 24, "cols": 80},
        "stdin": True,
        "stderr": "stdout",
        "timeout": None,
    }
    assert parse_request(text) == request
    assert request.merges_stderr


def test_a_minimal_request_leaves_the_defaults_out() -> None:
    request = ExecRequest("echo hi")
    assert request.to_json() == {"command": "echo hi"}
    parsed = parse_request('{"command": "echo hi"}')
    assert parsed == request
    assert parsed.timeout is DEFAULT and parsed.stdin is False and parsed.tty is None
    assert parsed.stderr is None and not parsed.merges_stderr


def test_stderr_is_merged_when_asked_and_always_with_a_tty() -> None:
    assert parse_request('{"command": "x", "stderr": "stdout"}').merges_stderr
    assert not parse_request('{"command": "x", "stderr": "pipe"}').merges_stderr
    assert parse_request('{"command": "x", "tty": {"rows": 2, "cols": 3}}').merges_stderr


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("[1]", "JSON object"),
        ("{", "not valid JSON"),
        ('{"command": "x", "timeout": NaN}', "not valid JSON"),
        ("{}", "command must be"),
        ('{"command": ""}', "command must be"),
        ('{"command": []}', "command must be"),
        ('{"command": ["ls", 1]}', "command must be"),
        ('{"command": "x", "shell": true}', "unknown field(s) shell"),
        ('{"command": "x", "env": {"A": 1}}', "env must be"),
        ('{"command": "x", "env": ["A=1"]}', "env must be"),
        ('{"command": "x", "cwd": 3}', "cwd must be"),
        ('{"command": "x", "user": true}', "user must be"),
        ('{"command": "x", "tty": {"rows": 0, "cols": 80}}', "terminal rows"),
        ('{"command": "x", "tty": {"rows": 24}}', "tty must be"),
        ('{"command": "x", "tty": true}', "tty must be"),
        ('{"command": "x", "stdin": 1}', "stdin must be"),
        ('{"command": "x", "stderr": "null"}', "stderr must be"),
        ('{"command": "x", "stderr": true}', "stderr must be"),
        ('{"command": "x", "stderr": "pipe", "tty": {"rows": 2, "cols": 3}}', "a tty merges"),
        ('{"command": "x", "timeout": -1}', "timeout must be"),
        ('{"command": "x", "timeout": "5"}', "timeout must be"),
    ],
)
def test_a_bad_request_is_refused_with_what_is_wrong(body: str, says: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_request(body)
    assert says in str(caught.value)


def test_data_messages_carry_their_channel_byte() -> None:
    message = data_message(STDOUT, b"out\x00put")
    assert message == b"\x01out\x00put"
    channel, data = split_data_message(message)
    assert (channel, bytes(data)) == (STDOUT, b"out\x00put")
    assert split_data_message(b"\x00") == (STDIN, memoryview(b""))
    with pytest.raises(UsageError, match="channel byte"):
        split_data_message(b"")


def test_http_frames_are_channel_length_payload() -> None:
    encoded = frame(CONTROL, b'{"type": "exit"}')
    channel, length = FRAME_HEADER.unpack_from(encoded)
    assert (channel, length) == (CONTROL, 16)
    assert encoded[FRAME_HEADER.size :] == b'{"type": "exit"}'
    assert frame(STDOUT, b"") == b"\x01\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("message", "parsed"),
    [
        (Resize(50, 132), Resize(50, 132)),
        (SendSignal(2), SendSignal(2)),
        (EOF, EOF),
    ],
)
def test_client_messages_round_trip(message: Any, parsed: Any) -> None:
    assert parse_client_message(json.dumps(message.to_json())) == parsed


def test_signals_by_number_or_name() -> None:
    assert parse_signal(15) == signal.SIGTERM
    assert parse_signal("SIGINT") == signal.SIGINT
    assert parse_signal("hup") == signal.SIGHUP
    assert parse_client_message('{"type": "signal", "signal": "KILL"}') == SendSignal(9)
    for bad in (0, 65, True, "SIGNOPE", 2.0, None):
        with pytest.raises(UsageError, match="a signal is"):
            parse_signal(bad)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"type": "resize", "rows": 24}', "takes cols, rows"),
        ('{"type": "resize", "rows": 24, "cols": 70000}', "terminal cols"),
        ('{"type": "eof", "now": true}', "takes no other field"),
        ('{"type": "kill"}', "unknown message type 'kill'"),
        ('{"signal": 2}', 'with a "type"'),
        ("[]", 'with a "type"'),
        ("nope", "not valid JSON"),
    ],
)
def test_bad_client_messages_are_refused(text: str, says: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_client_message(text)
    assert says in str(caught.value)


def test_server_messages_round_trip() -> None:
    status = ExitStatus(130, 2, timed_out=False, output_incomplete=True, duration=1.5)
    assert parse_server_message(json.dumps(status.to_json())) == status
    assert parse_server_message(json.dumps(Started(42).to_json())) == Started(42)
    body = error_message("spawn_failed", "no such program", 422, errno="ENOENT")
    error = parse_server_message(json.dumps(body).encode())
    assert isinstance(error, StreamError)
    assert (error.status, error.code, error.message, error.body["errno"]) == (
        422,
        "spawn_failed",
        "no such program",
        "ENOENT",
    )


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "exit", "exit_code": "0", "exit_signal": null, "timed_out": false,'
        ' "output_incomplete": false, "duration": 0}',
        '{"type": "exit"}',
        '{"type": "started", "pid": "1"}',
        '{"type": "error", "error": "boom"}',
        '{"type": "error", "error": {"code": "internal", "message": "x"}}',
        '{"type": "hello"}',
        "garbage",
    ],
)
def test_a_bad_server_message_is_a_protocol_error(text: str) -> None:
    with pytest.raises(ProtocolError, match="bad exec message"):
        parse_server_message(text)

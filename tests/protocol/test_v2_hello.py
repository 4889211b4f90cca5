"""The v2 hello without an event loop: the command, the agent's parse, the answer, the host's."""

from __future__ import annotations

import json
import re

import pytest

from vsock_async import CommandResult, UsageError
from vsock_async.protocol import PROBE_COMMAND
from vsock_async.protocol.v2 import (
    HELLO_PREFIX,
    AgentLimits,
    HelloAnswer,
    HelloRequest,
    hello_answer,
    hello_answer_problem,
    hello_command,
    new_nonce,
    parse_hello_answer,
    parse_hello_command,
)

NONCE = "0123456789abcdef"
CAPS = ["exec", "pty", "signal", "resize", "ping"]


def answer_for(nonce: str = NONCE, **fields: object) -> CommandResult:
    obj: dict[str, object] = {"version": 2, "nonce": nonce, "agent": "a/1", "capabilities": CAPS}
    obj.update(fields)
    return CommandResult(b"vsock_async.hello " + json.dumps(obj).encode() + b"\n", b"", 0)


def test_hello_command_bytes() -> None:
    assert hello_command(NONCE, 1048576) == (
        b": vsock_async.hello versions=2 nonce=0123456789abcdef max_frame=1048576"
    )
    assert hello_command(NONCE, 5, versions=(2, 3)).endswith(
        b"versions=2,3 nonce=" + NONCE.encode() + b" max_frame=5"
    )


def test_hello_command_is_a_shell_no_op_in_a_safe_alphabet() -> None:
    command = hello_command(new_nonce(), 4096)
    assert command.startswith(b": ")
    assert re.fullmatch(rb":[A-Za-z0-9=,._ -]+", command)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nonce": "0123456789ABCDEF"},
        {"nonce": "0123"},
        {"nonce": "0123456789abcdeg"},
        {"max_frame": 0},
        {"max_frame": 2**32},
        {"versions": ()},
        {"versions": (1,)},
        {"versions": (True,)},
    ],
)
def test_hello_command_refuses_bad_arguments(kwargs: dict[str, object]) -> None:
    arguments: dict[str, object] = {"nonce": NONCE, "max_frame": 1024} | kwargs
    with pytest.raises(UsageError):
        hello_command(**arguments)  # type: ignore[arg-type]


def test_new_nonce_is_fresh_lowercase_hex() -> None:
    nonces = {new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(re.fullmatch("[0-9a-f]{16}", n) for n in nonces)


def test_parse_round_trip() -> None:
    assert parse_hello_command(hello_command(NONCE, 777, (2, 5))) == HelloRequest(
        (2, 5), NONCE, 777
    )


@pytest.mark.parametrize(
    "command",
    [
        b": vsock_async.hello versions=2 nonce=0123456789abcdef max_frame=10 future=x,y.z-1_",
        b": vsock_async.hello nonce=0123456789abcdef future= versions=2 max_frame=10",
    ],
)
def test_unknown_tokens_and_any_order_are_accepted(command: bytes) -> None:
    assert parse_hello_command(command) == HelloRequest((2,), NONCE, 10)


def test_max_frame_defaults_when_absent() -> None:
    request = parse_hello_command(b": vsock_async.hello versions=2 nonce=" + NONCE.encode())
    assert request == HelloRequest((2,), NONCE, 1048576)


@pytest.mark.parametrize(
    "command",
    [
        PROBE_COMMAND,
        b"",
        b"echo hi",
        b": vsock_async.hello",  # no space, no tokens
        b": vsock_async.hello ",
        b" : vsock_async.hello versions=2 nonce=0123456789abcdef",
        b":  vsock_async.hello versions=2 nonce=0123456789abcdef",
        b": vsock_async.hellox versions=2 nonce=0123456789abcdef",
        b": vsock_async.hello versions=2",  # no nonce
        b": vsock_async.hello nonce=0123456789abcdef",  # no versions
        b": vsock_async.hello versions=2 nonce=0123456789ABCDEF",
        b": vsock_async.hello versions=2 nonce=0123456789abcde",
        b": vsock_async.hello versions=2 nonce=0123456789abcdef0",
        b": vsock_async.hello versions=2  nonce=0123456789abcdef",  # empty token
        b": vsock_async.hello versions=2 nonce=0123456789abcdef ",
        b": vsock_async.hello versions=2 nonce=0123456789abcdef flag",  # not key=value
        b": vsock_async.hello versions=2 nonce=0123456789abcdef =x",
        b": vsock_async.hello versions=2 versions=3 nonce=0123456789abcdef",
        b": vsock_async.hello versions=2; nonce=0123456789abcdef",
        b": vsock_async.hello versions=2 nonce=0123456789abcdef x=$(reboot)",
        b": vsock_async.hello versions=2 nonce=0123456789abcdef\n",
        b": vsock_async.hello versions=2, nonce=0123456789abcdef",
        b": vsock_async.hello versions=-2 nonce=0123456789abcdef",
        b": vsock_async.hello versions=99999999999 nonce=0123456789abcdef",
        b": vsock_async.hello versions=2 nonce=0123456789abcdef max_frame=0",
        b": vsock_async.hello versions=2 nonce=0123456789abcdef max_frame=4294967296",
        b": vsock_async.hello versions=2 nonce=0123456789abcdef max_frame=",
        ": vsock_async.hello versions=2 nonce=0123456789abcdef x=é".encode(),
    ],
)
def test_anything_out_of_shape_is_not_a_hello(command: bytes) -> None:
    assert parse_hello_command(command) is None


def test_answer_bytes_and_round_trip() -> None:
    request = HelloRequest((2,), NONCE, 1024)
    limits = AgentLimits(max_streams=8)
    stdout = hello_answer(request, limits, ["exec", "ping"], "vsock_async/0.2.0")
    assert stdout == (
        b'vsock_async.hello {"version":2,"nonce":"0123456789abcdef","agent":"vsock_async/0.2.0",'
        b'"limits":{"max_frame":1048576,"max_control":65536,"max_streams":8,'
        b'"stdin_window":262144,"max_argv_bytes":1048576,"max_files":16,"file_window":4194304},'
        b'"capabilities":["exec","ping"]}\n'
    )
    result = CommandResult(stdout, b"", 0)
    assert parse_hello_answer(result, NONCE) == HelloAnswer(
        2, limits, frozenset({"exec", "ping"}), "vsock_async/0.2.0"
    )
    assert hello_answer_problem(result, NONCE) is None


def test_agent_picks_the_highest_shared_version_or_stays_v1() -> None:
    limits = AgentLimits()
    assert hello_answer(HelloRequest((3, 2, 9), NONCE), limits, [], "a") is not None
    assert hello_answer(HelloRequest((3, 9), NONCE), limits, [], "a") is None


def test_a_v1_guest_is_not_a_problem() -> None:
    v1 = CommandResult(b"", b"", 0)
    assert parse_hello_answer(v1, NONCE) is None
    assert hello_answer_problem(v1, NONCE) is None


def test_unknown_fields_and_missing_limits_are_tolerated() -> None:
    answer = parse_hello_answer(
        answer_for(limits={"max_streams": 3, "future": [1]}, future={"x": 1}), NONCE
    )
    assert answer is not None
    assert answer.limits == AgentLimits(max_streams=3)
    minimal = parse_hello_answer(
        CommandResult(
            b'vsock_async.hello {"version":2,"nonce":"' + NONCE.encode() + b'"}\n', b"", 0
        ),
        NONCE,
    )
    assert minimal == HelloAnswer(2, AgentLimits(), frozenset(), "")


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (CommandResult(b"", b"", 1), "exit code 1"),
        (CommandResult(b"", b"sh: 1: :: not found\n", 0), "stderr"),
        (CommandResult(b"Welcome to the guest!\n", b"", 0), "is not"),
        (answer_for(nonce="fedcba9876543210"), "nonce"),
        (answer_for(version=3), "version"),
        (answer_for(version="2"), "version"),
        (answer_for(version=2.0), "version"),
        (answer_for(version=True), "version"),
        (answer_for(limits=[]), "limits"),
        (answer_for(limits={"max_frame": 0}), "out of range"),
        (answer_for(limits={"max_streams": "64"}), "out of range"),
        (answer_for(limits={"max_control": 1024}), "out of range"),
        (answer_for(capabilities="exec"), "capabilities"),
        (answer_for(capabilities=[1]), "capabilities"),
        (answer_for(agent=7), "agent"),
        (CommandResult(b"vsock_async.hello {\n", b"", 0), "JSON"),
        (CommandResult(b"vsock_async.hello {}", b"", 0), "is not"),  # no newline
        (CommandResult(b"vsock_async.hello [2]\n", b"", 0), "is not"),
        (CommandResult(b'vsock_async.hello {"version":NaN}\n', b"", 0), "JSON"),
        (CommandResult(b"vsock_async.hello {\xff}\n", b"", 0), "JSON"),
        (CommandResult(b"vsock_async.hello {" + b" " * 70000 + b"}\n", b"", 0), "exceeds"),
        (CommandResult(b"x" * 10, b"", None, timed_out=True), "exit code None"),
    ],
)
def test_anything_else_stays_v1_with_a_reason(result: CommandResult, reason: str) -> None:
    assert parse_hello_answer(result, NONCE) is None
    problem = hello_answer_problem(result, NONCE)
    assert problem is not None and reason in problem


def test_a_deeply_nested_answer_is_a_problem_not_a_crash() -> None:
    stdout = b'vsock_async.hello {"x":' + b"[" * 30_000 + b"]" * 30_000 + b"}\n"
    result = CommandResult(stdout, b"", 0)
    assert parse_hello_answer(result, NONCE) is None
    assert "JSON" in (hello_answer_problem(result, NONCE) or "")


def test_agent_limits_are_checked() -> None:
    for bad in (
        {"max_frame": 0},
        {"stdin_window": 2**31},
        {"max_streams": 0},
        {"max_argv_bytes": -1},
        {"max_files": 0},
        {"file_window": 0},
        {"file_window": 2**31},
    ):
        with pytest.raises(UsageError):
            AgentLimits(**bad)


def test_prefix_constant() -> None:
    assert HELLO_PREFIX == b": vsock_async.hello "

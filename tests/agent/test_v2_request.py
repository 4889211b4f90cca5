"""EXEC requests as the v2 agent reads them: every field checked before anything starts."""

from __future__ import annotations

import base64
import os
import pwd
from typing import Any

import pytest

from vsock_async.agent.request import DEFAULT_KILL_GRACE, Refused, parse_exec


def parse(request: dict[str, Any], **kw: Any) -> Any:
    options = {"max_argv_bytes": 1 << 20, "can_switch_user": True, "can_pty": True} | kw
    return parse_exec(request, **options)


def refused(request: dict[str, Any], **kw: Any) -> Refused:
    with pytest.raises(Refused) as info:
        parse(request, **kw)
    return info.value


def test_defaults_and_unknown_fields_ignored() -> None:
    spec = parse({"argv": ["ls", "-l"], "future_field": {"x": 1}})
    assert spec.argv == (b"ls", b"-l")
    assert spec.command is None
    assert (spec.stdin, spec.stderr, spec.pty, spec.timeout) == (False, "pipe", None, None)
    assert spec.kill_grace == DEFAULT_KILL_GRACE
    assert (spec.env, spec.cwd, spec.user) == ({}, None, None)


def test_every_field() -> None:
    spec = parse(
        {
            "command": "echo $HOME",
            "env": {"K": "v", "B": {"b64": base64.b64encode(b"\xff\x01").decode()}},
            "cwd": "/tmp",
            "stdin": True,
            "stderr": "stdout",
            "pty": {"rows": 24, "cols": 80},
            "timeout": 1.5,
            "kill_grace": 0,
        }
    )
    assert spec.command == b"echo $HOME"
    assert spec.env == {b"K": b"v", b"B": b"\xff\x01"}
    assert (spec.cwd, spec.stdin, spec.stderr, spec.pty) == (b"/tmp", True, "stdout", (24, 80))
    assert (spec.timeout, spec.kill_grace) == (1.5, 0.0)


def test_b64_strings_carry_any_bytes() -> None:
    raw = b"\x80not utf-8"
    spec = parse({"argv": [{"b64": base64.b64encode(raw).decode()}]})
    assert spec.argv == (raw,)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({}, "exactly one of argv and command"),
        ({"argv": ["a"], "command": "b"}, "exactly one of argv and command"),
        ({"argv": []}, "argv must be a non-empty list"),
        ({"argv": "ls"}, "argv must be a non-empty list"),
        ({"argv": [1]}, "argv[0] must be a string"),
        ({"argv": ["a\0b"]}, "argv[0] holds a NUL byte"),
        ({"argv": [{"b64": "%%%"}]}, "argv[0].b64 is not valid base64"),
        ({"argv": ["\udc80"]}, "argv[0] is not valid UTF-8"),
        ({"command": "x", "env": ["K=v"]}, "env must be an object"),
        ({"command": "x", "env": {"A=B": "v"}}, "is empty or holds '='"),
        ({"command": "x", "env": {"": "v"}}, "is empty or holds '='"),
        ({"command": "x", "env": {"K": 1}}, "env['K'] must be a string"),
        ({"command": "x", "cwd": 5}, "cwd must be a string"),
        ({"command": "x", "stdin": 1}, "stdin must be true or false"),
        ({"command": "x", "stderr": "file"}, "stderr must be"),
        ({"command": "x", "pty": [24, 80]}, "pty must be null or"),
        ({"command": "x", "pty": {"rows": 24}}, "pty.cols must be an integer"),
        ({"command": "x", "pty": {"rows": True, "cols": 1}}, "pty.rows must be an integer"),
        ({"command": "x", "pty": {"rows": 70000, "cols": 1}}, "pty.rows must be in 0..65535"),
        ({"command": "x", "timeout": -1}, "timeout must be"),
        ({"command": "x", "timeout": "5"}, "timeout must be"),
        ({"command": "x", "kill_grace": None}, "kill_grace must be a number"),
        ({"command": "x", "user": 1.5}, "user must be a name or a uid"),
        ({"command": "x", "user": "no-such-user-here"}, "there is no user 'no-such-user-here'"),
    ],
)
def test_bad_requests_name_the_field(request_: dict[str, Any], field: str) -> None:
    error = refused(request_)
    assert error.code == "bad_request"
    assert field in error.message


def test_size_limit_counts_argv_command_and_env() -> None:
    assert parse({"argv": ["a" * 50]}, max_argv_bytes=51).argv == (b"a" * 50,)
    error = refused({"argv": ["a" * 50]}, max_argv_bytes=50)
    assert error.code == "limit"
    assert "51 bytes, more than the agent's limit of 50" in error.message
    assert refused({"command": "x", "env": {"K": "v" * 100}}, max_argv_bytes=100).code == "limit"


def test_pty_without_the_capability_is_unsupported() -> None:
    assert refused({"command": "x", "pty": {"rows": 1, "cols": 1}}, can_pty=False).code == (
        "unsupported"
    )


def test_user_switch_needs_root_and_resolves_names_and_uids() -> None:
    error = refused({"command": "x", "user": "nobody"}, can_switch_user=False)
    assert error.code == "permission"
    assert "does not run as root" in error.message
    nobody = pwd.getpwnam("nobody")
    for value in ("nobody", nobody.pw_uid, str(nobody.pw_uid)):
        user = parse({"command": "x", "user": value}).user
        assert (user.uid, user.gid, user.name) == (nobody.pw_uid, nobody.pw_gid, "nobody")
        assert user.groups == tuple(os.getgrouplist("nobody", nobody.pw_gid))
    unknown = parse({"command": "x", "user": 4_000_123}).user
    assert unknown is not None
    assert (unknown.uid, unknown.gid, unknown.groups, unknown.name) == (4_000_123,) * 2 + ((), None)

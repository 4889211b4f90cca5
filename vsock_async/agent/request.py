"""What an EXEC request asks for, checked field by field before anything is started.

The host is untrusted input: every field is checked for type, range and size here,
and a request that fails is refused with an ERROR code (``bad_request``, ``limit``,
``unsupported``, ``permission``) naming the field; nothing is spawned for it.
Standard library only.
"""

from __future__ import annotations

import base64
import binascii
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ..errors import UsageError
from ..protocol.v2_frames import MAX_CREDIT
from ..protocol.v2_session import DEFAULT_WINDOW
from ..timeouts import check_timeout

__all__ = ["DEFAULT_KILL_GRACE", "ExecSpec", "Refused", "User", "byte_string", "parse_exec"]

DEFAULT_KILL_GRACE: Final = 5.0
_STDERR_MODES: Final = frozenset({"pipe", "stdout", "null"})
_WINSIZE_MAX: Final = 0xFFFF  # struct winsize holds unsigned shorts


class Refused(Exception):
    """A request the agent will not carry out: the ERROR frame's code and message."""

    def __init__(self, code: str, message: str, errno: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.errno = errno


@dataclass(frozen=True, slots=True)
class User:
    """Whom a process runs as: ids for the kernel, names for its environment."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str | None
    home: str | None


@dataclass(frozen=True, slots=True)
class ExecSpec:
    """One process to start, as the host asked for it (validated)."""

    argv: tuple[bytes, ...] | None
    """Exec'd directly (PATH lookup), or None when ``command`` is given."""
    command: bytes | None
    """Run by the agent's shell with ``-c`` semantics, or None when ``argv`` is given."""
    env: Mapping[bytes, bytes]
    """Variables set over the agent's environment."""
    cwd: bytes | None
    user: User | None
    stdin: bool
    """True: a pipe fed by STDIN frames; False: /dev/null."""
    stderr: str
    """"pipe", "stdout" (merged into stdout) or "null"."""
    pty: tuple[int, int] | None
    """(rows, cols) of a terminal that is stdin, stdout and stderr, or None."""
    timeout: float | None
    kill_grace: float
    window: int = DEFAULT_WINDOW
    """The stream's initial STDOUT and STDERR credit (the protocol core checked it)."""


def parse_exec(
    request: Mapping[str, Any],
    *,
    max_argv_bytes: int,
    can_switch_user: bool,
    can_pty: bool,
) -> ExecSpec:
    """The :class:`ExecSpec` for an EXEC payload, or :class:`Refused` saying what is wrong.

    Unknown fields are ignored (the protocol evolves by adding fields).
    """
    argv_field, command_field = request.get("argv"), request.get("command")
    if (argv_field is None) == (command_field is None):
        raise Refused("bad_request", "an EXEC request needs exactly one of argv and command")
    argv: tuple[bytes, ...] | None = None
    command: bytes | None = None
    if argv_field is not None:
        if not isinstance(argv_field, list) or not argv_field:
            raise Refused("bad_request", "argv must be a non-empty list of strings")
        argv = tuple(byte_string(item, f"argv[{i}]") for i, item in enumerate(argv_field))
        size = sum(len(item) + 1 for item in argv)
    else:
        command = byte_string(command_field, "command")
        size = len(command) + 1
    env = _env(request.get("env"))
    size += sum(len(key) + len(value) + 2 for key, value in env.items())
    if size > max_argv_bytes:
        raise Refused(
            "limit",
            f"argv, command and env take {size} bytes, more than the agent's limit of"
            f" {max_argv_bytes} (max_argv_bytes)",
        )
    cwd = request.get("cwd")
    pty = _pty(request.get("pty"))
    if pty is not None and not can_pty:
        raise Refused("unsupported", "this guest cannot open a pseudo-terminal (no pty capability)")
    user = request.get("user")
    return ExecSpec(
        argv=argv,
        command=command,
        env=env,
        cwd=None if cwd is None else byte_string(cwd, "cwd"),
        user=None if user is None else _user(user, can_switch_user),
        stdin=_flag(request.get("stdin", False), "stdin"),
        stderr=_stderr(request.get("stderr", "pipe")),
        pty=pty,
        timeout=_seconds(request.get("timeout"), "timeout", allow_none=True),
        kill_grace=_seconds(request.get("kill_grace", DEFAULT_KILL_GRACE), "kill_grace"),
        window=_window(request.get("window", DEFAULT_WINDOW)),
    )


def _window(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CREDIT:
        raise Refused("bad_request", f"window must be an integer in 0..{MAX_CREDIT}, not {value!r}")
    return value


def byte_string(value: Any, what: str) -> bytes:
    """A byte string field: a JSON string (UTF-8) or ``{"b64": ...}`` for any bytes; no NUL."""
    if isinstance(value, str):
        try:
            data = value.encode()
        except UnicodeEncodeError:  # a lone surrogate from a \\udXXX escape
            raise Refused("bad_request", f"{what} is not valid UTF-8; send it as b64") from None
    elif isinstance(value, dict) and isinstance(value.get("b64"), str):
        try:
            data = base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise Refused("bad_request", f"{what}.b64 is not valid base64") from None
    else:
        raise Refused("bad_request", f'{what} must be a string or {{"b64": string}}')
    if b"\0" in data:
        raise Refused("bad_request", f"{what} holds a NUL byte, which a process cannot be given")
    return data


def _env(value: Any) -> dict[bytes, bytes]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Refused("bad_request", "env must be an object of strings")
    env: dict[bytes, bytes] = {}
    for key, item in value.items():
        name = byte_string(key, "an env name")
        if not name or b"=" in name:
            raise Refused("bad_request", f"env name {key!r} is empty or holds '='")
        env[name] = byte_string(item, f"env[{key!r}]")
    return env


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise Refused("bad_request", f"{what} must be true or false, not {value!r}")
    return value


def _stderr(value: Any) -> str:
    if value not in _STDERR_MODES:
        raise Refused("bad_request", f'stderr must be "pipe", "stdout" or "null", not {value!r}')
    assert isinstance(value, str)
    return value


def _pty(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Refused("bad_request", 'pty must be null or {"rows": int, "cols": int}')
    size = []
    for key in ("rows", "cols"):
        number = value.get(key)
        if isinstance(number, bool) or not isinstance(number, int):
            raise Refused("bad_request", f"pty.{key} must be an integer, not {number!r}")
        if not 0 <= number <= _WINSIZE_MAX:
            raise Refused("bad_request", f"pty.{key} must be in 0..{_WINSIZE_MAX}, not {number}")
        size.append(number)
    return size[0], size[1]


def _seconds(value: Any, what: str, *, allow_none: bool = False) -> Any:
    if value is None and not allow_none:
        raise Refused("bad_request", f"{what} must be a number of seconds >= 0, not null")
    try:
        return check_timeout(value, what)
    except UsageError as exc:
        raise Refused("bad_request", str(exc)) from None


def _user(value: Any, can_switch_user: bool) -> User:
    """Look a user up by name or uid; refused unless the agent runs as root."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise Refused("bad_request", f"user must be a name or a uid, not {value!r}")
    if not can_switch_user:
        raise Refused(
            "permission",
            f"cannot run a process as user {value!r}: the agent does not run as root",
        )
    entry: pwd.struct_passwd | None = None
    if isinstance(value, str):
        try:
            entry = pwd.getpwnam(value)
        except (KeyError, ValueError):
            if not value.isascii() or not value.isdigit():
                raise Refused("bad_request", f"there is no user {value!r} in the guest") from None
            value = int(value)
    if entry is None:
        assert isinstance(value, int)
        if not 0 <= value <= 0xFFFF_FFFE:
            raise Refused("bad_request", f"uid {value} is out of range")
        try:
            entry = pwd.getpwuid(value)
        except KeyError:
            # A uid with no passwd entry (an image without the user): its own gid, no groups.
            return User(uid=value, gid=value, groups=(), name=None, home=None)
    return User(
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)),
        name=entry.pw_name,
        home=entry.pw_dir,
    )

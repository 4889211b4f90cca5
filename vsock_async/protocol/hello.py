"""The v2 hello, sans I/O: how a host and an agent agree on v2 inside one ordinary v1 exchange.

The host sends the v1 command ``: vsock_async.hello versions=2 nonce=<16 hex>
max_frame=<n>``, which a v1 shell runs as the no-op ``:`` (exit 0, no
output: the connection stays v1). A v2 agent recognises the exact prefix
before any shell runs and answers, in a v1 result, ``vsock_async.hello `` +
a JSON object echoing the nonce + ``\\n``. Only that answer with the right
nonce switches a connection to v2. Import these names from
:mod:`vsock_async.protocol.v2`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final

from ..errors import ProtocolError, UsageError
from ..results import CommandResult
from .limits import U32_MAX, MiB
from .v2_frames import DEFAULT_MAX_FRAME, MAX_CONTROL, MAX_CREDIT, decode_json, json_payload

__all__ = [
    "HELLO_PREFIX",
    "MAX_HELLO_ANSWER",
    "VERSIONS",
    "AgentLimits",
    "HelloAnswer",
    "HelloRequest",
    "hello_answer",
    "hello_answer_problem",
    "hello_command",
    "new_nonce",
    "parse_hello_answer",
    "parse_hello_command",
]

HELLO_PREFIX: Final = b": vsock_async.hello "
"""What every hello command starts with; an agent matches it before any shell runs."""

ANSWER_PREFIX: Final = b"vsock_async.hello "
MAX_HELLO_ANSWER: Final = 64 * 1024
"""The largest hello answer (stdout) a host accepts."""

VERSIONS: Final = (2,)
"""The protocol versions this library speaks besides v1."""

_TOKENS = re.compile(rb"[A-Za-z0-9=,._ -]+")
_NONCE = re.compile(r"[0-9a-f]{16}")
_NUMBER = re.compile(rb"[0-9]{1,10}")


@dataclass(frozen=True, slots=True)
class AgentLimits:
    """What an agent accepts on one v2 connection, announced in its hello answer."""

    max_frame: int = DEFAULT_MAX_FRAME
    """Largest payload of a frame it receives (STDIN, EXEC, unknown types)."""
    max_control: int = MAX_CONTROL
    """Largest payload of its other control frames; at least 64 KiB."""
    max_streams: int = 64
    """Process streams open at once on one connection."""
    stdin_window: int = 256 * 1024
    """Initial STDIN credit of each stream."""
    max_argv_bytes: int = 1 * MiB
    """Total bytes of argv, command and env of one EXEC."""
    max_files: int = 16
    """File streams open at once on one connection (they count as streams too)."""
    file_window: int = 4 * MiB
    """Initial STDIN credit of each put: the file bytes it holds at most before writing them."""

    def __post_init__(self) -> None:
        ranges = {
            "max_frame": (1, U32_MAX),
            "max_control": (MAX_CONTROL, U32_MAX),
            "max_streams": (1, U32_MAX),
            "stdin_window": (0, MAX_CREDIT),
            "max_argv_bytes": (0, U32_MAX),
            "max_files": (1, U32_MAX),
            "file_window": (1, MAX_CREDIT),
        }
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UsageError(
                    f"AgentLimits.{name} must be an int in {low}..{high}, not {value!r}"
                )


@dataclass(frozen=True, slots=True)
class HelloRequest:
    """A host's hello, as the agent parsed it."""

    versions: tuple[int, ...]
    nonce: str
    max_frame: int = DEFAULT_MAX_FRAME
    """Largest payload of a frame the host receives (STDOUT, STDERR)."""


@dataclass(frozen=True, slots=True)
class HelloAnswer:
    """An agent's hello answer, as the host parsed it: the connection now speaks ``version``."""

    version: int
    limits: AgentLimits
    capabilities: frozenset[str]
    agent: str


def new_nonce() -> str:
    """A fresh nonce for one hello: 64 random bits as 16 lowercase hex digits."""
    return secrets.token_hex(8)


def _check_versions(versions: Sequence[int]) -> None:
    if not versions or any(
        isinstance(v, bool) or not isinstance(v, int) or not 2 <= v < 10**9 for v in versions
    ):
        raise UsageError(f"versions must be a non-empty list of ints >= 2, not {versions!r}")


def hello_command(
    nonce: str, max_frame: int = DEFAULT_MAX_FRAME, versions: Sequence[int] = VERSIONS
) -> bytes:
    """The v1 command text of a host's hello (frame it with ``encode_command``)."""
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise UsageError(f"a hello nonce is 16 lowercase hex digits, not {nonce!r}")
    if (
        isinstance(max_frame, bool)
        or not isinstance(max_frame, int)
        or not 1 <= max_frame <= U32_MAX
    ):
        raise UsageError(f"max_frame must be an int in 1..{U32_MAX}, not {max_frame!r}")
    _check_versions(versions)
    listed = ",".join(str(v) for v in versions)
    return HELLO_PREFIX + f"versions={listed} nonce={nonce} max_frame={max_frame}".encode()


def parse_hello_command(command: bytes) -> HelloRequest | None:
    """The hello in ``command``, or None when it is any other command (run it as v1).

    Unknown ``key=value`` tokens are ignored; anything else out of shape (a
    character outside ``[A-Za-z0-9=,._ -]``, a token that is not ``key=value``,
    a repeated key, a missing ``versions`` or ``nonce``, a nonce that is not 16
    lowercase hex digits) makes it not a hello.
    """
    if not command.startswith(HELLO_PREFIX):
        return None
    rest = command[len(HELLO_PREFIX) :]
    if not _TOKENS.fullmatch(rest):
        return None
    tokens: dict[bytes, bytes] = {}
    for token in rest.split(b" "):
        key, equals, value = token.partition(b"=")
        if not key or not equals or key in tokens:
            return None
        tokens[key] = value
    nonce = tokens.get(b"nonce", b"").decode()
    listed = tokens.get(b"versions")
    max_frame = tokens.get(b"max_frame", str(DEFAULT_MAX_FRAME).encode())
    if not _NONCE.fullmatch(nonce) or listed is None or not _NUMBER.fullmatch(max_frame):
        return None
    numbers = listed.split(b",")
    if not all(_NUMBER.fullmatch(n) for n in numbers):
        return None
    frame = int(max_frame)
    if not 1 <= frame <= U32_MAX:
        return None
    return HelloRequest(tuple(int(n) for n in numbers), nonce, frame)


def hello_answer(
    request: HelloRequest, limits: AgentLimits, capabilities: Iterable[str], agent: str
) -> bytes | None:
    """An agent's answer (the stdout of an exit-0 v1 result), or None when no version is shared.

    None means: answer exactly as ``:`` does (exit 0, empty output) and stay on v1.
    """
    shared = [v for v in request.versions if v in VERSIONS]
    if not shared:
        return None
    answer = {
        "version": max(shared),
        "nonce": request.nonce,
        "agent": agent,
        "limits": {f.name: getattr(limits, f.name) for f in fields(AgentLimits)},
        "capabilities": list(capabilities),
    }
    stdout = ANSWER_PREFIX + json_payload(answer) + b"\n"
    if len(stdout) > MAX_HELLO_ANSWER:
        raise UsageError(f"a hello answer of {len(stdout)} bytes exceeds {MAX_HELLO_ANSWER}")
    return stdout


def parse_hello_answer(
    result: CommandResult, nonce: str, versions: Sequence[int] = VERSIONS
) -> HelloAnswer | None:
    """The agent's answer to the hello sent with ``nonce``, or None: stay on v1.

    Never raises for what a guest sent. None covers both a plain v1 guest
    (exit 0, empty output) and an answer that is not a valid hello;
    :func:`hello_answer_problem` tells them apart.
    """
    answer = _examine(result, nonce, versions)
    return answer if isinstance(answer, HelloAnswer) else None


def hello_answer_problem(
    result: CommandResult, nonce: str, versions: Sequence[int] = VERSIONS
) -> str | None:
    """Why ``result`` is not a valid hello answer, or None when it is one or a v1 guest's.

    A v1 guest answers exit 0 with empty output: stay on v1 quietly. Any
    other answer that does not switch to v2 (a banner, a wrong nonce, bad
    JSON) deserves a warning, or a ``ProtocolError`` when v2 is required.
    """
    answer = _examine(result, nonce, versions)
    return answer if isinstance(answer, str) else None


def _examine(
    result: CommandResult, nonce: str, versions: Sequence[int]
) -> HelloAnswer | str | None:
    """The answer, the reason it is not one, or None for a plain v1 guest."""
    stdout, stderr = result.stdout, result.stderr
    if result.exit_code == 0 and not stdout and not stderr:
        return None
    if result.exit_code != 0:
        return f"the hello came back with exit code {result.exit_code}, not 0"
    if stderr:
        return f"the hello answer wrote to stderr: {stderr[:100]!r}"
    if not stdout.startswith(ANSWER_PREFIX + b"{") or not stdout.endswith(b"\n"):
        return f"the hello answer is not 'vsock_async.hello {{...}}\\n': {stdout[:100]!r}"
    if len(stdout) > MAX_HELLO_ANSWER:
        return f"the hello answer of {len(stdout)} bytes exceeds {MAX_HELLO_ANSWER}"
    try:
        obj = decode_json(stdout[len(ANSWER_PREFIX) : -1], "the hello answer")
        return _answer_from_json(obj, nonce, versions)
    except ProtocolError as exc:
        return str(exc)


def _answer_from_json(obj: dict[str, Any], nonce: str, versions: Sequence[int]) -> HelloAnswer:
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in versions:
        raise ProtocolError(
            f"the hello answer's version {version!r} is not one of {list(versions)}"
        )
    if obj.get("nonce") != nonce:
        raise ProtocolError("the hello answer does not echo this connection's nonce")
    limits = obj.get("limits", {})
    capabilities = obj.get("capabilities", [])
    agent = obj.get("agent", "")
    if not isinstance(limits, dict):
        raise ProtocolError(f"the hello answer's limits are not an object: {limits!r}")
    if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
        raise ProtocolError(f"the hello answer's capabilities are not strings: {capabilities!r}")
    if not isinstance(agent, str):
        raise ProtocolError(f"the hello answer's agent is not a string: {agent!r}")
    known = {f.name for f in fields(AgentLimits)}
    try:
        parsed = AgentLimits(**{k: v for k, v in limits.items() if k in known})
    except UsageError as exc:
        raise ProtocolError(f"the hello answer's limits are out of range: {exc}") from None
    return HelloAnswer(version, parsed, frozenset(capabilities), agent)

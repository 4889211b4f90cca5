"""The messages of ``serve``'s streaming exec (``/v1/guests/{key}/exec``), standard library only.

No I/O and no event loop. The control API that serves an exec and
the clients that speak to it share these, so the request, the data and
control messages of the WebSocket and the frames of the plain HTTP stream
are built and read in one place. docs/control-api.md ("Streaming exec")
describes them for people.

- Data travels as bytes with a one-byte channel in front: ``0`` stdin
  (client to daemon), ``1`` stdout, ``2`` stderr (daemon to client).
- Everything else is a JSON object with a ``"type"``: the request (the
  first message), ``resize``, ``signal`` and ``eof`` from the client;
  ``started``, ``exit`` and ``error`` from the daemon.
- The plain HTTP stream carries the same things as frames: a channel byte,
  a 4-byte big-endian length, the payload; channel ``3`` holds a control
  message as JSON text.
"""

from __future__ import annotations

import json
import signal
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from ..errors import ProtocolError, UsageError
from ..host.process import check_terminal_size
from ..timeouts import DEFAULT, Timeout, check_timeout

__all__ = [
    "CONTROL",
    "EOF",
    "FRAME_HEADER",
    "REQUEST_FIELDS",
    "STDERR",
    "STDIN",
    "STDOUT",
    "STREAM_TYPE",
    "ClientMessage",
    "ExecRequest",
    "ExitStatus",
    "Resize",
    "SendSignal",
    "Started",
    "StreamError",
    "data_message",
    "error_message",
    "frame",
    "parse_client_message",
    "parse_request",
    "parse_server_message",
    "parse_signal",
    "split_data_message",
]

STDIN: Final = 0
STDOUT: Final = 1
STDERR: Final = 2
CONTROL: Final = 3
"""The channel of a control message in the plain HTTP stream (JSON text)."""

STREAM_TYPE: Final = "application/vnd.vsock-async.exec-stream"
"""The media type of the plain HTTP stream: frames of channel, length, payload."""
FRAME_HEADER: Final = struct.Struct(">BI")
"""A frame of the plain HTTP stream starts with its channel (u8) and payload length (u32 BE)."""

_MAX_SIGNAL: Final = 64
REQUEST_FIELDS: Final = frozenset(
    {"command", "env", "cwd", "user", "tty", "stdin", "stderr", "timeout"}
)
_STDERR_MODES: Final = ("pipe", "stdout")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _terminal_size(value: object, what: str) -> tuple[int, int]:
    if not isinstance(value, Mapping) or set(value) != {"rows", "cols"}:
        raise UsageError(f'{what} must be {{"rows": R, "cols": C}}, not {value!r}')
    rows, cols = value["rows"], value["cols"]
    check_terminal_size(rows, cols)
    return rows, cols


def parse_signal(value: object) -> int:
    """A signal given as a number (``2``) or a name (``"SIGINT"``, ``"INT"``); UsageError else."""
    if _is_int(value):
        assert isinstance(value, int)
        if 0 < value <= _MAX_SIGNAL:
            return value
    elif isinstance(value, str):
        name = value.upper()
        try:
            return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
        except KeyError:
            pass
    raise UsageError(f"a signal is a number in 1..{_MAX_SIGNAL} or a name (SIGINT), not {value!r}")


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """What to run and how: the body of ``POST .../exec``, the first message of its WebSocket."""

    command: str | tuple[str, ...]
    """A shell command line (run by the guest's ``/bin/sh -c``), or argv executed directly."""
    env: Mapping[str, str] | None = None
    """Added to (or overriding) the agent's environment."""
    cwd: str | None = None
    user: str | int | None = None
    """A user name or uid (the guest's agent must run as root)."""
    tty: tuple[int, int] | None = None
    """``(rows, cols)``: a terminal in the guest; stderr arrives merged into stdout."""
    stdin: bool = False
    """Whether the client sends stdin (else the process gets ``/dev/null``)."""
    stderr: Literal["pipe", "stdout"] | None = None
    """``"stdout"``: merged into stdout, in the order written; ``"pipe"``: on its own channel.
    None: ``"pipe"``, or merged with a ``tty`` (which allows nothing else)."""
    timeout: Timeout = DEFAULT
    """The whole exec's deadline, waiting for a free stream included (what is left is the
    process's life limit): seconds, None for none, DEFAULT for the daemon's."""

    @property
    def merges_stderr(self) -> bool:
        """True when stderr arrives on stdout's channel (``"stdout"``, or a ``tty``)."""
        return self.stderr == "stdout" or self.tty is not None

    def to_json(self) -> dict[str, Any]:
        """The request as a JSON object, fields left at their default left out."""
        body: dict[str, Any] = {
            "command": self.command if isinstance(self.command, str) else list(self.command)
        }
        if self.env is not None:
            body["env"] = dict(self.env)
        if self.cwd is not None:
            body["cwd"] = self.cwd
        if self.user is not None:
            body["user"] = self.user
        if self.tty is not None:
            body["tty"] = {"rows": self.tty[0], "cols": self.tty[1]}
        if self.stdin:
            body["stdin"] = True
        if self.stderr is not None:
            body["stderr"] = self.stderr
        if self.timeout is not DEFAULT:
            body["timeout"] = self.timeout
        return body

    @classmethod
    def from_json(cls, body: object) -> ExecRequest:
        """Check a decoded JSON request; :class:`UsageError` says what is wrong with it."""
        if not isinstance(body, dict):
            raise UsageError("the exec request must be a JSON object")
        unknown = sorted(set(body) - REQUEST_FIELDS)
        if unknown:
            raise UsageError(
                f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(REQUEST_FIELDS))}"
            )
        command = body.get("command")
        if isinstance(command, list) and command and all(isinstance(a, str) for a in command):
            program: str | tuple[str, ...] = tuple(command)
        elif isinstance(command, str) and command:
            program = command
        else:
            raise UsageError(
                "command must be a non-empty string (a shell command line) or a non-empty"
                " list of strings (argv, executed directly)"
            )
        env = body.get("env")
        if env is not None and not (
            isinstance(env, dict) and all(isinstance(v, str) for v in env.values())
        ):
            raise UsageError("env must be an object of strings")
        cwd = body.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise UsageError(f"cwd must be a string, not {cwd!r}")
        user = body.get("user")
        if user is not None and not (isinstance(user, str) or _is_int(user)):
            raise UsageError(f"user must be a name or a uid, not {user!r}")
        tty = body.get("tty")
        stdin = body.get("stdin", False)
        if not isinstance(stdin, bool):
            raise UsageError(f"stdin must be true or false, not {stdin!r}")
        stderr = body.get("stderr")
        if stderr is not None and stderr not in _STDERR_MODES:
            raise UsageError(f'stderr must be "pipe" or "stdout", not {stderr!r}')
        if stderr == "pipe" and tty is not None:
            raise UsageError('a tty merges stderr into stdout: leave stderr out, or "stdout"')
        return cls(
            program,
            env=env,
            cwd=cwd,
            user=user,
            tty=None if tty is None else _terminal_size(tty, "tty"),
            stdin=stdin,
            stderr=stderr,
            timeout=check_timeout(body["timeout"]) if "timeout" in body else DEFAULT,
        )


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_request(text: str | bytes) -> ExecRequest:
    """The request in the first WebSocket message (JSON text); UsageError for a bad one."""
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise UsageError(f"the exec request is not valid JSON: {exc}") from None
    return ExecRequest.from_json(body)


# -- data ------------------------------------------------------------------------------------


def data_message(channel: int, data: bytes | memoryview) -> bytes:
    """A binary WebSocket message: the channel byte, then the bytes."""
    return bytes((channel,)) + data


def split_data_message(message: bytes) -> tuple[int, memoryview]:
    """The channel and the bytes of a binary WebSocket message; UsageError if it has none."""
    if not message:
        raise UsageError("a binary message must start with its channel byte")
    return message[0], memoryview(message)[1:]


def frame(channel: int, payload: bytes | memoryview) -> bytes:
    """One frame of the plain HTTP stream: header and payload in one buffer."""
    return FRAME_HEADER.pack(channel, len(payload)) + payload


# -- control messages --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resize:
    """``{"type": "resize", "rows": R, "cols": C}``: the terminal's new size."""

    rows: int
    cols: int

    def to_json(self) -> dict[str, Any]:
        return {"type": "resize", "rows": self.rows, "cols": self.cols}


@dataclass(frozen=True, slots=True)
class SendSignal:
    """``{"type": "signal", "signal": N}``: deliver signal N to the process group."""

    signal: int

    def to_json(self) -> dict[str, Any]:
        return {"type": "signal", "signal": self.signal}


@dataclass(frozen=True, slots=True)
class _Eof:
    """``{"type": "eof"}``: the end of stdin."""

    def to_json(self) -> dict[str, Any]:
        return {"type": "eof"}


EOF: Final = _Eof()

ClientMessage = Resize | SendSignal | _Eof


def _fields(message: Mapping[str, Any], names: set[str]) -> None:
    given = set(message) - {"type"}
    if given != names:
        expected = ", ".join(sorted(names)) or "no other field"
        raise UsageError(f"a {message['type']!r} message takes {expected}, not {sorted(given)}")


def _object(text: str | bytes) -> dict[str, Any]:
    try:
        message = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise UsageError(f"a control message is not valid JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise UsageError('a control message is a JSON object with a "type"')
    return message


def parse_client_message(text: str | bytes) -> ClientMessage:
    """A control message from the client (after the request); UsageError for a bad one."""
    message = _object(text)
    kind = message["type"]
    if kind == "resize":
        _fields(message, {"rows", "cols"})
        rows, cols = _terminal_size({"rows": message["rows"], "cols": message["cols"]}, "resize")
        return Resize(rows, cols)
    if kind == "signal":
        _fields(message, {"signal"})
        return SendSignal(parse_signal(message["signal"]))
    if kind == "eof":
        _fields(message, set())
        return EOF
    raise UsageError(f"unknown message type {kind!r}; known: resize, signal, eof")


@dataclass(frozen=True, slots=True)
class Started:
    """``{"type": "started", "pid": N}``: the process runs in the guest as pid N."""

    pid: int | None

    def to_json(self) -> dict[str, Any]:
        return {"type": "started", "pid": self.pid}


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """``{"type": "exit", ...}``: how the process ended; the last message of a stream."""

    exit_code: int
    """The exit code as a shell reports it: 128+N when signal N killed the process."""
    exit_signal: int | None = None
    """The signal that killed it, or None."""
    timed_out: bool = False
    """Its ``timeout`` ran out and the agent stopped it."""
    output_incomplete: bool = False
    """A background child held its output open when it exited, and was killed."""
    duration: float = 0.0
    """Seconds from the request to the exit."""

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "exit",
            "exit_code": self.exit_code,
            "exit_signal": self.exit_signal,
            "timed_out": self.timed_out,
            "output_incomplete": self.output_incomplete,
            "duration": self.duration,
        }


@dataclass(frozen=True, slots=True)
class StreamError:
    """``{"type": "error", "status": S, "error": {"code", "message"}, ...}``: the stream ended
    in failure.

    ``code`` is one of the control API's stable error codes and ``status`` the
    HTTP status it always comes with; ``body`` is the whole message, its extra
    fields (``reason`` and ``errno`` of ``spawn_failed``) included.
    """

    status: int
    code: str
    message: str
    body: Mapping[str, Any]


def error_message(code: str, message: str, status: int, **extra: Any) -> dict[str, Any]:
    """The JSON of an ``error`` message: the control API's error body, with a type and the
    HTTP status of its code."""
    return {"type": "error", "status": status, "error": {"code": code, "message": message}, **extra}


def parse_server_message(text: str | bytes) -> Started | ExitStatus | StreamError:
    """A control message from the daemon; :class:`ProtocolError` for one that is not."""
    try:
        message = _object(text)
        kind = message["type"]
        if kind == "started":
            pid = message["pid"]
            if pid is not None and not _is_int(pid):
                raise TypeError("pid")
            return Started(pid)
        if kind == "exit":
            code, signum = message["exit_code"], message["exit_signal"]
            if not _is_int(code) or not (signum is None or _is_int(signum)):
                raise TypeError("exit_code or exit_signal")
            return ExitStatus(
                code,
                signum,
                timed_out=bool(message["timed_out"]),
                output_incomplete=bool(message["output_incomplete"]),
                duration=float(message["duration"]),
            )
        if kind == "error":
            error, status = message["error"], message["status"]
            if not _is_int(status):
                raise TypeError("status")
            return StreamError(status, str(error["code"]), str(error["message"]), message)
        raise TypeError(f"type {kind!r}")
    except (UsageError, KeyError, TypeError, ValueError) as exc:
        shown = text[:200] if isinstance(text, str) else text[:200].decode(errors="replace")
        raise ProtocolError(f"the daemon sent a bad exec message ({exc}): {shown!r}") from None

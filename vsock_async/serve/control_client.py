"""A small client library of ``serve``'s control API, standard library only (``http.client``).

``exec``, ``guests`` and ``demo`` use it; so can any script that has no
aiohttp. It speaks HTTP/1.1 over the daemon's Unix socket (or TCP with a
bearer token) and asks for the raw result form of ``run``, so output of
any size and content arrives without base64.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..addresses import TcpAddress, UnixAddress, parse_address
from ..errors import ConnectFailed, ProtocolError, UsageError, VsockAsyncError
from ..timeouts import DEFAULT, Timeout, check_timeout
from .defaults import (
    CONTROL_ENV,
    RAW_RESULT_TYPE,
    TOKEN_FILE_ENV,
    default_control_address,
    default_control_path,
    read_token_file,
)

__all__ = [
    "CONTROL_ENV",
    "RAW_RESULT_TYPE",
    "TOKEN_FILE_ENV",
    "ControlClient",
    "ControlError",
    "Reply",
    "RunOutcome",
    "decode_raw_result",
    "default_control_address",
    "default_control_path",
    "read_token_file",
]

_U32 = struct.Struct(">I")


class ControlError(VsockAsyncError):
    """The control API answered with an error: its HTTP status, stable code and JSON body."""

    def __init__(self, status: int, code: str, message: str, body: Mapping[str, Any]) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})")
        self.status = status
        self.code = code
        self.message = message
        self.body = dict(body)


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer: status, headers (names in lower case) and body."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """A finished command as the daemon reported it (see ``vsock_async.CommandResult``)."""

    stdout: bytes
    stderr: bytes
    exit_code: int
    duration: float
    exit_signal: int | None = None
    """The signal that killed the command, when the guest says so (never on protocol v1)."""
    stdout_truncated: bool = False
    """The agent cut stdout at its ``--max-output``."""
    stderr_truncated: bool = False
    """The agent cut stderr at its ``--max-output``."""


def decode_raw_result(body: bytes) -> tuple[bytes, bytes, int]:
    """Split a raw run result (a v1 result frame) into stdout, stderr and exit code."""
    try:
        (n_out,) = _U32.unpack_from(body, 0)
        stdout = body[4 : 4 + n_out]
        (n_err,) = _U32.unpack_from(body, 4 + n_out)
        start = 8 + n_out
        stderr = body[start : start + n_err]
        if len(stdout) != n_out or len(stderr) != n_err or len(body) != start + n_err + 1:
            raise struct.error("lengths do not add up")
    except struct.error as exc:
        raise ProtocolError(f"the daemon sent a malformed raw result ({exc})") from None
    return stdout, stderr, body[-1]


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    """Calls on ``serve``'s control API at ``address`` (``unix:PATH`` or ``tcp://HOST:PORT``).

    Each call opens its own connection, so one client may be shared by threads.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        text = address or default_control_address()
        parsed = parse_address(text)
        if not isinstance(parsed, UnixAddress | TcpAddress):
            raise UsageError(f"the control API is at unix:PATH or tcp://HOST:PORT, not {text!r}")
        self.address = parsed
        self.token = token
        self.timeout = timeout

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if isinstance(self.address, UnixAddress):
            return _UnixHTTPConnection(self.address.path, timeout)
        return http.client.HTTPConnection(self.address.host, self.address.port, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        accept: str = "application/json",
        wait_forever: bool = False,
    ) -> Reply:
        """One HTTP exchange; ControlError for an error status, ConnectFailed if unreachable.

        ``body`` is sent as JSON (``bytes`` as they are).
        ``wait_forever`` lifts the client's timeout (for a run: the daemon's deadline applies).
        """
        headers = {"Accept": accept}
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = self._connection(None if wait_forever else self.timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ConnectFailed(
                f"cannot reach the control API at {self.address}: {exc.strerror}"
                " (is `vsock-async serve` running? see --control)"
            ) from None
        except PermissionError as exc:
            raise ConnectFailed(
                f"cannot reach the control API at {self.address}: {exc.strerror}"
                " (its socket is mode 0600: run as the daemon's user)"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectFailed(f"control API at {self.address}: {exc}") from None
        finally:
            conn.close()
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, payload)
        if reply.status >= 400:
            raise _error_from(reply)
        return reply

    def get_json(self, path: str) -> Any:
        """GET ``path`` and decode its JSON."""
        return json.loads(self.request("GET", path).body)

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``."""
        result: dict[str, Any] = self.get_json("/v1/health")
        return result

    def guests(self) -> list[dict[str, Any]]:
        """``GET /v1/guests``: every connected guest."""
        result: list[dict[str, Any]] = self.get_json("/v1/guests")["guests"]
        return result

    def guest(self, key: str, *, wait: float | None = None) -> dict[str, Any]:
        """``GET /v1/guests/{key}``; with ``wait``, the daemon waits that long for it to connect."""
        query = "" if wait is None else f"?wait={wait}"
        reply = self.request("GET", f"{_guest_path(key)}{query}", wait_forever=wait is not None)
        result: dict[str, Any] = json.loads(reply.body)
        return result

    def run(
        self,
        key: str,
        command: str | list[str],
        *,
        timeout: Timeout = DEFAULT,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> RunOutcome:
        """``POST /v1/guests/{key}/run`` in raw form; ``timeout=DEFAULT``: the daemon's.

        ``timeout`` follows :mod:`vsock_async.timeouts` (``None``: no deadline).
        A timeout raises ControlError with code ``command_timeout``; its body
        holds the partial output (base64).
        """
        request: dict[str, Any] = {"command": command, "wait": wait}
        if timeout is not DEFAULT:
            request["timeout"] = check_timeout(timeout)
        if cwd is not None:
            request["cwd"] = cwd
        if env is not None:
            request["env"] = dict(env)
        reply = self.request(
            "POST", f"{_guest_path(key)}/run", request, accept=RAW_RESULT_TYPE, wait_forever=True
        )
        content_type = reply.headers.get("content-type", "")
        if not content_type.startswith(RAW_RESULT_TYPE):
            raise ProtocolError(f"the daemon answered {content_type!r} to a raw run request")
        stdout, stderr, exit_code = decode_raw_result(reply.body)
        headers = reply.headers
        signal = headers.get("vsock-async-exit-signal")
        return RunOutcome(
            stdout,
            stderr,
            exit_code,
            duration=float(headers.get("vsock-async-duration", "0")),
            exit_signal=int(signal) if signal is not None else None,
            stdout_truncated=headers.get("vsock-async-stdout-truncated") == "1",
            stderr_truncated=headers.get("vsock-async-stderr-truncated") == "1",
        )

    def probe(self, key: str) -> dict[str, Any]:
        """``POST /v1/guests/{key}/probe``."""
        result: dict[str, Any] = json.loads(self.request("POST", f"{_guest_path(key)}/probe").body)
        return result

    def drop(self, key: str) -> dict[str, Any]:
        """``DELETE /v1/guests/{key}``: close the guest's connections."""
        result: dict[str, Any] = json.loads(self.request("DELETE", _guest_path(key)).body)
        return result

    def metrics(self) -> str:
        """``GET /metrics``, the Prometheus text."""
        return self.request("GET", "/metrics", accept="text/plain").body.decode()


def _guest_path(key: str) -> str:
    return "/v1/guests/" + urllib.parse.quote(str(key), safe="")


def _error_from(reply: Reply) -> ControlError:
    try:
        body = json.loads(reply.body)
        error = body["error"]
        return ControlError(reply.status, str(error["code"]), str(error["message"]), body)
    except (ValueError, KeyError, TypeError):
        text = reply.body.decode(errors="replace").strip()[:200]
        return ControlError(reply.status, "http_error", text or f"HTTP {reply.status}", {})

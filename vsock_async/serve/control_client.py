"""A small client library of ``serve``'s control API, standard library only (``http.client``).

``exec``, ``guests`` and ``demo`` use it; so can any script that has no
aiohttp. It speaks HTTP/1.1 over the daemon's Unix socket (or TCP with a
bearer token) and asks for the raw result form of ``run``, so output of
any size and content arrives without base64.

Each call is a :class:`Call`: what to send and how to read the answer,
with no I/O. :class:`ControlClient` sends it with ``http.client``;
:class:`AsyncControlClient` (aiohttp, imported from here only when asked
for) sends the same calls, so the two never differ in what they ask or how
they read it, and adds streaming processes over the exec WebSocket.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import struct
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

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

if TYPE_CHECKING:
    from .async_client import AsyncControlClient, RemoteProcess

__all__ = [
    "CONTROL_ENV",
    "CUT_SHORT",
    "RAW_RESULT_TYPE",
    "TOKEN_FILE_ENV",
    "AsyncControlClient",
    "Call",
    "ControlClient",
    "ControlError",
    "RemoteProcess",
    "Reply",
    "RunOutcome",
    "auth_headers",
    "control_address",
    "decode_raw_result",
    "default_control_address",
    "default_control_path",
    "error_from",
    "file_query",
    "get_file_url",
    "guest_path",
    "put_file_url",
    "read_token_file",
    "unreachable",
]

_U32 = struct.Struct(">I")
_ASYNC_NAMES = frozenset({"AsyncControlClient", "RemoteProcess"})
T = TypeVar("T")


def __getattr__(name: str) -> Any:
    """The aiohttp client, imported on first use: this module stays standard library only."""
    if name in _ASYNC_NAMES:
        from . import async_client

        return getattr(async_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One exchange with the control API, without I/O: what to send, how to read the answer.

    ``body`` is sent as JSON (``bytes`` as they are); ``wait_forever`` lifts the
    client's timeout (for a run, the daemon's deadline applies); ``parse`` turns
    a successful :class:`Reply` into the call's result.
    """

    method: str
    path: str
    parse: Callable[[Reply], T]
    body: object = None
    accept: str = "application/json"
    wait_forever: bool = False

    def data(self) -> bytes | None:
        """The request body."""
        if self.body is None:
            return None
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()

    def headers(self, token: str | None) -> dict[str, str]:
        """The request headers, the bearer token's included."""
        headers = {"Accept": self.accept, **auth_headers(token)}
        if self.body is not None:
            headers["Content-Type"] = "application/json"
        return headers

    # -- the calls ---------------------------------------------------------------------------

    @staticmethod
    def health() -> Call[dict[str, Any]]:
        """``GET /v1/health``."""
        return Call("GET", "/v1/health", _json)

    @staticmethod
    def guests() -> Call[list[dict[str, Any]]]:
        """``GET /v1/guests``: every connected guest."""
        return Call("GET", "/v1/guests", lambda reply: _json(reply)["guests"])

    @staticmethod
    def guest(key: str, *, wait: float | None = None) -> Call[dict[str, Any]]:
        """``GET /v1/guests/{key}``; with ``wait``, the daemon waits that long for it."""
        query = "" if wait is None else f"?wait={wait}"
        return Call("GET", f"{guest_path(key)}{query}", _json, wait_forever=wait is not None)

    @staticmethod
    def run(
        key: str,
        command: str | list[str],
        *,
        timeout: Timeout = DEFAULT,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> Call[RunOutcome]:
        """``POST /v1/guests/{key}/run``, asking for the raw result form."""
        request: dict[str, Any] = {"command": command, "wait": wait}
        if timeout is not DEFAULT:
            request["timeout"] = check_timeout(timeout)
        if cwd is not None:
            request["cwd"] = cwd
        if env is not None:
            request["env"] = dict(env)
        return Call(
            "POST",
            f"{guest_path(key)}/run",
            _run_outcome,
            request,
            accept=RAW_RESULT_TYPE,
            wait_forever=True,
        )

    @staticmethod
    def probe(key: str) -> Call[dict[str, Any]]:
        """``POST /v1/guests/{key}/probe``."""
        return Call("POST", f"{guest_path(key)}/probe", _json)

    @staticmethod
    def drop(key: str) -> Call[dict[str, Any]]:
        """``DELETE /v1/guests/{key}``: close the guest's connections."""
        return Call("DELETE", guest_path(key), _json)

    @staticmethod
    def stat_file(key: str, path: str | bytes, *, follow_symlinks: bool = True) -> Call[Any]:
        """``GET /v1/guests/{key}/files/stat``: what the guest knows of ``path``."""
        query = file_query(path, follow_symlinks="true" if follow_symlinks else "false")
        return Call("GET", f"{guest_path(key)}/files/stat?{query}", _json)

    @staticmethod
    def list_files(key: str, path: str | bytes) -> Call[list[dict[str, Any]]]:
        """``GET /v1/guests/{key}/files/list``: the entries of a guest directory."""
        return Call(
            "GET",
            f"{guest_path(key)}/files/list?{file_query(path)}",
            lambda reply: _json(reply)["entries"],
        )

    @staticmethod
    def remove_file(key: str, path: str | bytes, *, recursive: bool = False) -> Call[Any]:
        """``DELETE /v1/guests/{key}/files``: a file, link or directory (``recursive``: a tree)."""
        query = file_query(path, recursive="true" if recursive else "false")
        return Call("DELETE", f"{guest_path(key)}/files?{query}", _json)

    @staticmethod
    def make_directory(
        key: str,
        path: str | bytes,
        *,
        parents: bool = False,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
    ) -> Call[Any]:
        """``POST /v1/guests/{key}/files/mkdir``."""
        extra = _settings(mode=mode, uid=uid, gid=gid)
        query = file_query(path, parents="true" if parents else "false", **extra)
        return Call("POST", f"{guest_path(key)}/files/mkdir?{query}", _json)

    @staticmethod
    def make_symlink(
        key: str,
        target: str | bytes,
        path: str | bytes,
        *,
        uid: int | None = None,
        gid: int | None = None,
    ) -> Call[Any]:
        """``POST /v1/guests/{key}/files/symlink``: ``path`` becomes a link to ``target``."""
        query = file_query(path, **_settings(uid=uid, gid=gid))
        query += "&" + file_query(target, name="target")
        return Call("POST", f"{guest_path(key)}/files/symlink?{query}", _json)

    @staticmethod
    def set_attributes(
        key: str, path: str | bytes, *, mode: int | None = None, mtime: float | None = None
    ) -> Call[Any]:
        """``POST /v1/guests/{key}/files/attributes``: exactly ``mode`` and/or ``mtime``."""
        query = file_query(path, **_settings(mode=mode, mtime=mtime))
        return Call("POST", f"{guest_path(key)}/files/attributes?{query}", _json)

    @staticmethod
    def metrics() -> Call[str]:
        """``GET /metrics``, the Prometheus text."""
        return Call("GET", "/metrics", lambda reply: reply.body.decode(), accept="text/plain")


def file_query(path: str | bytes, *, name: str = "path", **params: str) -> str:
    """The query naming a guest path: ``name=`` for text, ``name_b64=`` for bytes not UTF-8."""
    raw = os.fsencode(path)
    try:
        fields = {name: raw.decode()}
    except UnicodeDecodeError:
        fields = {f"{name}_b64": base64.b64encode(raw).decode("ascii")}
    return urllib.parse.urlencode({**fields, **params})


def put_file_url(
    key: str, path: str | bytes, *, mode: int | None, mtime: float | None, make_parents: bool
) -> str:
    """The URL of ``PUT /v1/guests/{key}/files`` for these settings."""
    params = {"make_parents": "true" if make_parents else "false"}
    params.update(_settings(mode=mode, mtime=mtime))
    return f"{guest_path(key)}/files?{file_query(path, **params)}"


def _settings(
    *,
    mode: int | None = None,
    mtime: float | None = None,
    uid: int | None = None,
    gid: int | None = None,
) -> dict[str, str]:
    """The query parameters of the file settings given: ``mode`` in octal, ``mtime`` in
    seconds, ``uid``/``gid`` in decimal."""
    params = {}
    if mode is not None:
        params["mode"] = f"{mode:o}"
    if mtime is not None:
        params["mtime"] = repr(mtime)
    if uid is not None:
        params["uid"] = str(uid)
    if gid is not None:
        params["gid"] = str(gid)
    return params


def get_file_url(key: str, path: str | bytes) -> str:
    """The URL of ``GET /v1/guests/{key}/files`` for the guest file ``path``."""
    return f"{guest_path(key)}/files?{file_query(path)}"


CUT_SHORT = (
    "the daemon cut the file short after {} bytes: the transfer failed in the guest or the"
    " daemon (its log says why)"
)
"""The ProtocolError of a file body that ended before its end, with the bytes received."""


def auth_headers(token: str | None) -> dict[str, str]:
    """``Authorization: Bearer TOKEN``, or nothing without a token."""
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def _json(reply: Reply) -> Any:
    return json.loads(reply.body)


def _run_outcome(reply: Reply) -> RunOutcome:
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


def control_address(address: str | None) -> UnixAddress | TcpAddress:
    """Where the control API is: ``address``, else the default; UsageError for another kind."""
    text = address or default_control_address()
    parsed = parse_address(text)
    if not isinstance(parsed, UnixAddress | TcpAddress):
        raise UsageError(f"the control API is at unix:PATH or tcp://HOST:PORT, not {text!r}")
    return parsed


def unreachable(address: UnixAddress | TcpAddress, exc: OSError) -> ConnectFailed:
    """The error for a control API that could not be reached, with what to do about it."""
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return ConnectFailed(
            f"cannot reach the control API at {address}: {exc.strerror}"
            " (is `vsock-async serve` running? see --control)"
        )
    if isinstance(exc, PermissionError):
        return ConnectFailed(
            f"cannot reach the control API at {address}: {exc.strerror}"
            " (its socket is mode 0600: run as the daemon's user)"
        )
    return ConnectFailed(f"control API at {address}: {exc}")


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
        self.address = control_address(address)
        self.token = token
        self.timeout = timeout

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if isinstance(self.address, UnixAddress):
            return _UnixHTTPConnection(self.address.path, timeout)
        return http.client.HTTPConnection(self.address.host, self.address.port, timeout=timeout)

    def call(self, call: Call[T]) -> T:
        """Make ``call``; its result. ControlError for an error status, ConnectFailed if the
        daemon cannot be reached."""
        reply = self.request(
            call.method, call.path, call.body, accept=call.accept, wait_forever=call.wait_forever
        )
        return call.parse(reply)

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
        exchange = Call(method, path, lambda reply: reply, body, accept=accept)
        conn = self._connection(None if wait_forever else self.timeout)
        try:
            conn.request(method, path, body=exchange.data(), headers=exchange.headers(self.token))
            response = conn.getresponse()
            payload = response.read()
        except OSError as exc:
            raise unreachable(self.address, exc) from None
        except http.client.HTTPException as exc:
            raise ConnectFailed(f"control API at {self.address}: {exc}") from None
        finally:
            conn.close()
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, payload)
        if reply.status >= 400:
            raise error_from(reply)
        return reply

    def get_json(self, path: str) -> Any:
        """GET ``path`` and decode its JSON."""
        return json.loads(self.request("GET", path).body)

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``."""
        return self.call(Call.health())

    def guests(self) -> list[dict[str, Any]]:
        """``GET /v1/guests``: every connected guest."""
        return self.call(Call.guests())

    def guest(self, key: str, *, wait: float | None = None) -> dict[str, Any]:
        """``GET /v1/guests/{key}``; with ``wait``, the daemon waits that long for it to connect."""
        return self.call(Call.guest(key, wait=wait))

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
        return self.call(Call.run(key, command, timeout=timeout, cwd=cwd, env=env, wait=wait))

    def probe(self, key: str) -> dict[str, Any]:
        """``POST /v1/guests/{key}/probe``."""
        return self.call(Call.probe(key))

    def drop(self, key: str) -> dict[str, Any]:
        """``DELETE /v1/guests/{key}``: close the guest's connections."""
        return self.call(Call.drop(key))

    def metrics(self) -> str:
        """``GET /metrics``, the Prometheus text."""
        return self.call(Call.metrics())

    # -- files ---------------------------------------------------------------------------

    def stat_file(self, key: str, path: str | bytes, *, follow_symlinks: bool = True) -> Any:
        """What the guest knows of ``path`` (docs/control-api.md, "Files")."""
        return self.call(Call.stat_file(key, path, follow_symlinks=follow_symlinks))

    def list_files(self, key: str, path: str | bytes) -> list[dict[str, Any]]:
        """The entries of the guest directory ``path``."""
        return self.call(Call.list_files(key, path))

    def remove_file(self, key: str, path: str | bytes, *, recursive: bool = False) -> Any:
        """Remove a guest file, link or directory (``recursive``: a whole tree)."""
        return self.call(Call.remove_file(key, path, recursive=recursive))

    def make_directory(
        self,
        key: str,
        path: str | bytes,
        *,
        parents: bool = False,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
    ) -> Any:
        """Make a guest directory (``parents``: as ``mkdir -p``)."""
        return self.call(
            Call.make_directory(key, path, parents=parents, mode=mode, uid=uid, gid=gid)
        )

    def make_symlink(
        self,
        key: str,
        target: str | bytes,
        path: str | bytes,
        *,
        uid: int | None = None,
        gid: int | None = None,
    ) -> Any:
        """Make the guest path ``path`` a symbolic link to ``target``."""
        return self.call(Call.make_symlink(key, target, path, uid=uid, gid=gid))

    def set_attributes(
        self, key: str, path: str | bytes, *, mode: int | None = None, mtime: float | None = None
    ) -> Any:
        """Set exactly ``mode`` and/or ``mtime`` of a guest file or directory."""
        return self.call(Call.set_attributes(key, path, mode=mode, mtime=mtime))

    def put_file(
        self,
        key: str,
        path: str | bytes,
        chunks: Iterable[bytes],
        *,
        mode: int | None = None,
        mtime: float | None = None,
        make_parents: bool = True,
    ) -> Any:
        """``PUT /v1/guests/{key}/files``: ``chunks`` streamed as the body (chunked), never
        held whole; the daemon's answer."""
        url = put_file_url(key, path, mode=mode, mtime=mtime, make_parents=make_parents)
        headers = {"Content-Type": "application/octet-stream", **auth_headers(self.token)}
        conn = self._connection(None)
        try:
            conn.request("PUT", url, body=iter(chunks), headers=headers, encode_chunked=True)
            response = conn.getresponse()
            payload = response.read()
        except OSError as exc:
            raise unreachable(self.address, exc) from None
        except http.client.HTTPException as exc:
            raise ConnectFailed(f"control API at {self.address}: {exc}") from None
        finally:
            conn.close()
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, payload)
        if reply.status >= 400:
            raise error_from(reply)
        return _json(reply)

    def get_file(self, key: str, path: str | bytes, sink: Callable[[bytes], object]) -> int:
        """``GET /v1/guests/{key}/files``: each piece of the file handed to ``sink`` as it
        arrives; how many bytes. A body cut short (the transfer failed after it began) is a
        ProtocolError: what ``sink`` got is not the whole file."""
        url = get_file_url(key, path)
        conn = self._connection(None)
        received = -1  # the body has not begun
        try:
            conn.request("GET", url, headers=auth_headers(self.token))
            response = conn.getresponse()
            if response.status >= 400:
                headers = {k.lower(): v for k, v in response.getheaders()}
                raise error_from(Reply(response.status, headers, response.read()))
            received = 0
            while piece := response.read1(1024 * 1024):
                sink(piece)
                received += len(piece)
        except (http.client.IncompleteRead, OSError) as exc:
            if received < 0:
                if isinstance(exc, OSError):
                    raise unreachable(self.address, exc) from None
                raise ConnectFailed(f"control API at {self.address}: {exc}") from None
            raise ProtocolError(CUT_SHORT.format(received)) from None
        except http.client.HTTPException as exc:
            raise ConnectFailed(f"control API at {self.address}: {exc}") from None
        finally:
            conn.close()
        return received


def guest_path(key: str) -> str:
    """The path of guest ``key`` in the API, the key quoted."""
    return "/v1/guests/" + urllib.parse.quote(str(key), safe="")


def error_from(reply: Reply) -> ControlError:
    """The ControlError of an error answer: its code and message, or the HTTP status alone."""
    try:
        body = json.loads(reply.body)
        error = body["error"]
        return ControlError(reply.status, str(error["code"]), str(error["message"]), body)
    except (ValueError, KeyError, TypeError):
        text = reply.body.decode(errors="replace").strip()[:200]
        return ControlError(reply.status, "http_error", text or f"HTTP {reply.status}", {})

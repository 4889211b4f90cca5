"""``serve``'s HTTP control API (aiohttp): guests, run, exec, files, probe, drop, health,
metrics.

With :mod:`.control_exec` (which streams an exec) the only modules of the
daemon that import aiohttp; ``serve`` imports them when it starts, so the
core and the agent run on the standard library.
Routes, bodies and error codes are those of docs/openapi.yaml. Every error
is ``{"error": {"code": CODE, "message": TEXT}}`` with a stable ``CODE``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import os
import shlex
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import WSCloseCode, WSMsgType, web

from .._sockets import stop_polling_accepts
from ..errors import (
    AcceptTimeout,
    ClosedLocally,
    CommandTimeout,
    ConnectionClosed,
    DeadlineExceeded,
    GuestBusy,
    GuestFileError,
    PeerError,
    ProbeFailed,
    SpawnFailed,
    UnknownGuest,
    Unsupported,
    UsageError,
    VsockAsyncError,
)
from ..host.commandline import compose_command
from ..host.commandline import shown_command as _shown
from ..host.files import FileInfo
from ..host.guests import Guest
from ..host.process import DEVNULL, PIPE, STDOUT, Process
from ..host.server import CommandServer
from ..protocol import result_frame_parts
from ..results import CommandResult
from ..timeouts import DEFAULT, Timeout, check_timeout, parse_timeout, resolve_timeout
from .control_exec import (
    ClientGone,
    MessageTooBig,
    control_frame,
    limit_messages,
    stream_http,
    stream_websocket,
)
from .defaults import RAW_RESULT_TYPE
from .exec_stream import (
    REQUEST_FIELDS,
    STREAM_TYPE,
    ExecRequest,
    ExitStatus,
    Started,
    error_message,
    parse_request,
)
from .metrics import PROMETHEUS_CONTENT_TYPE, ServeMetrics

__all__ = [
    "BOOLEAN_WORDS",
    "ERROR_STATUS",
    "RAW_RESULT_TYPE",
    "ControlAPI",
    "file_info_json",
    "guest_json",
    "send_json",
]

logger = logging.getLogger("vsock_async.control")

_OCTET_STREAM: Final = "application/octet-stream"
_JSON: Final = "application/json; charset=utf-8"
_BODY_OVERHEAD: Final = 64 * 1024
_WRITE_CHUNK: Final = 3 * 256 * 1024
"""Output is written this much at a time: raw, or encoded to 1 MiB of base64 (a multiple of
3 bytes, so the pieces join into one valid base64 string). Never one giant copy."""
BOOLEAN_WORDS: Final = {
    **dict.fromkeys(("1", "true", "yes", "on"), True),
    **dict.fromkeys(("0", "false", "no", "off"), False),
}
"""How a boolean query parameter (``?raw=``) may be spelled, in any case."""
_RUN_FIELDS: Final = frozenset({"command", "timeout", "wait", "cwd", "env"})
_FILE_CHUNK: Final = 1024 * 1024
"""An upload's body is read, and passed on to the guest, this much at a time at most."""
_PROBE_FIELDS: Final = frozenset({"timeout"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


ERROR_STATUS: Final = {
    "bad_request": 400,
    "command_too_large": 400,
    "unauthorized": 401,
    "not_found": 404,
    "guest_not_found": 404,
    "file_not_found": 404,
    "method_not_allowed": 405,
    "guest_busy": 409,
    "unsupported": 409,
    "body_too_large": 413,
    "spawn_failed": 422,
    "file_error": 422,
    "internal": 500,
    "guest_failed": 502,
    "probe_failed": 502,
    "shutting_down": 503,
    "command_timeout": 504,
}
"""Every error code the API answers with, and its HTTP status. Codes never change meaning."""

_HTTP_CODES: Final = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


class ApiError(Exception):
    """An error answer: a stable code (which fixes the HTTP status), a message, extra fields.

    ``bytes`` extra fields (a timed-out command's output) are sent in base64.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = ERROR_STATUS[code]
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        if self.status == 401:
            self.headers["WWW-Authenticate"] = "Bearer"
        self.extra = extra

    def stream_message(self) -> dict[str, Any]:
        """The ``error`` message that ends an exec stream (extra fields that are bytes left out)."""
        extra = {k: v for k, v in self.extra.items() if not isinstance(v, bytes)}
        return error_message(self.code, self.message, self.status, **extra)

    async def send(self, request: web.Request) -> web.StreamResponse:
        body = {"error": {"code": self.code, "message": self.message}, **self.extra}
        return await send_json(request, body, status=self.status, headers=self.headers)


class _FileCall:
    """What a file route tells the metrics beyond an exception: a download cut short after
    its first byte (too late for an error answer) failed."""

    __slots__ = ("cut_short",)

    def __init__(self) -> None:
        self.cut_short = False


class _Base64:
    """Bytes to be sent as base64, encoded a piece at a time as they are written."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __len__(self) -> int:
        return (len(self.data) + 2) // 3 * 4

    def pieces(self) -> Iterator[bytes]:
        view = memoryview(self.data)
        for start in range(0, len(view), _WRITE_CHUNK):
            yield base64.b64encode(view[start : start + _WRITE_CHUNK])


def _json_parts(body: Mapping[str, Any]) -> list[bytes | _Base64]:
    """``body`` as JSON text in parts; each ``bytes`` value becomes a base64 string."""
    parts: list[bytes | _Base64] = []
    for name, value in body.items():
        start = b"{" if not parts else b", "
        if isinstance(value, bytes):
            parts += [start + json.dumps(name).encode() + b': "', _Base64(value), b'"']
        else:
            parts.append(start + f"{json.dumps(name)}: {json.dumps(value)}".encode())
    parts.append(b"}" if parts else b"{}")
    return parts


def _pieces(data: bytes | bytearray) -> Iterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(view), _WRITE_CHUNK):
        yield view[start : start + _WRITE_CHUNK]


async def send_json(
    request: web.Request,
    body: Mapping[str, Any],
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Answer ``body`` as JSON, its ``bytes`` values in base64, streamed piece by piece.

    Memory: the output is held once (by the caller) plus one encoded piece, never the
    whole JSON text; aiohttp's writes wait for the socket to drain between pieces.
    """
    parts = _json_parts(body)
    response = web.StreamResponse(status=status, headers={"Content-Type": _JSON, **(headers or {})})
    response.content_length = sum(len(part) for part in parts)
    await response.prepare(request)
    for part in parts:
        if isinstance(part, _Base64):
            for piece in part.pieces():
                await response.write(piece)
        else:
            await response.write(part)
    await response.write_eof()
    return response


def _timestamp(value: float | None) -> str | None:
    if value is None:
        return None
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="milliseconds")


def _peer_text(peer: object) -> str | None:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer) if peer else None


def guest_json(guest: Guest) -> dict[str, Any]:
    """What the API says about one guest."""
    channels = guest.channels
    return {
        "key": str(guest.key),
        "cid": guest.key if isinstance(guest.key, int) else None,
        "connections": len(channels),
        "protocol": channels[-1].protocol if channels else None,
        "running": sum(c.running for c in channels),
        "busy_connections": sum(1 for c in channels if c.busy),
        "busy": guest.busy,
        "waiting": guest.waiting,
        "peer": _peer_text(guest.peer),
        "listener": channels[-1].listener if channels else None,
        "connected_at": _timestamp(guest.connected_at),
        "last_probe": _timestamp(guest.last_probe),
    }


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _timeout_field(body: Mapping[str, Any]) -> Timeout:
    """The body's ``timeout``: seconds, null for none, absent for the daemon's default."""
    if "timeout" not in body:
        return DEFAULT
    try:
        return check_timeout(body["timeout"])
    except UsageError as exc:
        raise ApiError("bad_request", str(exc)) from None


def _query_flag(request: web.Request, name: str) -> bool | None:
    """A boolean query parameter (1/true/yes/on, 0/false/no/off); None when absent or empty."""
    text = request.query.get(name, "")
    if not text:
        return None
    value = BOOLEAN_WORDS.get(text.lower())
    if value is None:
        raise ApiError(
            "bad_request", f"{name} must be 1, true, yes, on, 0, false, no or off; not {text!r}"
        )
    return value


def _query_path(request: web.Request, name: str = "path", *, absolute: bool = True) -> bytes:
    """``name`` (text) or ``name_b64`` (any bytes) of the query; an absolute path if asked."""
    text, encoded = request.query.get(name), request.query.get(f"{name}_b64")
    if (text is None) == (encoded is None):
        raise ApiError("bad_request", f"give exactly one of {name}= and {name}_b64= in the query")
    if encoded is not None:
        try:
            value = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise ApiError("bad_request", f"{name}_b64 is not valid base64") from None
    else:
        assert text is not None
        value = os.fsencode(text)
    if not value or b"\0" in value or (absolute and not value.startswith(b"/")):
        what = "an absolute guest path" if absolute else "not empty"
        raise ApiError("bad_request", f"{name} must be {what}, without NUL: {value[:100]!r}")
    return value


def _query_number(request: web.Request, name: str, base: int) -> int | None:
    """A whole number of the query (``base`` 8 for a mode, as chmod takes it); None if absent."""
    text = request.query.get(name, "")
    if not text:
        return None
    try:
        value = int(text, base)
    except ValueError:
        value = -1
    if value < 0:
        digits = "octal digits" if base == 8 else "digits"
        raise ApiError("bad_request", f"{name} must be {digits}, not {text!r}")
    return value


def _query_mtime(request: web.Request) -> float | None:
    text = request.query.get("mtime", "")
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise ApiError("bad_request", f"mtime is seconds since the epoch, not {text!r}")
    return value


def file_info_json(info: FileInfo) -> dict[str, Any]:
    """What the API says about a guest file: :class:`FileInfo` with ``mtime`` in seconds, and
    ``name_b64``/``target_b64`` beside a name or link target that is not UTF-8."""
    body: dict[str, Any] = {
        "name": _text(info.name),
        "kind": info.kind,
        "size": info.size,
        "mode": info.mode,
        "uid": info.uid,
        "gid": info.gid,
        "mtime": info.mtime,
        "mtime_ns": info.mtime_ns,
        "target": None if info.target is None else _text(info.target),
    }
    for field, value in (("name", info.name), ("target", info.target)):
        if value is not None and body[field] != value:
            body[f"{field}_b64"] = base64.b64encode(os.fsencode(value)).decode("ascii")
    return body


def _text(value: str) -> str:
    """``os.fsdecode`` text as valid text: undecodable bytes shown as U+FFFD."""
    return os.fsencode(value).decode("utf-8", "replace")


def _wants_raw(request: web.Request) -> bool:
    raw = _query_flag(request, "raw")
    if raw is not None:
        return raw
    accept = request.headers.get("Accept", "")
    return RAW_RESULT_TYPE in accept or _OCTET_STREAM in accept


class ControlAPI:
    """The control API of one :class:`CommandServer`; :meth:`start` it on a socket.

    ``token``, when set, must arrive as ``Authorization: Bearer TOKEN`` on
    every request; it is compared in constant time and never logged.
    """

    def __init__(
        self,
        server: CommandServer,
        metrics: ServeMetrics,
        *,
        token: str | None = None,
        started_at: float | None = None,
    ) -> None:
        self.server = server
        self.metrics = metrics
        self._token = token.encode() if token is not None else None
        self._started_at = started_at or time.time()
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        """True once shutdown began: runs, execs and probes are refused with 503."""
        self.drain_ended: str | None = None
        """Once the drain is over, how it ended (``at the end of the shutdown drain (...)``):
        calls still running then are the daemon's to end, not failures of their guests."""
        self._processes: set[Process] = set()
        """The processes of streaming execs in progress."""
        self._runners: list[web.AppRunner] = []
        self._sites: list[tuple[web.SockSite, socket.socket]] = []
        self._max_message = 2 * self.server.limits.max_command + _BODY_OVERHEAD
        """The largest request body, and the largest WebSocket message of an exec."""
        self.app = self._make_app()

    def _make_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self._max_message,
            middlewares=[self._errors_middleware, self._auth_middleware],
        )
        app.router.add_get("/v1/health", self._health)
        app.router.add_get("/v1/guests", self._list_guests)
        app.router.add_get("/v1/guests/{key}", self._get_guest)
        app.router.add_delete("/v1/guests/{key}", self._drop_guest)
        app.router.add_post("/v1/guests/{key}/run", self._run)
        # GET too: WebSocket clients upgrade with GET; POST without an upgrade streams over HTTP.
        app.router.add_get("/v1/guests/{key}/exec", self._exec, allow_head=False)
        app.router.add_post("/v1/guests/{key}/exec", self._exec)
        app.router.add_post("/v1/guests/{key}/probe", self._probe)
        app.router.add_get("/v1/guests/{key}/files", self._get_file, allow_head=False)
        app.router.add_put("/v1/guests/{key}/files", self._put_file)
        app.router.add_delete("/v1/guests/{key}/files", self._remove_file)
        app.router.add_get("/v1/guests/{key}/files/stat", self._stat_file)
        app.router.add_get("/v1/guests/{key}/files/list", self._list_files)
        app.router.add_post("/v1/guests/{key}/files/mkdir", self._make_directory)
        app.router.add_post("/v1/guests/{key}/files/symlink", self._make_symlink)
        app.router.add_post("/v1/guests/{key}/files/attributes", self._set_attributes)
        app.router.add_get("/metrics", self._metrics)
        return app

    def _make_read_only_app(self) -> web.Application:
        """Health and metrics alone, with no token: what Prometheus and health probes reach."""
        app = web.Application(middlewares=[self._errors_middleware])
        app.router.add_get("/v1/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, sock: socket.socket, *, read_only: socket.socket | None = None) -> None:
        """Serve on ``sock``, a bound and listening socket, and health and metrics alone on
        ``read_only`` if given."""
        await self._serve(self.app, sock)
        if read_only is not None:
            await self._serve(self._make_read_only_app(), read_only)

    async def _serve(self, app: web.Application, sock: socket.socket) -> None:
        # handler_cancellation: a client that hangs up cancels its request, so a run nobody
        # waits for is stopped like a timeout (its guest connection closed, the command
        # killed by the agent), a queued one is dropped and a ?wait= poll ends.
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=1.0,
            handler_cancellation=True,
        )
        await runner.setup()
        self._runners.append(runner)
        site = web.SockSite(runner, sock)
        self._sites.append((site, sock))
        await site.start()

    async def stop_accepting(self) -> None:
        """Refuse new connections and new runs; requests in progress carry on."""
        self.draining = True
        sites, self._sites = self._sites, []
        for _, sock in sites:
            stop_polling_accepts(sock)
        if sites:
            await asyncio.sleep(0)  # connections just accepted get their transport first
        for site, _ in sites:
            await site.stop()

    @property
    def running(self) -> int:
        """Runs, execs and probes in progress."""
        return self._running

    def signal_processes(self, signum: int) -> int:
        """Send ``signum`` to every process of a streaming exec; how many there were."""
        for process in self._processes:
            process.send_signal(signum)
        return len(self._processes)

    async def wait_idle(self) -> None:
        """Return once no run or probe is in progress."""
        await self._idle.wait()

    def end_drain(self, how: str) -> None:
        """The drain ended (``how``: ``at the end of ...``) with calls still running: the
        daemon closes their guest connections next, so they are answered 503
        ``shutting_down``, and logged, as ended by the daemon rather than failed by a guest."""
        self.drain_ended = how

    async def aclose(self) -> None:
        """Close every connection of the API (after :meth:`stop_accepting` and a drain)."""
        await self.stop_accepting()
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()

    @contextlib.contextmanager
    def _exchange(self) -> Any:
        if self.draining:
            raise ApiError("shutting_down", "the daemon is shutting down")
        self._running += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    # -- middlewares ---------------------------------------------------------------------

    @web.middleware
    async def _errors_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        start = time.monotonic()
        try:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                fallback = "bad_request" if exc.status < 500 else "internal"
                code = _HTTP_CODES.get(exc.status, fallback)
                allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
                raise ApiError(code, exc.reason, headers=allow) from None
            except (ApiError, asyncio.CancelledError):
                raise
            except Exception:
                logger.exception("%s %s failed", request.method, request.path)
                raise ApiError("internal", "internal error; see the daemon's log") from None
        except ApiError as exc:
            response = await exc.send(request)
        except asyncio.CancelledError:
            if self.drain_ended is not None:  # the daemon closes every connection now
                logger.info(
                    "%s %s: ended by the daemon %s", request.method, request.path, self.drain_ended
                )
            elif request.transport is None:  # handler_cancellation: the client hung up
                logger.info(
                    "%s %s: the client went away after %.3f s; the request was cancelled",
                    request.method,
                    request.path,
                    time.monotonic() - start,
                )
            raise
        logger.debug(
            "%s %s -> %s in %.3f s",
            request.method,
            request.path,
            response.status,
            time.monotonic() - start,
        )
        return response

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self._token
            ):
                raise ApiError("unauthorized", "missing or wrong bearer token")
        return await handler(request)

    # -- helpers -------------------------------------------------------------------------

    def _guest(self, request: web.Request) -> Guest:
        key = request.match_info["key"]
        try:
            return self.server.guest(key)
        except UnknownGuest as exc:
            raise ApiError("guest_not_found", str(exc)) from None

    def _failure(
        self,
        exc: Exception,
        guest: Guest,
        what: str,
        timeout: float | None,
        duration: float,
        outcome: str = "",
    ) -> ApiError:
        """:func:`_guest_failure`, except for a call cut short by the end of the drain: the
        daemon closed its connection, so it is 503 ``shutting_down``, logged as the daemon's."""
        if self.drain_ended is None or not isinstance(exc, ClosedLocally):
            return _guest_failure(exc, guest, what, timeout, duration, outcome)
        logger.warning(
            "%s in guest %r was still running %s: the daemon ended it",
            what,
            guest.key,
            self.drain_ended,
        )
        return ApiError(
            "shutting_down",
            f"the daemon ended {what} {self.drain_ended}: it was still running when the daemon"
            " stopped (the guest did not fail)",
        )

    async def _json_body(self, request: web.Request, fields: frozenset[str]) -> dict[str, Any]:
        limit = request.client_max_size
        if request.content_length is not None and request.content_length > limit:
            # Refused before reading: a client announcing more than that need not be waited for.
            raise ApiError("body_too_large", f"the body is larger than {limit} bytes")
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ApiError("bad_request", f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError("bad_request", "the body must be a JSON object")
        unknown = sorted(set(body) - fields)
        if unknown:
            raise ApiError(
                "bad_request",
                f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}",
            )
        return body

    # -- routes --------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "draining" if self.draining else "ok",
                "guests": len(self.server.guests),
                "listeners": [str(a) for a in self.server.addresses],
                "uptime": round(time.time() - self._started_at, 3),
            }
        )

    async def _list_guests(self, request: web.Request) -> web.Response:
        return web.json_response({"guests": [guest_json(g) for g in self.server.guests]})

    async def _get_guest(self, request: web.Request) -> web.Response:
        wait_text = request.query.get("wait")
        if wait_text is None:
            return web.json_response(guest_json(self._guest(request)))
        try:
            wait = parse_timeout(wait_text, "wait")
        except UsageError as exc:
            raise ApiError("bad_request", str(exc)) from None
        key = request.match_info["key"]
        logger.debug(
            "%s %s: waiting up to %s for guest %r to connect",
            request.method,
            request.path,
            "forever" if wait is None else f"{wait:g} s",
            key,
        )
        try:
            guest = await self.server.wait_for_guest(key, timeout=wait)
        except AcceptTimeout as exc:
            raise ApiError("guest_not_found", str(exc)) from None
        except ConnectionClosed as exc:
            raise ApiError("shutting_down", str(exc)) from None
        return web.json_response(guest_json(guest))

    async def _drop_guest(self, request: web.Request) -> web.Response:
        guest = self._guest(request)
        closed = len(guest.channels)
        logger.info("dropping guest %r (%d connections) on request", guest.key, closed)
        await guest.aclose()
        return web.json_response({"key": str(guest.key), "connections_closed": closed})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(self.server).encode(),
            headers={"Content-Type": PROMETHEUS_CONTENT_TYPE},
        )

    async def _probe(self, request: web.Request) -> web.Response:
        body = await self._json_body(request, _PROBE_FIELDS)
        timeout = _timeout_field(body)
        guest = self._guest(request)
        with self._exchange():
            start = time.monotonic()
            self.metrics.probes.inc()
            try:
                await guest.probe(timeout=timeout)
            except (PeerError, ConnectionClosed, DeadlineExceeded, GuestBusy) as exc:
                self.metrics.probes_failed.inc()
                seconds = self.server.default_timeout if timeout is DEFAULT else timeout
                duration = time.monotonic() - start
                raise self._failure(exc, guest, "the probe", seconds, duration) from None
            finally:
                self.metrics.exchange_seconds.observe(time.monotonic() - start)
        return web.json_response(
            {"key": str(guest.key), "ok": True, "duration": time.monotonic() - start}
        )

    async def _run(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request, _RUN_FIELDS)
        line = self._command_line(body)
        timeout = _timeout_field(body)
        wait = body.get("wait", True)
        if not isinstance(wait, bool):
            raise ApiError("bad_request", f"wait must be true or false, not {wait!r}")
        raw = _wants_raw(request)
        guest = self._guest(request)
        with self._exchange():
            start = time.monotonic()
            self.metrics.commands.inc()
            try:
                result = await guest.run(line, timeout=timeout, wait=wait)
            except (PeerError, ConnectionClosed, DeadlineExceeded, GuestBusy) as exc:
                if isinstance(exc, CommandTimeout):
                    self.metrics.commands_timed_out.inc()
                elif not isinstance(exc, GuestBusy):
                    self.metrics.commands_failed.inc()
                seconds = self.server.default_timeout if timeout is DEFAULT else timeout
                what = f"command {_shown(line)}"
                duration = time.monotonic() - start
                raise self._failure(exc, guest, what, seconds, duration) from None
            finally:
                self.metrics.exchange_seconds.observe(time.monotonic() - start)
            duration = time.monotonic() - start
            if result.exit_code != 0:
                self.metrics.commands_failed.inc()
            if raw:
                return await self._raw_result(request, result, duration)
            answer = {
                "exit_code": result.exit_code,
                "exit_signal": result.exit_signal,
                "stdout": result.stdout,
                "stderr": result.stderr,
                "stdout_truncated": result.stdout_truncated,
                "stderr_truncated": result.stderr_truncated,
                "duration": duration,
                "timed_out": False,
            }
            return await send_json(request, answer)

    def _command_line(self, body: Mapping[str, Any]) -> bytes:
        command = body.get("command")
        if isinstance(command, list) and not all(isinstance(a, str) for a in command):
            command = None
        if not (isinstance(command, str) and command) and not (
            isinstance(command, list) and command
        ):
            raise ApiError(
                "bad_request",
                "command must be a non-empty string (a shell command line)"
                " or a non-empty list of strings (argv, quoted with shlex.join)",
            )
        env = body.get("env")
        cwd = body.get("cwd")
        if env is not None and not isinstance(env, dict):
            raise ApiError("bad_request", "env must be an object of strings")
        try:
            line = compose_command(command, cwd=cwd, env=env)
        except UsageError as exc:
            raise ApiError("bad_request", str(exc)) from None
        limit = self.server.limits.max_command
        if len(line) > limit:
            raise ApiError(
                "command_too_large",
                f"the command is {len(line)} bytes; the daemon's limit is {limit}"
                " (serve --max-command)",
            )
        return line

    async def _raw_result(
        self, request: web.Request, result: CommandResult, duration: float
    ) -> web.StreamResponse:
        assert result.exit_code is not None
        parts = result_frame_parts(result.stdout, result.stderr, result.exit_code)
        asked = request.headers.get("Accept", "")
        plain = _OCTET_STREAM in asked and RAW_RESULT_TYPE not in asked
        headers = {
            "Content-Type": _OCTET_STREAM if plain else RAW_RESULT_TYPE,
            "Vsock-Async-Exit-Code": str(result.exit_code),
            "Vsock-Async-Duration": f"{duration:.6f}",
            "Vsock-Async-Stdout-Length": str(len(result.stdout)),
            "Vsock-Async-Stderr-Length": str(len(result.stderr)),
            "Vsock-Async-Stdout-Truncated": "1" if result.stdout_truncated else "0",
            "Vsock-Async-Stderr-Truncated": "1" if result.stderr_truncated else "0",
        }
        if result.exit_signal is not None:
            headers["Vsock-Async-Exit-Signal"] = str(result.exit_signal)
        response = web.StreamResponse(headers=headers)
        response.content_length = sum(len(p) for p in parts)
        await response.prepare(request)
        for part in parts:
            for piece in _pieces(part):
                await response.write(piece)
        await response.write_eof()
        return response

    # -- files ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _file_call(self, guest: Guest, what: str, op: str) -> Iterator[_FileCall]:
        """Count a file operation as an exchange and in the metrics (``op``: its route), and
        turn its failures into API errors."""
        call = _FileCall()
        outcome = "failed"
        with self._exchange():
            try:
                yield call
                outcome = "failed" if call.cut_short else "ok"
            except GuestFileError as exc:
                outcome = "file_error"
                code = "file_not_found" if exc.errno_name == "ENOENT" else "file_error"
                message = exc.strerror or str(exc)  # without the "[Errno N]" of an OSError
                raise ApiError(
                    code, message, path=exc.path, reason=exc.code, errno=exc.errno_name
                ) from None
            except Unsupported as exc:
                outcome = "refused"
                raise ApiError("unsupported", str(exc)) from None
            except UsageError as exc:
                outcome = "refused"
                raise ApiError("bad_request", str(exc)) from None
            except (PeerError, ConnectionClosed) as exc:
                raise self._failure(exc, guest, what, None, 0.0) from None
            finally:
                self.metrics.file_operations.inc((op, outcome))

    async def _put_file(self, request: web.Request) -> web.StreamResponse:
        guest, path = self._guest(request), _query_path(request)
        mode = _query_number(request, "mode", 8)
        uid, gid = _query_number(request, "uid", 10), _query_number(request, "gid", 10)
        mtime = _query_mtime(request)
        make_parents = _query_flag(request, "make_parents")
        received = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal received
            async for chunk in request.content.iter_chunked(_FILE_CHUNK):
                received += len(chunk)
                self.metrics.file_bytes.inc("upload", len(chunk))
                yield chunk

        with self._file_call(guest, "the upload", "put"):
            await guest.put_file(
                body(),
                path,
                mode=0o644 if mode is None else mode,
                uid=uid,
                gid=gid,
                mtime=mtime,
                make_parents=True if make_parents is None else make_parents,
            )
        return web.json_response({"path": os.fsdecode(path), "size": received})

    async def _get_file(self, request: web.Request) -> web.StreamResponse:
        """The file's bytes as they come; an error before the first one is an error answer."""
        guest, path = self._guest(request), _query_path(request)
        with self._file_call(guest, "the download", "get") as call:
            chunks = guest.read_file(path)
            async with contextlib.aclosing(chunks):
                first = await anext(chunks, b"")
                response = web.StreamResponse(headers={"Content-Type": _OCTET_STREAM})
                response.enable_chunked_encoding()
                await response.prepare(request)
                try:
                    await response.write(first)
                    self.metrics.file_bytes.inc("download", len(first))
                    async for chunk in chunks:
                        await response.write(chunk)
                        self.metrics.file_bytes.inc("download", len(chunk))
                except VsockAsyncError as exc:
                    call.cut_short = True
                    # Too late for an error answer: cut the body short, so that no client
                    # takes what came for the whole file (a chunked body without its end).
                    logger.warning(
                        "GET files of guest %r: %s failed after it began: %s",
                        guest.key,
                        os.fsdecode(path),
                        exc,
                    )
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                await response.write_eof()
                return response

    async def _remove_file(self, request: web.Request) -> web.Response:
        guest, path = self._guest(request), _query_path(request)
        recursive = _query_flag(request, "recursive") or False
        with self._file_call(guest, "the removal", "delete"):
            await guest.remove(path, recursive=recursive)
        return web.json_response({"path": os.fsdecode(path)})

    async def _stat_file(self, request: web.Request) -> web.Response:
        guest, path = self._guest(request), _query_path(request)
        follow = _query_flag(request, "follow_symlinks")
        with self._file_call(guest, "the stat", "stat"):
            info = await guest.stat(path, follow_symlinks=True if follow is None else follow)
        return web.json_response(file_info_json(info))

    async def _list_files(self, request: web.Request) -> web.Response:
        guest, path = self._guest(request), _query_path(request)
        with self._file_call(guest, "the listing", "list"):
            entries = await guest.listdir(path)
        return web.json_response({"entries": [file_info_json(e) for e in entries]})

    async def _make_directory(self, request: web.Request) -> web.Response:
        guest, path = self._guest(request), _query_path(request)
        mode = _query_number(request, "mode", 8)
        uid, gid = _query_number(request, "uid", 10), _query_number(request, "gid", 10)
        with self._file_call(guest, "the mkdir", "mkdir"):
            await guest.mkdir(
                path,
                parents=_query_flag(request, "parents") or False,
                mode=0o755 if mode is None else mode,
                uid=uid,
                gid=gid,
            )
        return web.json_response({"path": os.fsdecode(path)})

    async def _make_symlink(self, request: web.Request) -> web.Response:
        guest, path = self._guest(request), _query_path(request)
        target = _query_path(request, "target", absolute=False)
        uid, gid = _query_number(request, "uid", 10), _query_number(request, "gid", 10)
        with self._file_call(guest, "the symlink", "symlink"):
            await guest.symlink(
                target,
                path,
                make_parents=_query_flag(request, "make_parents") or False,
                uid=uid,
                gid=gid,
            )
        return web.json_response({"path": os.fsdecode(path)})

    async def _set_attributes(self, request: web.Request) -> web.Response:
        guest, path = self._guest(request), _query_path(request)
        mode, mtime = _query_number(request, "mode", 8), _query_mtime(request)
        if mode is None and mtime is None:
            raise ApiError("bad_request", "give mode, mtime or both: there is nothing to set")
        with self._file_call(guest, "the attribute change", "attributes"):
            await guest.set_attributes(path, mode=mode, mtime=mtime)
        return web.json_response({"path": os.fsdecode(path)})

    # -- exec ----------------------------------------------------------------------------

    async def _exec(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._exec_websocket(request)
        if request.method != "POST":
            raise ApiError(
                "bad_request",
                "GET .../exec must upgrade to a WebSocket; POST it to stream over plain HTTP",
            )
        guest = self._v2_guest(request)
        with self._exchange():
            return await self._exec_http(request, guest)

    def _v2_guest(self, request: web.Request) -> Guest:
        """The guest of ``request``, unless it speaks only protocol v1."""
        guest = self._guest(request)
        channels = guest.channels
        if channels and all(c.protocol == "v1" for c in channels):
            raise ApiError(
                "unsupported",
                f"guest {guest.key!r} speaks only protocol v1, which runs one buffered command"
                " at a time: streaming exec (output as it comes, stdin, signals, terminals)"
                " needs v2. Upgrade its agent, or use .../run",
            )
        return guest

    async def _exec_websocket(self, request: web.Request) -> web.WebSocketResponse:
        """Upgrade at once, so that every error, the guest's included, reaches the client as
        an ``error`` message it can read (a refused handshake hides the body from clients)."""
        # aiohttp's own limit above ours: a message over ours is dropped before it gets there.
        ws = web.WebSocketResponse(max_msg_size=self._max_message + 1, compress=False)
        await ws.prepare(request)
        if not limit_messages(ws, request, self._max_message):
            logger.debug("this aiohttp's WebSocket parser cannot be guarded: its own limit applies")
        start = time.monotonic()
        try:
            await self._relay(ws, request, start)
        except MessageTooBig as exc:
            logger.info("%s %s: %s; closing with 1009", request.method, request.path, exc)
            error = ApiError("body_too_large", f"{exc} (twice --max-command plus 64 KiB)")
            reason = f"message too big: the limit is {exc.limit} bytes"
            await _close_with_error(ws, error, WSCloseCode.MESSAGE_TOO_BIG, reason)
        except ApiError as exc:
            await _close_with_error(ws, exc)
        except UsageError as exc:  # a message the client may not send
            await _close_with_error(ws, ApiError("bad_request", str(exc)))
        except (ClientGone, ConnectionResetError):
            _client_went_away(request, start)
        return ws

    async def _relay(self, ws: web.WebSocketResponse, request: web.Request, start: float) -> None:
        guest = self._v2_guest(request)
        exec_request = await _first_request(ws)  # an idle WebSocket is no exec: no drain waits
        with self._exchange():
            async with self._process(guest, exec_request) as process:
                await ws.send_json(Started(process.pid).to_json())
                try:
                    status = await stream_websocket(ws, process, exec_request, self.metrics, start)
                except (PeerError, ConnectionClosed) as exc:
                    what = _exec_what(exec_request)
                    raise self._failure(exc, guest, what, None, 0.0) from None
                await ws.send_json(status.to_json())
        await ws.close()

    async def _exec_http(self, request: web.Request, guest: Guest) -> web.StreamResponse:
        body = await self._json_body(request, REQUEST_FIELDS)
        start = time.monotonic()
        try:
            exec_request = ExecRequest.from_json(body)
        except UsageError as exc:
            raise ApiError("bad_request", str(exc)) from None
        if exec_request.stdin or exec_request.tty is not None:
            raise ApiError(
                "bad_request",
                "stdin and tty need the WebSocket form of exec (Upgrade: websocket)",
            )
        response = web.StreamResponse(headers={"Content-Type": STREAM_TYPE})
        response.enable_chunked_encoding()
        try:
            async with self._process(guest, exec_request) as process:
                await response.prepare(request)
                await response.write(_control(Started(process.pid).to_json()))
                try:
                    status: ExitStatus | ApiError = await stream_http(
                        response, process, self.metrics, start
                    )
                except (PeerError, ConnectionClosed) as exc:
                    status = self._failure(exc, guest, _exec_what(exec_request), None, 0.0)
                if isinstance(status, ApiError):
                    await response.write(_control(status.stream_message()))
                else:
                    await response.write(_control(status.to_json()))
                await response.write_eof()
        except ConnectionResetError:  # aiohttp's own: the client left while we wrote to it
            _client_went_away(request, start)
        return response

    @contextlib.asynccontextmanager
    async def _process(self, guest: Guest, request: ExecRequest) -> AsyncIterator[Process]:
        """Start the process of ``request`` in ``guest``, count it, and stop it (if it still
        runs) on the way out, whichever way that is."""
        start = time.monotonic()
        command, what = request.command, _exec_what(request)
        timeout = resolve_timeout(request.timeout, self.server.default_timeout)
        env: dict[str | bytes, str | bytes] | None = None
        if request.env is not None:
            env = {name: value for name, value in request.env.items()}
        try:
            process = await guest.create_process(
                command if isinstance(command, str) else list(command),
                stdin=PIPE if request.stdin else DEVNULL,
                stderr=STDOUT if request.merges_stderr else PIPE,
                env=env,
                cwd=request.cwd,
                user=request.user,
                pty=request.tty,
                timeout=timeout,
            )
        except Unsupported as exc:
            raise ApiError("unsupported", str(exc)) from None
        except UsageError as exc:
            raise ApiError("bad_request", str(exc)) from None
        except SpawnFailed as exc:
            message = exc.strerror or str(exc)  # without the "[Errno N]" of an OSError
            raise ApiError("spawn_failed", message, reason=exc.code, errno=exc.errno_name) from None
        except CommandTimeout as exc:  # the timeout ran out before the process started
            if exc.sent:
                outcome = "it was stopped before it started"
            elif timeout:
                outcome = f"it waited for a free stream of guest {guest.key!r} and never started"
            else:
                outcome = "it was given no time and never started"
            duration = time.monotonic() - start
            raise self._failure(exc, guest, what, timeout, duration, outcome) from None
        except (PeerError, ConnectionClosed) as exc:
            raise self._failure(exc, guest, what, None, 0.0) from None
        self._processes.add(process)
        self.metrics.processes_started.inc()
        self.metrics.processes_running.set(len(self._processes))
        logger.debug("%s in guest %r started as pid %s", what, guest.key, process.pid)

        def ended(_: object) -> None:
            self._processes.discard(process)
            self.metrics.processes_running.set(len(self._processes))
            how = _exit_kind(process, drain_ended=self.drain_ended is not None)
            self.metrics.processes_exited.inc(how)
            logger.debug("%s in guest %r (pid %s): %s", what, guest.key, process.pid, how)

        try:
            yield process
        finally:
            # Counted out once it is gone, even when the client's hang-up cancels this
            # handler while it waits (it was told to stop, so it ends: the drain still sees it).
            stopping = asyncio.ensure_future(process.aclose())
            stopping.add_done_callback(ended)
            await asyncio.shield(stopping)


async def _first_request(ws: web.WebSocketResponse) -> ExecRequest:
    """The exec request, the first message on ``ws``; ApiError if it is not one."""
    message = await ws.receive()
    if message.type is WSMsgType.ERROR and isinstance(message.data, MessageTooBig):
        raise message.data
    if message.type is WSMsgType.TEXT:
        try:
            return parse_request(message.data)
        except UsageError as exc:
            raise ApiError("bad_request", str(exc)) from None
    if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
        raise ClientGone
    raise ApiError("bad_request", "the first message must be the exec request, as JSON text")


def _exec_what(request: ExecRequest) -> str:
    """An exec as messages name it: ``the exec of 'COMMAND'``."""
    command = request.command
    line = (command if isinstance(command, str) else shlex.join(command)).encode()
    return f"the exec of {_shown(line)}"


def _client_went_away(request: web.Request, start: float) -> None:
    logger.info(
        "%s %s: the client went away after %.3f s; its process was stopped",
        request.method,
        request.path,
        time.monotonic() - start,
    )


async def _close_with_error(
    ws: web.WebSocketResponse, error: ApiError, code: int | None = None, reason: str = ""
) -> None:
    """Send ``error`` as the last message and close with ``code`` and ``reason``: by default
    1008 for the client's fault, 1001 (going away) for a daemon shutting down, which a client
    may retry elsewhere, else 1011; and the error's code."""
    if ws.closed:
        return
    with contextlib.suppress(ConnectionResetError):
        await ws.send_json(error.stream_message())
    if code is None:
        code = _close_code(error)
    await ws.close(code=code, message=(reason or error.code).encode())


def _close_code(error: ApiError) -> int:
    if error.code == "shutting_down":
        return WSCloseCode.GOING_AWAY
    return WSCloseCode.POLICY_VIOLATION if error.status < 500 else WSCloseCode.INTERNAL_ERROR


def _control(message: Mapping[str, Any]) -> bytes:
    return control_frame(json.dumps(message).encode())


def _exit_kind(process: Process, *, drain_ended: bool) -> str:
    """How a process ended, as the metrics count it. With no exit once the drain has ended,
    the daemon ended it (killed it and closed its guest connection): no loss of the guest's."""
    if process.returncode is None:
        return "shutdown" if drain_ended else "lost"
    if process.timed_out:
        return "timed_out"
    return "code" if process.exit_signal is None else "signal"


def _guest_failure(
    exc: Exception,
    guest: Guest,
    what: str,
    timeout: float | None,
    duration: float,
    outcome: str = "",
) -> ApiError:
    """The API error for a run, probe or exec of ``guest`` that gave no result, told for
    people: no Python reprs, no connection ids; ``outcome`` ends a timeout's message."""
    key = guest.key
    if isinstance(exc, GuestBusy):
        return ApiError("guest_busy", str(exc))
    if isinstance(exc, DeadlineExceeded):
        partial = exc.result if isinstance(exc, CommandTimeout) else None
        after = "" if timeout is None else f" after {timeout:.3g} s"
        return ApiError(
            "command_timeout",
            f"{what} timed out{after}{'; ' if outcome else ''}{outcome}",
            exit_code=None,
            stdout=partial.stdout if partial is not None else b"",
            stderr=partial.stderr if partial is not None else b"",
            duration=duration,
            timed_out=True,
        )
    if isinstance(exc, ProbeFailed):
        said = f"exit code {exc.result.exit_code}" if exc.result is not None else "output"
        message = f"guest {key!r} answered the probe with {said}; that connection was closed"
        return ApiError("probe_failed", message)
    if isinstance(exc, ClosedLocally):
        return ApiError(
            "guest_failed",
            f"the daemon closed the connection of guest {key!r} during {what} (the guest"
            " was dropped, or the daemon is stopping)",
        )
    return ApiError("guest_failed", f"guest {key!r} failed during {what}: {exc}")

"""An asyncio client of ``serve``'s control API (aiohttp), for orchestrators that talk to a
daemon rather than embed the library.

:class:`AsyncControlClient` makes the same :class:`~.control_client.Call`\\ s as the
blocking :class:`~.control_client.ControlClient`, and adds :meth:`~AsyncControlClient.
create_process`: a process in a guest, streamed over the exec WebSocket
(docs/control-api.md, "Streaming exec"), shaped like :class:`vsock_async.Process` and so
like ``asyncio.subprocess.Process``.

Import it from :mod:`vsock_async.serve.control_client`, which loads this module (and
aiohttp) only then.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar

import aiohttp

from ..addresses import UnixAddress
from ..errors import (
    ClosedLocally,
    ConnectFailed,
    ConnectionLost,
    ProtocolError,
    StdinClosed,
    UsageError,
    VsockAsyncError,
)
from ..host.process import (
    DEFAULT_LIMIT,
    DEVNULL,
    PIPE,
    ProcessReader,
    ProcessWriter,
    Signalling,
    check_terminal_size,
    communicate,
)
from ..host.process import STDOUT as TO_STDOUT  # this module's STDOUT is the channel
from ..protocol.v1_host import copy_error
from ..timeouts import DEFAULT, Timeout
from .control_client import (
    CUT_SHORT,
    Call,
    ControlError,
    Reply,
    RunOutcome,
    auth_headers,
    control_address,
    error_from,
    get_file_url,
    guest_path,
    put_file_url,
    unreachable,
)
from .exec_stream import (
    EOF,
    STDERR,
    STDIN,
    STDOUT,
    ExecRequest,
    ExitStatus,
    Resize,
    SendSignal,
    Started,
    StreamError,
    data_message,
    parse_server_message,
    parse_signal,
    split_data_message,
)

__all__ = ["AsyncControlClient", "RemoteProcess"]

T = TypeVar("T")

_STDIN_CHUNK: Final = 32 * 1024
"""Stdin goes out in messages of at most this much: well under the daemon's smallest
message limit (twice ``--max-command`` plus 64 KiB)."""
_STDIN_QUEUE: Final = 64 * 1024
"""Stdin bytes handed to the WebSocket's sender and not yet sent."""


class AsyncControlClient:
    """Calls on ``serve``'s control API at ``address`` (``unix:PATH`` or ``tcp://HOST:PORT``)
    from asyncio code.

    One HTTP session (a pool of connections) per client: ``async with`` it, or
    :meth:`aclose` it when done. Errors are those of the blocking client:
    :class:`ControlError` for an answer with an error code, :class:`ConnectFailed`
    when the daemon cannot be reached. ``timeout`` bounds each call except runs
    and waits for a guest, whose deadline is the daemon's.
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
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncControlClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client's connections (the processes it streams included)."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            address = self.address
            if isinstance(address, UnixAddress):
                connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=address.path)
                base = "http://localhost"
            else:
                connector = aiohttp.TCPConnector()
                host = f"[{address.host}]" if ":" in address.host else address.host
                base = f"http://{host}:{address.port}"
            self._session = aiohttp.ClientSession(base_url=base, connector=connector)
        return self._session

    async def call(self, call: Call[T]) -> T:
        """Make ``call``; its result. ControlError for an error status, ConnectFailed if the
        daemon cannot be reached."""
        timeout = aiohttp.ClientTimeout(total=None if call.wait_forever else self.timeout)
        try:
            async with self._http().request(
                call.method,
                call.path,
                data=call.data(),
                headers=call.headers(self.token),
                timeout=timeout,
            ) as response:
                payload = await response.read()
        except aiohttp.ClientConnectorError as exc:
            raise unreachable(self.address, exc.os_error) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConnectFailed(f"control API at {self.address}: {exc!r}") from None
        reply = Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, payload)
        if reply.status >= 400:
            raise error_from(reply)
        return call.parse(reply)

    async def health(self) -> dict[str, Any]:
        """``GET /v1/health``."""
        return await self.call(Call.health())

    async def guests(self) -> list[dict[str, Any]]:
        """``GET /v1/guests``: every connected guest."""
        return await self.call(Call.guests())

    async def guest(self, key: str, *, wait: float | None = None) -> dict[str, Any]:
        """``GET /v1/guests/{key}``; with ``wait``, the daemon waits that long for it to connect."""
        return await self.call(Call.guest(key, wait=wait))

    async def run(
        self,
        key: str,
        command: str | list[str],
        *,
        timeout: Timeout = DEFAULT,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> RunOutcome:
        """``POST /v1/guests/{key}/run``: see :meth:`ControlClient.run`."""
        return await self.call(Call.run(key, command, timeout=timeout, cwd=cwd, env=env, wait=wait))

    async def probe(self, key: str) -> dict[str, Any]:
        """``POST /v1/guests/{key}/probe``."""
        return await self.call(Call.probe(key))

    async def drop(self, key: str) -> dict[str, Any]:
        """``DELETE /v1/guests/{key}``: close the guest's connections."""
        return await self.call(Call.drop(key))

    async def metrics(self) -> str:
        """``GET /metrics``, the Prometheus text."""
        return await self.call(Call.metrics())

    # -- files (docs/control-api.md, "Files") --------------------------------------------

    async def stat_file(self, key: str, path: str | bytes, *, follow_symlinks: bool = True) -> Any:
        """What the guest knows of ``path``."""
        return await self.call(Call.stat_file(key, path, follow_symlinks=follow_symlinks))

    async def list_files(self, key: str, path: str | bytes) -> list[dict[str, Any]]:
        """The entries of the guest directory ``path``."""
        return await self.call(Call.list_files(key, path))

    async def remove_file(self, key: str, path: str | bytes, *, recursive: bool = False) -> Any:
        """Remove a guest file, link or directory (``recursive``: a whole tree)."""
        return await self.call(Call.remove_file(key, path, recursive=recursive))

    async def make_directory(
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
        return await self.call(
            Call.make_directory(key, path, parents=parents, mode=mode, uid=uid, gid=gid)
        )

    async def make_symlink(
        self,
        key: str,
        target: str | bytes,
        path: str | bytes,
        *,
        uid: int | None = None,
        gid: int | None = None,
    ) -> Any:
        """Make the guest path ``path`` a symbolic link to ``target``."""
        return await self.call(Call.make_symlink(key, target, path, uid=uid, gid=gid))

    async def set_attributes(
        self, key: str, path: str | bytes, *, mode: int | None = None, mtime: float | None = None
    ) -> Any:
        """Set exactly ``mode`` and/or ``mtime`` of a guest file or directory."""
        return await self.call(Call.set_attributes(key, path, mode=mode, mtime=mtime))

    async def put_file(
        self,
        key: str,
        path: str | bytes,
        source: bytes | AsyncIterable[bytes],
        *,
        mode: int | None = None,
        mtime: float | None = None,
        make_parents: bool = True,
    ) -> Any:
        """``PUT /v1/guests/{key}/files``: ``source`` (bytes, or an async iterable of bytes
        streamed as a chunked body, never held whole); the daemon's answer once the file is
        in place."""
        url = put_file_url(key, path, mode=mode, mtime=mtime, make_parents=make_parents)
        headers = {"Content-Type": "application/octet-stream", **auth_headers(self.token)}
        try:
            async with self._http().put(url, data=source, headers=headers) as response:
                payload = await response.read()
        except aiohttp.ClientConnectorError as exc:
            raise unreachable(self.address, exc.os_error) from None
        except aiohttp.ClientError as exc:
            raise ConnectFailed(f"control API at {self.address}: {exc!r}") from None
        reply = Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, payload)
        if reply.status >= 400:
            raise error_from(reply)
        return json.loads(payload)

    async def read_file(self, key: str, path: str | bytes) -> AsyncIterator[bytes]:
        """``GET /v1/guests/{key}/files``: the guest file's bytes, piece by piece as they
        arrive. A body cut short (the transfer failed after it began) is a ProtocolError:
        what came before it is not the whole file."""
        url = get_file_url(key, path)
        received = -1  # the body has not begun
        try:
            async with self._http().get(url, headers=auth_headers(self.token)) as response:
                if response.status >= 400:
                    headers = {k.lower(): v for k, v in response.headers.items()}
                    raise error_from(Reply(response.status, headers, await response.read()))
                received = 0
                async for piece in response.content.iter_any():
                    received += len(piece)
                    yield piece
        except aiohttp.ClientConnectorError as exc:
            raise unreachable(self.address, exc.os_error) from None
        except aiohttp.ClientPayloadError:
            raise ProtocolError(CUT_SHORT.format(received)) from None
        except aiohttp.ClientError as exc:
            if received >= 0:
                raise ProtocolError(CUT_SHORT.format(received)) from None
            raise ConnectFailed(f"control API at {self.address}: {exc!r}") from None

    async def create_process(
        self,
        key: str,
        program: str | Sequence[str],
        *,
        stdin: int = DEVNULL,
        stderr: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        pty: tuple[int, int] | None = None,
        timeout: Timeout = DEFAULT,
        limit: int = DEFAULT_LIMIT,
    ) -> RemoteProcess:
        """Start ``program`` in guest ``key`` over the exec WebSocket; return once it runs.

        The arguments are those of :meth:`vsock_async.Guest.create_process`:
        ``program`` is a shell command line (``str``) or argv executed directly;
        ``stdin`` is ``PIPE`` or ``DEVNULL``; stdout is always piped; ``stderr``
        is ``PIPE`` (the default without a ``pty``) or ``STDOUT``: merged into
        stdout in the order written, as a ``pty`` always does (then
        :attr:`RemoteProcess.stderr` is None); ``timeout`` covers the whole exec,
        waiting for a free stream of the guest included, and what is left once it
        starts is the process's life limit (``DEFAULT``: the daemon's
        ``--default-timeout``, ``None``: none); ``limit`` is the unread output
        held per stream.

        Raises :class:`ControlError` with the daemon's code (``guest_not_found``,
        ``unsupported`` for a guest speaking only v1, ``spawn_failed`` with
        ``errno`` in its body, ``command_timeout`` when the timeout ran out before
        the process started...; ``bad_request`` naming ``stderr`` from a daemon
        older than ``stderr=``), :class:`UsageError` for bad arguments (nothing
        is sent), :class:`ConnectFailed` if the daemon cannot be reached.
        """
        if stdin not in (PIPE, DEVNULL):
            raise UsageError(f"stdin must be PIPE or DEVNULL, not {stdin!r}")
        if stderr not in (None, PIPE, TO_STDOUT):
            raise UsageError(f"stderr must be PIPE or STDOUT, not {stderr!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise UsageError(f"limit must be a number of bytes > 0, not {limit!r}")
        command = program if isinstance(program, str) else tuple(program)
        request = ExecRequest(
            command,
            env=env,
            cwd=cwd,
            user=user,
            tty=pty,
            stdin=stdin == PIPE,
            stderr=None if stderr is None else "pipe" if stderr == PIPE else "stdout",
            timeout=timeout,
        )
        ExecRequest.from_json(request.to_json())  # checked here: UsageError, nothing sent
        path = f"{guest_path(key)}/exec"
        try:
            ws = await self._http().ws_connect(path, headers=auth_headers(self.token))
        except aiohttp.WSServerHandshakeError as exc:
            raise _refused(path, exc.status) from None
        except aiohttp.ClientConnectorError as exc:
            raise unreachable(self.address, exc.os_error) from None
        except aiohttp.ClientError as exc:
            raise ConnectFailed(f"control API at {self.address}: {exc!r}") from None
        process = RemoteProcess(ws, request, limit)
        try:
            await process._start(request)
        except BaseException:
            await process.aclose()
            raise
        return process


def _refused(path: str, status: int) -> ControlError:
    """The error of a refused upgrade (the daemon upgrades all but a bad token)."""
    if status == 401:
        return ControlError(status, "unauthorized", "missing or wrong bearer token", {})
    message = f"the daemon refused the WebSocket upgrade of {path} (HTTP {status})"
    return ControlError(status, "http_error", message, {})


# -- the process ----------------------------------------------------------------------------


class _Window:
    """Output held for the application on one channel; the reading of the WebSocket waits
    while it is full, which holds the daemon, and through it the process, back."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held = 0
        self._room = asyncio.Event()
        self._room.set()

    def take(self, n: int) -> None:
        self._held += n
        if self._held >= self._limit:
            self._room.clear()

    def grant(self, n: int) -> None:
        self._held -= n
        if self._held < self._limit:
            self._room.set()

    async def wait(self) -> None:
        await self._room.wait()


class _WebSocketStdin:
    """What the :class:`~vsock_async.ProcessWriter` of a :class:`RemoteProcess` feeds:
    stdin messages on the exec WebSocket, sent in order by one task.

    Its credit is the room left in a small send queue, so the writer holds what
    does not fit (and :meth:`ProcessWriter.drain` waits for it) exactly as it does
    for the agent's credit; the daemon reads the next message only once the agent
    took the last, which holds the queue, and so the writer, back.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._queue: collections.deque[tuple[bytes, bool]] = collections.deque()
        self._queued = 0
        self._work = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self.writer = ProcessWriter(self)
        self._sender = asyncio.ensure_future(self._send())

    @property
    def _connection(self) -> _WebSocketStdin:
        return self

    def _stdin_credit(self) -> int:
        return max(0, _STDIN_QUEUE - self._queued)

    def _send_stdin(self, data: bytes, end: bool) -> int:
        taken = min(len(data), self._stdin_credit())
        if taken or (end and not data):
            self._queue.append((data[:taken], end and taken == len(data)))
            self._queued += taken
            self._empty.clear()
            self._work.set()
        return taken

    async def writable(self) -> None:
        """Return once everything handed over went to the daemon (or never can)."""
        await self._empty.wait()

    async def _send(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            while self._queue:
                data, end = self._queue.popleft()
                try:
                    for start in range(0, len(data), _STDIN_CHUNK):
                        chunk = data[start : start + _STDIN_CHUNK]
                        await self._ws.send_bytes(data_message(STDIN, chunk))
                    if end:
                        await self._ws.send_json(EOF.to_json())
                except ConnectionResetError:
                    self.ended(ConnectionLost("the exec stream closed before stdin was sent"))
                    return
                self._queued -= len(data)
                self.writer._flush()  # more room: what the writer holds moves up
            self._empty.set()

    def ended(self, error: VsockAsyncError) -> None:
        """The process or the stream ended: nothing more goes out."""
        self.writer._ended(error)
        self._sender.cancel()
        self._queue.clear()
        self._empty.set()


class RemoteProcess(Signalling):
    """A process in a guest, streamed through ``serve``'s exec WebSocket.

    Shaped like :class:`vsock_async.Process`: :attr:`pid`, :attr:`returncode`
    (``-N`` when signal N killed it), :attr:`exit_signal`, :attr:`timed_out`,
    :attr:`output_incomplete`; :attr:`stdout` and :attr:`stderr` are
    :class:`~vsock_async.ProcessReader` objects, :attr:`stdin` a
    :class:`~vsock_async.ProcessWriter`; :meth:`wait`, :meth:`send_signal`, :meth:`terminate`,
    :meth:`kill`, :meth:`resize`, :meth:`communicate`, :meth:`aclose`, ``async with``.

    Each output stream holds at most ``limit`` unread bytes; beyond that the
    WebSocket is not read, so the daemon and then the process wait. As with
    asyncio, a process whose output nobody reads may therefore never end.
    """

    def __init__(
        self, ws: aiohttp.ClientWebSocketResponse, request: ExecRequest, limit: int
    ) -> None:
        self._ws = ws
        self._pty = request.tty is not None
        self.pid: int | None = None
        """The process id in the guest (its process group id too)."""
        self.returncode: int | None = None
        """The exit code, ``-N`` if signal N killed it, None while it runs."""
        self.exit_signal: int | None = None
        """The number of the signal that killed it, or None."""
        self.timed_out = False
        """True if its ``timeout`` ran out and the agent stopped it."""
        self.output_incomplete = False
        """True if a background child held its output open at exit and was killed."""
        self._windows = {STDOUT: _Window(limit)}
        self.stdout = ProcessReader(limit, self._windows[STDOUT].grant)
        """The process's stdout (and its stderr too, with ``stderr=STDOUT`` or a ``pty``)."""
        self.stderr: ProcessReader | None = None
        """The process's stderr, or None when it is merged into stdout."""
        if not request.merges_stderr:
            self._windows[STDERR] = _Window(limit)
            self.stderr = ProcessReader(limit, self._windows[STDERR].grant)
        self._stdin = _WebSocketStdin(ws) if request.stdin else None
        self.stdin: ProcessWriter | None = self._stdin.writer if self._stdin else None
        """Where to write the process's stdin (with ``stdin=PIPE``), or None."""
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[None] = loop.create_future()
        self._exited: asyncio.Future[int] = loop.create_future()
        self._controls: set[asyncio.Future[None]] = set()
        self._receiver: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"returncode={self.returncode}"
        return f"<RemoteProcess pid={self.pid} {state}>"

    async def _start(self, request: ExecRequest) -> None:
        await self._ws.send_json(request.to_json())
        self._receiver = asyncio.ensure_future(self._receive())
        await asyncio.shield(self._started)

    # -- what the application calls -------------------------------------------------------

    async def wait(self) -> int:
        """Wait for the process to end; its :attr:`returncode`.

        Raises the stream's error (:class:`ControlError`, :class:`ConnectionLost`)
        if it ends without an exit.
        """
        return await asyncio.shield(self._exited)

    async def communicate(self, input: bytes | None = None) -> tuple[bytes | None, bytes | None]:
        """Send ``input`` (then EOF) to stdin, read stdout and stderr to the end, wait for
        exit; ``(stdout, stderr)``, None for a stream that is not piped."""
        return await communicate(self, input)

    def send_signal(self, sig: int) -> None:
        """Deliver signal ``sig`` to the process group (a terminal's foreground group).

        Does nothing once the process has ended, like ``subprocess.Popen``.
        """
        number = parse_signal(sig)
        if not self._exited.done():
            self._send_control(SendSignal(number).to_json())

    async def resize(self, rows: int, cols: int) -> None:
        """Set the size of the process's terminal (``pty``); it gets ``SIGWINCH``."""
        if not self._pty:
            raise UsageError("resize() needs a process started with pty=(rows, cols)")
        check_terminal_size(rows, cols)
        if not self._exited.done():
            with contextlib.suppress(ConnectionResetError):
                await self._ws.send_json(Resize(rows, cols).to_json())

    async def aclose(self) -> None:
        """Close the exec WebSocket; the daemon then stops the process if it still runs
        (SIGTERM to its group, SIGKILL after the agent's grace)."""
        if not self._exited.done():
            self._fail(ClosedLocally("the exec was closed by this client"))
        await self._ws.close()
        for task in (self._receiver, *self._controls):
            if task is not None:
                task.cancel()
        if self._stdin is not None:
            self._stdin.ended(ClosedLocally("the exec was closed by this client"))

    async def __aenter__(self) -> RemoteProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the WebSocket ----------------------------------------------------------------------

    def _send_control(self, message: dict[str, Any]) -> None:
        """Send a control message now, ahead of stdin not yet written (a task: this is sync)."""
        task = asyncio.ensure_future(self._ws.send_json(message))
        self._controls.add(task)
        task.add_done_callback(self._control_sent)

    def _control_sent(self, task: asyncio.Future[None]) -> None:
        self._controls.discard(task)
        if not task.cancelled():
            task.exception()  # a closed stream: the receiver reports it

    async def _receive(self) -> None:
        readers = {STDOUT: self.stdout, STDERR: self.stderr}
        try:
            async for message in self._ws:
                if message.type is aiohttp.WSMsgType.BINARY:
                    channel, data = split_data_message(message.data)
                    reader = readers.get(channel)
                    if reader is None:
                        raise ProtocolError(f"the daemon sent data on channel {channel}")
                    reader._feed(data, False)
                    window = self._windows[channel]
                    window.take(len(data))
                    await window.wait()
                elif message.type is aiohttp.WSMsgType.TEXT:
                    self._on_message(parse_server_message(message.data))
                else:
                    raise ConnectionLost(f"the exec stream failed: {message.data!r}")
            if not self._exited.done():
                raise ConnectionLost(
                    f"the daemon closed the exec stream (code {self._ws.close_code})"
                    " before the process exited"
                )
        except UsageError as exc:  # a data message with no channel byte
            self._fail(ProtocolError(f"the daemon sent a bad exec message: {exc}"))
        except VsockAsyncError as exc:
            self._fail(exc)

    def _on_message(self, message: Started | ExitStatus | StreamError) -> None:
        if isinstance(message, Started):
            self.pid = message.pid
            if not self._started.done():
                self._started.set_result(None)
        elif isinstance(message, ExitStatus):
            self.exit_signal = message.exit_signal
            code = message.exit_code
            self.returncode = -message.exit_signal if message.exit_signal is not None else code
            self.timed_out = message.timed_out
            self.output_incomplete = message.output_incomplete
            for reader in (self.stdout, self.stderr):
                if reader is not None:
                    reader._feed(b"", True)
            if self._stdin is not None:
                self._stdin.ended(
                    StdinClosed(f"process {self.pid} in the guest has exited; its stdin is closed")
                )
            if not self._exited.done():
                self._exited.set_result(self.returncode)
        else:
            self._fail(ControlError(message.status, message.code, message.message, message.body))

    def _fail(self, error: VsockAsyncError) -> None:
        """The stream ended without an exit: everything waiting gets ``error``."""
        for reader in (self.stdout, self.stderr):
            if reader is not None:
                reader._fail(error)
        if self._stdin is not None:
            self._stdin.ended(error)
        for future in (self._started, self._exited):
            if not future.done():
                future.set_exception(copy_error(error))
                future.exception()  # retrieved: nobody may ever await it

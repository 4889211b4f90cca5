"""The agent's side of a v2 connection: an :class:`AgentSession` driven by the event loop.

Standard library only. After the hello (answered in v1 framing by
:mod:`.agent`), the connection's bytes go to the session; each EXEC becomes a
:class:`~.process.Process` and each FILE a :class:`~.files.FileOperation` on
its own stream, running concurrently with the others. Output moves only within
the credit the host grants per stream and channel, and not at all while the
connection's write buffer is full, so one stalled reader never holds up
another stream. When the connection goes, every process it started is killed
(SIGKILL to its session) and reaped, and every file operation is given up (a
put's temporary file removed).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from ..errors import ProtocolError
from ..protocol.v2 import (
    DEFAULT_MAX_FRAME,
    AgentLimits,
    AgentSession,
    Channel,
    CloseRequested,
    CommitRequested,
    ExecRequested,
    FileRequested,
    FrameType,
    HelloRequest,
    OutputCredit,
    RequestFailed,
    ResizeRequested,
    SignalRequested,
    StdinData,
    write_pieces,
)
from .files import FileOperation, parse_file_request
from .paths import FilesRoot
from .process import Process
from .request import Refused, parse_exec
from .terminal import pty_available

__all__ = ["V2Connection", "V2Settings", "agent_name", "capabilities"]

_logger = logging.getLogger("vsock_async.agent")
_CHANNELS = tuple(Channel)
"""Each channel by its number: indexing costs far less than ``Channel(n)``, an enum lookup."""


@dataclass(frozen=True, slots=True)
class V2Settings:
    """How the agent runs v2 processes, and the limits it announces in its hello."""

    shell: str = "/bin/sh"
    output_grace: float | None = 1.0
    """Seconds to wait for EOF on a process's output after it exits (None: no limit)."""
    limits: AgentLimits = field(default_factory=AgentLimits)
    files_root: FilesRoot = field(default_factory=FilesRoot)
    """What file operations may touch (``--files-root``)."""


def capabilities() -> list[str]:
    """What this agent can do here: ``pty``/``resize`` if a terminal opens, ``user`` as root."""
    found = ["exec", "signal", "ping", "files", "brief"]
    if pty_available():
        found += ["pty", "resize"]
    if os.geteuid() == 0:
        found.append("user")
    return found


def agent_name() -> str:
    """``vsock_async/<version>`` for the hello answer.

    The version is looked up, not imported: the single-file agent has no package to import
    it from (it answers ``vsock_async/unknown`` unless its build defines ``__version__``).
    """
    version = getattr(sys.modules.get("vsock_async"), "__version__", None)
    return f"vsock_async/{version or globals().get('__version__', 'unknown')}"


class V2Connection(asyncio.BufferedProtocol):
    """One connection after the switch to v2. Hand it the transport with :meth:`attach`.

    ``on_lost`` is called with the transport's ``connection_lost`` argument once
    the connection is gone (the v1 protocol object it replaced uses it to finish).
    """

    def __init__(
        self,
        hello: HelloRequest,
        settings: V2Settings,
        capabilities: list[str],
        *,
        peer: Any = None,
        on_lost: Callable[[Exception | None], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        # Large STDIN frames come in pieces of one reused buffer; processes and puts copy them.
        self._session = AgentSession(hello, settings.limits, stream_data=True)
        self._settings = settings
        self._can_pty = "pty" in capabilities
        self._can_switch_user = "user" in capabilities
        # No read is larger than a frame the host takes (nor than 1 MiB, whatever it takes).
        self._max_read = min(hello.max_frame, DEFAULT_MAX_FRAME)
        self._peer = peer
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._processes: dict[int, Process] = {}
        self._files: dict[int, FileOperation] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused = False
        self._dead = False
        self._flush_due = False  # a flush is scheduled for the end of this loop iteration
        self._socket_fd = -1  # written directly only by a splice, when the transport is idle
        self.why = "closed by the agent"

    def attach(self, transport: asyncio.BaseTransport) -> None:
        """Take over ``transport`` (already switched to this protocol) and start reading."""
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        self._socket_fd = sock.fileno() if sock is not None else -1
        self._transport.resume_reading()

    # -- asyncio.BufferedProtocol --------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._session.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._session.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._abort(f"protocol error: {exc}")
            return
        self._handle_events()
        self._flush()

    def eof_received(self) -> bool:
        self.why = "the host closed the connection"
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._dead = True
        if exc is not None and self.why == "closed by the agent":
            self.why = f"connection lost: {exc}"
        if self._processes:
            _logger.info(
                "the connection is gone; killing its processes",
                extra={"fields": {"peer": self._peer, "processes": len(self._processes)}},
            )
        # Killed, not cancelled: a task that has not started yet still reaps its process.
        for process in self._processes.values():
            process.kill()
        for operation in self._files.values():
            operation.kill()
        if self._on_lost is not None:
            self._on_lost(exc)

    def pause_writing(self) -> None:
        # The host is not reading: send no output and read no requests (each may want an answer).
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()
        self._credit_changed()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
        self._credit_changed()

    # -- control -------------------------------------------------------------------------

    async def wait_finished(self) -> None:
        """Wait until every process of this connection has been reaped."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        """Close the connection at once; its processes are killed and reaped."""
        if self._transport is not None:
            self._transport.abort()

    def _abort(self, why: str) -> None:
        self._dead = True
        self.why = why
        _logger.warning(
            "closing a v2 connection", extra={"fields": {"peer": self._peer, "why": why}}
        )
        self.close()

    # -- events --------------------------------------------------------------------------

    def _handle_events(self) -> None:
        session = self._session
        while (event := session.next_event()) is not None:
            if isinstance(event, ExecRequested):
                self._exec(event)
                continue
            if isinstance(event, FileRequested):
                self._file(event)
                continue
            if isinstance(event, RequestFailed):
                _logger.info(
                    "the host refused a frame",
                    extra={"fields": {"stream": event.stream, "code": event.code}},
                )
                continue
            operation = self._files.get(event.stream)
            if operation is not None:
                if isinstance(event, StdinData):
                    operation.write(event.data, event.end)
                elif isinstance(event, CommitRequested):
                    operation.commit(event.sha256)
                elif isinstance(event, OutputCredit):
                    operation.credit_changed()
                elif isinstance(event, CloseRequested):
                    operation.close()
                continue
            process = self._processes.get(event.stream)
            if process is None:  # its EXIT is out already; the host's frame crossed it
                continue
            if isinstance(event, OutputCredit):
                process.credit_changed()
            elif isinstance(event, StdinData):
                process.write_stdin(event.data, event.end)
            elif isinstance(event, SignalRequested):
                try:
                    process.send_signal(event.signal)
                except (OSError, ValueError) as exc:
                    session.request_failed(
                        event.stream, FrameType.SIGNAL, "bad_request", f"cannot signal: {exc}"
                    )
            elif isinstance(event, ResizeRequested):
                try:
                    process.resize(event.rows, event.cols)
                except Refused as refused:
                    session.request_failed(
                        event.stream, FrameType.RESIZE, refused.code, refused.message
                    )
                except OSError as exc:
                    session.request_failed(
                        event.stream, FrameType.RESIZE, "internal", f"cannot resize: {exc}"
                    )
            elif isinstance(event, CloseRequested):
                process.close()

    def _exec(self, event: ExecRequested) -> None:
        stream, session = event.stream, self._session
        try:
            spec = parse_exec(
                event.request,
                max_argv_bytes=self._settings.limits.max_argv_bytes,
                can_switch_user=self._can_switch_user,
                can_pty=self._can_pty,
            )
            process = Process(
                spec,
                _Link(self, stream),
                shell=self._settings.shell,
                output_grace=self._settings.output_grace,
                max_read=self._max_read,
            )
        except Refused as refused:
            _logger.info(
                "refused an EXEC",
                extra={"fields": {"stream": stream, "code": refused.code, "errno": refused.errno}},
            )
            session.exec_failed(stream, refused.code, refused.message, refused.errno)
            return
        session.started(stream, process.pid)
        self._processes[stream] = process
        task = self._loop.create_task(self._supervise(stream, process))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _file(self, event: FileRequested) -> None:
        stream = event.stream
        try:
            spec = parse_file_request(event.request, can_chown=self._can_switch_user)
        except Refused as refused:
            _logger.info(
                "refused a file request",
                extra={"fields": {"stream": stream, "code": refused.code}},
            )
            self._session.file_failed(stream, refused.code, refused.message, refused.errno)
            return
        operation = FileOperation(
            spec,
            _Link(self, stream),
            self._settings.files_root,
            max_read=self._max_read,
            window=self._settings.limits.file_window,
        )
        self._files[stream] = operation
        task = self._loop.create_task(self._carry_out(stream, operation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _carry_out(self, stream: int, operation: FileOperation) -> None:
        started = time.monotonic()
        try:
            outcome = await operation.run()
        except Exception:
            _logger.exception("a file operation failed unexpectedly; closing the connection")
            self._abort("the agent failed to carry out a file operation")
            return
        finally:
            self._files.pop(stream, None)
        _logger.info(
            "file operation ended",
            extra={
                "fields": {
                    "stream": stream,
                    "op": operation.spec.op,
                    "path": os.fsdecode(operation.spec.path),
                    "outcome": outcome,
                    "seconds": round(time.monotonic() - started, 3),
                }
            },
        )

    async def _supervise(self, stream: int, process: Process) -> None:
        started = time.monotonic()
        try:
            await process.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            _logger.exception("supervising a process failed; closing the connection")
            self._abort("the agent failed to supervise a process")
            return
        finally:
            self._processes.pop(stream, None)
        if not _logger.isEnabledFor(logging.INFO):  # build the fields only for a line written
            return
        _logger.info(
            "process exited",
            extra={
                "fields": {
                    "stream": stream,
                    "pid": process.pid,
                    "returncode": process.proc.returncode,
                    "timed_out": process.timed_out,
                    "seconds": round(time.monotonic() - started, 3),
                }
            },
        )

    # -- sending -------------------------------------------------------------------------

    def _flush(self) -> None:
        """Write the queued frames: small pieces joined, large payloads as they are."""
        self._flush_due = False
        transport = self._transport
        chunks = self._session.data_to_send()
        if not chunks or transport is None or transport.is_closing():
            return
        for piece in write_pieces(chunks):
            transport.write(piece)

    def _flush_soon(self) -> None:
        """Flush once the callbacks of this loop iteration have run, so that the small frames
        they queue leave in one write: as a process exits, END on both channels and EXIT (the
        pipes' EOF and the exit are noticed in one turn of the loop)."""
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _credit_changed(self) -> None:
        for process in list(self._processes.values()):
            process.credit_changed()
        for operation in self._files.values():
            operation.credit_changed()


def _read_exactly(fd: int, n: int) -> bytes | None:
    """``n`` bytes of pipe ``fd``, over as many reads as it takes (a packet-mode pipe, one
    its writer set ``O_DIRECT`` on, gives one write's bytes per read); None if it runs dry."""
    chunks = []
    while n:
        try:
            chunk = os.read(fd, n)
        except BlockingIOError:
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Link:
    """One stream's view of its connection (a :class:`~.process.StreamLink` or a
    :class:`~.files.FileLink`)."""

    __slots__ = ("_conn", "_stream")

    def __init__(self, conn: V2Connection, stream: int) -> None:
        self._conn = conn
        self._stream = stream

    def credit(self, channel: int) -> int:
        conn = self._conn
        if conn._paused or conn._dead:
            return 0
        return conn._session.credit(self._stream, _CHANNELS[channel])

    def splice_output(self, channel: int, fd: int, n: int) -> bool:
        """The frame's header, then ``n`` bytes moved from pipe ``fd`` to the socket by the
        kernel (``splice``), straight onto the socket while the transport holds nothing to
        send (so nothing can come between or before them); whatever the socket does not take
        at once is read and handed to the transport. False: the transport holds data, or
        the socket cannot be spliced to."""
        conn = self._conn
        transport = conn._transport
        if conn._dead or conn._paused or transport is None or conn._socket_fd < 0:
            return False
        conn._flush()  # frames queued before this one go first
        if transport.get_write_buffer_size() or transport.is_closing():
            return False
        header = conn._session.output_header(self._stream, _CHANNELS[channel], n)
        sock, sent, moved = conn._socket_fd, 0, 0
        with contextlib.suppress(OSError):  # full, or broken: the transport finds out which
            sent = os.write(sock, header)
        if sent < len(header):
            transport.write(header[sent:])
        else:
            try:
                moved = os.splice(fd, sock, n, flags=os.SPLICE_F_NONBLOCK)
            except OSError as exc:  # full (EAGAIN) or short of memory: the rest is read below
                if exc.errno == errno.EINVAL:  # a socket splice cannot write to: read from now on
                    conn._socket_fd = -1
        if moved < n:
            rest = _read_exactly(fd, n - moved)
            if rest is None:
                # Only a process of the agent's own user that reads its own output pipe can
                # take bytes FIONREAD counted; the frame announced cannot be completed.
                conn._abort("a process's output pipe ran dry in the middle of a frame")
                return True
            transport.write(rest)
        return True

    def send_output(self, channel: int, data: bytes, end: bool) -> None:
        conn = self._conn
        if not conn._dead:
            conn._session.send_output(self._stream, _CHANNELS[channel], data, end)
            if data:  # output at once: the transport pauses us when the host reads slowly
                conn._flush()
            else:
                conn._flush_soon()

    def stdin_consumed(self, n: int) -> None:
        conn = self._conn
        if not conn._dead:
            conn._session.stdin_consumed(self._stream, n)
            conn._flush_soon()

    def file_done(self, result: Mapping[str, Any]) -> None:
        conn = self._conn
        if not conn._dead:
            conn._session.file_done(self._stream, result)
            conn._flush_soon()

    def file_failed(self, code: str, message: str, errno: str | None) -> None:
        conn = self._conn
        if not conn._dead:
            conn._session.file_failed(self._stream, code, message, errno)
            conn._flush_soon()

    def exited(
        self, exit_code: int | None, signal: int | None, timed_out: bool, output_incomplete: bool
    ) -> None:
        conn = self._conn
        if not conn._dead:
            conn._session.exited(
                self._stream,
                exit_code=exit_code,
                signal=signal,
                timed_out=timed_out,
                output_incomplete=output_incomplete,
            )
            conn._flush_soon()

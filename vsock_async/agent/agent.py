"""``GuestAgent``: the guest side of protocols v1 and v2. Standard library only.

It dials the host (redialling with capped exponential backoff and jitter
whenever the connection goes) or, with ``listen=True``, waits for the host
to dial in. Each connection answers one command at a time; while a command
runs the agent stops reading that connection (a host that pipelines gets
read-side back-pressure) and watches it only for a hang-up, which kills the
command's process group. See :mod:`vsock_async.agent.runner` for how a
command runs. A v1 command that is the v2 hello is answered without a shell,
and the connection is handed to :class:`~vsock_async.agent.v2.V2Connection`.

Each dialling slot (or the accepting loop) is a worker under :meth:`GuestAgent.run`'s
watch: a worker that fails is logged with its traceback and restarted after a
backoff; one that fails :data:`WORKER_FAILURES` times within
:data:`WORKER_FAILURE_WINDOW` seconds stops the agent, so that its supervisor
(systemd) sees it exit and can act, instead of an agent alive with no connection.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import select
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, cast

from .._sockets import (
    FORBID_VSOCK_CONNECT_ENV,
    SocketFile,
    bind_listener,
    connect_socket,
    vsock_connect_forbidden,
)
from ..addresses import (
    Address,
    HybridVsockAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)
from ..errors import ConnectFailed, ProtocolError, UsageError
from ..protocol import (
    PROBE_COMMAND,
    U32_MAX,
    Command,
    CommandDecoder,
    Limits,
    OversizedCommand,
    result_frame_parts,
)
from ..protocol.v2 import AgentLimits, HelloRequest, hello_answer, parse_hello_command
from ..timeouts import check_timeout
from .paths import FilesRoot
from .runner import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_OUTPUT_GRACE,
    Outcome,
    refuse,
    run_command,
)
from .signals import default_signals_for_commands
from .v2 import V2Connection, V2Settings, agent_name, capabilities

__all__ = [
    "AGENT_DEFAULT_ADDRESS",
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_OUTPUT_GRACE",
    "WORKER_FAILURES",
    "WORKER_FAILURE_WINDOW",
    "GuestAgent",
]

AGENT_DEFAULT_ADDRESS = "vsock://host:1024"
WORKER_FAILURES = 5
WORKER_FAILURE_WINDOW = 60.0
"""A worker failing :data:`WORKER_FAILURES` times within this many seconds stops the agent."""
_CONNECT_TIMEOUT = 10.0
_WRITE_SLICE = 1024 * 1024
_JOIN_MAX = 64 * 1024  # a result frame up to this size is joined and sent in one write

logger = logging.getLogger("vsock_async.agent")


class GuestAgent:
    """Answers the host's commands: ``await agent.run()`` until :meth:`stop` is called.

    ``address`` is dialled (default ``vsock://host:1024``), or listened on
    with ``listen=True``. ``connections`` connections are kept open (or
    accepted at once), so the host can run that many commands concurrently.
    """

    def __init__(
        self,
        address: str | Address | None = None,
        *,
        listen: bool = False,
        connections: int = 1,
        shell: str = "/bin/sh",
        command_timeout: float | None = None,
        max_command: int = Limits().max_command,
        max_output: int = DEFAULT_MAX_OUTPUT,
        output_grace: float | None = DEFAULT_OUTPUT_GRACE,
        max_streams: int = AgentLimits().max_streams,
        files_root: str = "/",
        reconnect_delay: float = 0.1,
        max_reconnect_delay: float = 5.0,
    ) -> None:
        if address is None:
            if listen:
                raise UsageError("listen=True needs an address to listen on")
            address = AGENT_DEFAULT_ADDRESS
        self.address: Address = parse_address(address)
        if isinstance(self.address, HybridVsockAddress):
            raise UsageError(
                f"{self.address} is a host-side address; a guest dials vsock://host:PORT"
                " (the VMM forwards it to the host's hvsock listener)"
            )
        self.listen = listen
        if isinstance(connections, bool) or not isinstance(connections, int) or connections < 1:
            raise UsageError(f"connections must be an int >= 1, not {connections!r}")
        self.connections = connections
        self.shell = shell
        self.command_timeout = check_timeout(command_timeout, "command_timeout")
        if self.command_timeout == 0:
            raise UsageError(
                "command_timeout of 0 s would kill every command as it starts: give a number"
                " of seconds > 0, or None (--command-timeout none) for no limit"
            )
        self.max_command = _byte_count(max_command, "max_command")
        self.max_output = _byte_count(max_output, "max_output")
        self.output_grace = check_timeout(output_grace, "output_grace")
        if isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 1:
            raise UsageError(f"max_streams must be an int >= 1, not {max_streams!r}")
        try:
            root = FilesRoot(files_root)
        except OSError as exc:
            raise UsageError(f"files_root {files_root!r} is not a directory: {exc}") from None
        self.v2 = V2Settings(
            shell, self.output_grace, AgentLimits(max_streams=max_streams), files_root=root
        )
        """How v2 connections run processes, and the limits they announce."""
        self._capabilities: list[str] | None = None
        self.reconnect_delay = _delay(reconnect_delay, "reconnect_delay")
        self.max_reconnect_delay = _delay(max_reconnect_delay, "max_reconnect_delay")
        self._stop: asyncio.Event | None = None
        self._open: set[_AgentConnection] = set()
        self.commands_answered = 0
        """Commands answered since the agent started, probes included."""

    def __repr__(self) -> str:
        mode = "listen" if self.listen else "connect"
        return f"<GuestAgent {mode} {self.address} open={len(self._open)}/{self.connections}>"

    @property
    def connections_open(self) -> int:
        """Connections to the host open right now."""
        return len(self._open)

    async def run(self) -> None:
        """Serve until :meth:`stop`; running commands are killed on the way out.

        Raises :class:`ListenFailed` if ``listen=True`` and the address cannot
        be bound, and :class:`ConnectFailed` at once if dialling AF_VSOCK is
        forbidden in this process; other connection failures are retried.
        A worker that fails unexpectedly is logged and restarted; one that fails
        :data:`WORKER_FAILURES` times within :data:`WORKER_FAILURE_WINDOW` seconds
        makes ``run()`` stop everything and raise an :class:`ExceptionGroup` holding
        its last exception. Called in the main thread, it first makes sure the commands it
        starts get every signal at its default (:mod:`.signals`).
        """
        if self._stop is not None:
            raise UsageError("this GuestAgent is already running")
        dialing_vsock = not self.listen and isinstance(self.address, VsockAddress)
        if dialing_vsock and vsock_connect_forbidden():
            raise ConnectFailed(
                f"refusing to dial {self.address}: AF_VSOCK connects are forbidden in this"
                f" process ({FORBID_VSOCK_CONNECT_ENV}=1); give a unix: or tcp:// address"
            )
        default_signals_for_commands()
        listener = socket_file = None
        if self.listen:
            listener = bind_listener(self.address, backlog=self.connections)
            if isinstance(self.address, UnixAddress):
                socket_file = SocketFile(self.address.path)
        self._stop = stop = asyncio.Event()
        if listener is not None:
            accepting = functools.partial(self._accept_forever, listener)
            workers = [asyncio.create_task(self._supervise(accepting, "accept"))]
            logger.info("agent listening", extra={"fields": {"address": str(self.address)}})
        else:
            workers = [
                asyncio.create_task(
                    self._supervise(functools.partial(self._dial_forever, slot), f"dial {slot}")
                )
                for slot in range(self.connections)
            ]
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stopped, *workers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            for worker in workers:
                worker.cancel()
            await asyncio.gather(stopped, *workers, return_exceptions=True)
            if listener is not None:
                listener.close()
            if socket_file is not None:
                socket_file.remove()
            self._stop = None
            logger.info("agent stopped", extra={"fields": {"address": str(self.address)}})
        for worker in workers:
            failure = None if worker.cancelled() else worker.exception()
            if failure is not None:
                raise failure

    def stop(self) -> None:
        """Make :meth:`run` return: connections close, running commands are killed."""
        if self._stop is not None:
            self._stop.set()

    # -- connections ---------------------------------------------------------------------

    async def _supervise(
        self, work: Callable[[], Coroutine[Any, Any, NoReturn]], worker: str
    ) -> NoReturn:
        """Run ``work`` (it runs until cancelled); restart it with backoff when it fails.

        Raises an :class:`ExceptionGroup` with the failure once ``work`` has failed
        :data:`WORKER_FAILURES` times within :data:`WORKER_FAILURE_WINDOW` seconds.
        """
        failed_at: list[float] = []
        while True:
            try:
                await work()
            except Exception as exc:
                now = time.monotonic()
                failed_at = [t for t in failed_at if now - t < WORKER_FAILURE_WINDOW] + [now]
                fields = {"worker": worker, "error": repr(exc), "failures": len(failed_at)}
                if len(failed_at) >= WORKER_FAILURES:
                    logger.error(
                        "a connection worker keeps failing; the agent stops",
                        exc_info=True,
                        extra={"fields": fields},
                    )
                    raise ExceptionGroup(
                        f"a connection worker failed {len(failed_at)} times within"
                        f" {WORKER_FAILURE_WINDOW:g} s",
                        [exc],
                    ) from None
                delay = self._backoff(len(failed_at))
                logger.error(
                    "a connection worker failed; restarting it",
                    exc_info=True,
                    extra={"fields": {**fields, "retry_in": round(delay, 3)}},
                )
                await asyncio.sleep(delay)

    async def _dial_forever(self, slot: int) -> NoReturn:
        failures = 0
        while True:
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT):
                    sock = await connect_socket(self.address)
            except (ConnectFailed, TimeoutError) as exc:
                failures += 1
                delay = self._backoff(failures)
                logger.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "cannot reach the host; retrying",
                    extra={
                        "fields": {
                            "slot": slot,
                            "error": str(exc) or "connect timed out",
                            "attempt": failures,
                            "retry_in": round(delay, 3),
                        }
                    },
                )
                await asyncio.sleep(delay)
                continue
            logger.info(
                "connected to the host",
                extra={"fields": {"slot": slot, "address": str(self.address)}},
            )
            answered = await self._serve(sock)
            failures = 0 if answered else failures + 1
            await asyncio.sleep(self._backoff(max(failures, 1)))

    async def _accept_forever(self, listener: socket.socket) -> NoReturn:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.connections)
        serving: set[asyncio.Task[int]] = set()

        async def serve(sock: socket.socket) -> int:
            try:
                return await self._serve(sock)
            finally:
                slots.release()

        try:
            while True:
                await slots.acquire()
                try:
                    sock, _ = await loop.sock_accept(listener)
                except OSError as exc:
                    slots.release()
                    logger.warning("accept failed", extra={"fields": {"error": str(exc)}})
                    await asyncio.sleep(self.reconnect_delay)
                    continue
                except BaseException:
                    slots.release()
                    raise
                task = asyncio.create_task(serve(sock))
                serving.add(task)
                task.add_done_callback(serving.discard)
        finally:
            for task in serving:
                task.cancel()
            await asyncio.gather(*serving, return_exceptions=True)

    async def _serve(self, sock: socket.socket) -> int:
        """Answer commands on one connection until it closes; return how many were answered."""
        loop = asyncio.get_running_loop()
        conn = _AgentConnection(self)
        try:
            await loop.connect_accepted_socket(lambda: conn, sock)
        except OSError as exc:
            sock.close()
            logger.warning("cannot use a new connection", extra={"fields": {"error": str(exc)}})
            return 0
        except BaseException:
            sock.close()
            raise
        self._open.add(conn)
        try:
            await conn.wait_closed()
        finally:
            conn.close()
            await conn.wait_finished()
            self._open.discard(conn)
        logger.info(
            "connection closed",
            extra={"fields": {"peer": conn.peer, "answered": conn.answered, "why": conn.why}},
        )
        return conn.answered

    def _backoff(self, failures: int) -> float:
        """Capped exponential backoff with jitter (half to all of the capped delay)."""
        delay = min(self.max_reconnect_delay, self.reconnect_delay * 2 ** min(failures - 1, 30))
        return random.uniform(delay / 2, delay)

    @property
    def capabilities(self) -> list[str]:
        """What this agent announces it can do on v2 (found out once)."""
        if self._capabilities is None:
            self._capabilities = capabilities()
        return self._capabilities

    async def _outcome(self, command: Command | OversizedCommand) -> Outcome:
        """What the agent answers for one decoded command frame."""
        if isinstance(command, OversizedCommand):
            return refuse(
                f"the command of {command.length} bytes is longer than the agent's limit of"
                f" {command.limit} bytes (--max-command); it was discarded, not run",
                self.max_output,
            )
        if command.command == PROBE_COMMAND:
            return Outcome(b"", b"", 0)
        return await run_command(
            command.command,
            shell=self.shell,
            timeout=self.command_timeout,
            max_output=self.max_output,
            grace=self.output_grace,
        )


class _AgentConnection(asyncio.BufferedProtocol):
    """One connection to the host: decodes commands, answers them one at a time, in order."""

    def __init__(self, agent: GuestAgent) -> None:
        self._agent = agent
        self._loop = asyncio.get_running_loop()
        self._decoder = CommandDecoder(agent.max_command, skip_oversized=True)
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._writable: asyncio.Future[None] | None = None
        self._write_paused = False
        self._hangup: select.epoll | None = None
        self._watching = False
        self._v2: V2Connection | None = None
        self.peer: Any = None
        self.answered = 0
        self.why = "closed by the agent"

    # -- asyncio.BufferedProtocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        # The transport's reader is off while a command runs; this epoll, registered for
        # hang-ups only, is what notices the host going away meanwhile.
        self._hangup = select.epoll()
        self._hangup.register(sock.fileno(), select.EPOLLRDHUP)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._abort(f"protocol error: {exc}")
            return
        self._next()

    def eof_received(self) -> bool:
        self.why = "the host closed the connection"
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.why == "closed by the agent":
            self.why = f"connection lost: {exc}"
        self._unwatch()
        if self._hangup is not None:
            self._hangup.close()
        if self._task is not None:
            self._task.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- control -------------------------------------------------------------------------

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def wait_finished(self) -> None:
        """Wait until the command being answered (if any) has been killed and reaped."""
        task = self._task
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        if self._v2 is not None:
            await self._v2.wait_finished()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _abort(self, why: str) -> None:
        self.why = why
        self.close()

    # -- exchanges -----------------------------------------------------------------------

    def _next(self) -> None:
        """Start answering the next decoded command, if none is being answered."""
        if self._task is not None or self._closed.done():
            return
        command = self._decoder.next_event()
        if command is None:
            return
        if isinstance(command, Command):
            hello = parse_hello_command(command.command)
            if hello is not None and self._switch_to_v2(hello):
                return
        assert self._transport is not None
        self._transport.pause_reading()
        self._watch()
        self._task = self._loop.create_task(self._answer(command))

    def _switch_to_v2(self, hello: HelloRequest) -> bool:
        """Answer the hello and hand the transport to a v2 connection; False: stay on v1.

        With no version in common the hello is an ordinary command (``:``, a no-op).
        """
        agent = self._agent
        assert self._transport is not None
        answer = hello_answer(hello, agent.v2.limits, agent.capabilities, agent_name())
        if answer is None:
            return False
        if self._decoder.in_frame or self._decoder.next_event() is not None:
            self._abort("protocol error: the host sent bytes after its hello, before the answer")
            return True
        self._transport.writelines(result_frame_parts(answer, b"", 0))
        self.answered += 1
        agent.commands_answered += 1
        self._v2 = V2Connection(
            hello, agent.v2, agent.capabilities, peer=self.peer, on_lost=self._v2_lost
        )
        self._transport.set_protocol(self._v2)
        self._v2.attach(self._transport)
        logger.info("switched to protocol v2", extra={"fields": {"peer": self.peer}})
        return True

    def _v2_lost(self, exc: Exception | None) -> None:
        assert self._v2 is not None
        self.why = self._v2.why
        self.connection_lost(exc)

    async def _answer(self, command: Command | OversizedCommand) -> None:
        agent = self._agent
        started = time.monotonic()
        try:
            outcome = await agent._outcome(command)
        except Exception:
            logger.exception("answering a command failed; closing the connection")
            self._abort("the agent failed to answer a command")
            return
        assert self._transport is not None
        if self._transport.is_closing():
            return
        await self._send(result_frame_parts(outcome.stdout, outcome.stderr, outcome.exit_code))
        if self._transport.is_closing():
            return
        self.answered += 1
        agent.commands_answered += 1
        _log_answer(command, outcome, time.monotonic() - started)
        self._task = None
        self._unwatch()
        if self._transport.is_closing():
            return
        self._next()
        if self._task is None:
            self._transport.resume_reading()

    async def _send(self, parts: list[bytes | bytearray]) -> None:
        """Write a result frame a slice at a time, each once the transport has drained.

        A small frame goes out joined, in one write: one system call, and the host reads the
        whole result at once. A larger one's output buffers are written from, never joined,
        and the transport never holds more than about a slice (Python 3.11 copies what it
        cannot send at once).
        """
        assert self._transport is not None
        if sum(map(len, parts)) <= _JOIN_MAX:
            parts = [b"".join(parts)]
        for part in parts:
            view = memoryview(part)
            for start in range(0, len(view), _WRITE_SLICE):
                self._transport.write(view[start : start + _WRITE_SLICE])
                while self._write_paused and not self._transport.is_closing():
                    self._writable = self._loop.create_future()
                    await self._writable
                if self._transport.is_closing():
                    return

    def _watch(self) -> None:
        if self._hangup is not None and not self._watching:
            self._loop.add_reader(self._hangup.fileno(), self._on_hangup)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching and self._hangup is not None:
            self._loop.remove_reader(self._hangup.fileno())
            self._watching = False

    def _on_hangup(self) -> None:
        self._unwatch()
        if self._task is not None:
            logger.info(
                "the host went away while a command ran; killing its process group",
                extra={"fields": {"peer": self.peer}},
            )
        self._abort("the host closed the connection")


def _log_answer(command: Command | OversizedCommand, outcome: Outcome, seconds: float) -> None:
    if isinstance(command, OversizedCommand):
        logger.warning(
            "refused an oversized command",
            extra={"fields": {"command_bytes": command.length, "limit": command.limit}},
        )
        return
    probe = command.command == PROBE_COMMAND
    logger.log(
        logging.DEBUG if probe else logging.INFO,
        "probe answered" if probe else "command answered",
        extra={
            "fields": {
                "command_bytes": len(command.command),
                "exit_code": outcome.exit_code,
                "stdout_bytes": len(outcome.stdout),
                "stderr_bytes": len(outcome.stderr),
                "seconds": round(seconds, 3),
            }
        },
    )


def _delay(value: Any, what: str) -> float:
    """A wait between attempts: seconds by the rule of :mod:`vsock_async.timeouts`, not None."""
    seconds = check_timeout(value, what)
    if seconds is None:
        raise UsageError(f"{what} must be a number of seconds >= 0, not None")
    return seconds


def _byte_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U32_MAX:
        raise UsageError(f"{what} must be a number of bytes in 0..{U32_MAX}, not {value!r}")
    return value

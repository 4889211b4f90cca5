"""The hello on a new connection: agree on v2 inside one ordinary v1 exchange, or stay on v1.

With ``protocol="auto"`` (the default of :func:`listen` and :func:`connect`)
the host's first exchange on every new connection is the hello command, which
a v1 shell runs as the no-op ``:``. A v2 agent answers with its limits and
capabilities, echoing the nonce; only that switches the connection to v2
(:class:`~vsock_async.host.session.SessionConnection`). Any other answer
keeps it on v1 (:class:`~vsock_async.host.transport.GuestConnection`), with a
warning unless it was the plain ``:`` answer of a v1 guest. ``"v2"`` requires
the switch (:class:`ProtocolError` and the connection closed otherwise);
``"v1"`` never sends the hello. A hello costs one round trip per connection.

The exchange is read byte-exactly: the socket is never asked for a byte
beyond the answer, so whatever follows it (the first v2 frames) reaches the
protocol that owns the connection next, untouched.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import weakref
from typing import Final, Literal

from ..errors import ConnectionLost, ConnectTimeout, FrameTooLarge, ProtocolError, UsageError
from ..protocol import Limits, encode_command
from ..protocol.v2 import (
    DEFAULT_MAX_FRAME,
    MAX_HELLO_ANSWER,
    hello_answer_problem,
    hello_command,
    new_nonce,
    parse_hello_answer,
)
from ..results import CommandResult
from .session import SessionConnection
from .transport import GuestConnection

__all__ = [
    "DEFAULT_NEGOTIATE_TIMEOUT",
    "ProtocolChoice",
    "check_protocol",
    "negotiate",
]

logger = logging.getLogger("vsock_async")

ProtocolChoice = Literal["auto", "v1", "v2"]
"""``protocol=`` of :func:`listen` and :func:`connect`."""

DEFAULT_NEGOTIATE_TIMEOUT: Final = 5.0
"""Seconds a new connection's guest has to answer the hello before it is closed."""

_CHOICES: Final = ("auto", "v1", "v2")
_U32 = struct.Struct(">I")
_SKIP_CHUNK = 64 * 1024


def check_protocol(protocol: object) -> ProtocolChoice:
    """``protocol`` if it is ``"auto"``, ``"v1"`` or ``"v2"``; :class:`UsageError` otherwise."""
    if protocol not in _CHOICES:
        raise UsageError(f"protocol must be 'auto', 'v1' or 'v2', not {protocol!r}")
    return protocol


def negotiate(
    conn: GuestConnection, *, require_v2: bool, timeout: float | None
) -> asyncio.Future[GuestConnection | SessionConnection]:
    """Send the hello on the new connection ``conn``; the future gets the connection to use.

    That is ``conn`` itself when the guest stays on v1, or a new
    :class:`SessionConnection` that now owns the transport. The future fails
    (and the connection is closed) with :class:`ProtocolError` (v2 required
    but not given, or a broken answer), :class:`ConnectTimeout` (no answer
    within ``timeout`` seconds, logged) or the connection's own error.
    """
    negotiator = _Negotiator(conn, require_v2)
    negotiator.start(timeout)
    return negotiator.result


class _ResultReader:
    """One v1 result frame, read without ever asking for a byte beyond it.

    Each buffer lent is exactly the rest of the current field, so a
    ``recv_into`` cannot read past the frame. A body larger than any hello
    answer is read through a small scratch and dropped (the guest is not
    speaking v2 then; only its length is kept).
    """

    def __init__(self, limits: Limits) -> None:
        self._caps = (limits.max_stdout, limits.max_stderr)
        self._names = ("stdout", "stderr")
        self._bodies: list[bytes] = []
        self._lengths: list[int] = []
        self._buffer = bytearray(4)
        self._filled = 0
        self._skipping = 0  # bytes of an oversized body still to drop
        self.result: CommandResult | None = None

    def get_buffer(self) -> memoryview:
        if self._skipping:
            return memoryview(self._buffer)[: min(self._skipping, len(self._buffer))]
        return memoryview(self._buffer)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._skipping:
            self._skipping -= nbytes
            if not self._skipping:
                self._body_done(b"")
            return
        self._filled += nbytes
        if self._filled < len(self._buffer):
            return
        data = bytes(self._buffer)
        field = len(self._lengths) + len(self._bodies)  # prefix, body, prefix, body, exit code
        if field == 4:
            stdout, stderr = self._bodies
            self.result = CommandResult(stdout, stderr, data[0])
        elif field % 2 == 0:
            (length,) = _U32.unpack(data)
            cap = self._caps[field // 2]
            if length > cap:
                raise FrameTooLarge(f"{self._names[field // 2]} of the hello answer", length, cap)
            self._lengths.append(length)
            if length > MAX_HELLO_ANSWER:
                self._skipping = length
                self._buffer = bytearray(_SKIP_CHUNK)
            elif length:
                self._next(length)
            else:
                self._body_done(b"")
        else:
            self._body_done(data)

    def _body_done(self, body: bytes) -> None:
        self._bodies.append(body)
        self._next(1 if len(self._bodies) == 2 else 4)

    def _next(self, size: int) -> None:
        self._buffer = bytearray(size)
        self._filled = 0

    @property
    def lengths(self) -> list[int]:
        return self._lengths


class _Negotiator(asyncio.BufferedProtocol):
    """Owns a new connection's transport for the hello exchange, then hands it on."""

    def __init__(self, conn: GuestConnection, require_v2: bool) -> None:
        self._conn = conn
        self._require_v2 = require_v2
        self._nonce = new_nonce()
        self._reader = _ResultReader(conn.limits)
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self.result: asyncio.Future[GuestConnection | SessionConnection] = (
            self._loop.create_future()
        )

    def start(self, timeout: float | None) -> None:
        conn = self._conn
        transport = conn.transport
        if transport is None or conn.closed:
            self._fail(ConnectionLost("the connection closed before the protocol hello"))
            return
        transport.set_protocol(self)
        frame = encode_command(hello_command(self._nonce, DEFAULT_MAX_FRAME))
        conn.bytes_sent += len(frame)
        transport.write(frame)
        if timeout is not None:
            self._timer = self._loop.call_later(timeout, self._expired, timeout)

    # -- asyncio.BufferedProtocol --------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._conn.bytes_received += nbytes
        try:
            self._reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._fail(exc)
            return
        if self._reader.result is not None:
            self._decide(self._reader.result)

    def eof_received(self) -> bool:
        self._fail(ConnectionLost("the guest closed the connection during the protocol hello"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.result.done():
            reason = f": {exc}" if exc else ""
            error = self._conn.error or ConnectionLost(
                f"the connection was lost during the protocol hello{reason}"
            )
            self.result.set_exception(error)
            self.result.exception()  # a server, or a cancelled connect(), never awaits it
        self._conn.connection_lost(exc)  # the v1 protocol object owns the connection's end

    # -- the outcome ---------------------------------------------------------------------

    def _decide(self, result: CommandResult) -> None:
        conn = self._conn
        transport = conn.transport
        assert transport is not None
        if self._timer is not None:
            self._timer.cancel()
        answer = parse_hello_answer(result, self._nonce)
        if answer is not None:
            session = SessionConnection(answer, limits=conn.limits, max_frame=DEFAULT_MAX_FRAME)
            session.bytes_sent, session.bytes_received = conn.bytes_sent, conn.bytes_received
            transport.set_protocol(session)
            session.connection_made(transport)
            # Whoever still holds the v1 object (a server whose aclose() lands before it
            # admits the session) waits on it: it sees the connection's end too. Held
            # weakly: once nobody holds it, the v1 object (its core, decoder and scratch)
            # is not kept for the life of the session.
            held = weakref.ref(conn)
            session.add_close_callback(lambda _: _tell_lost(held))
            logger.debug(
                "guest %s speaks protocol v%s (%s)", conn.peer, answer.version, answer.agent
            )
            self.result.set_result(session)
            return
        problem = self._problem(result)
        if self._require_v2:
            if problem is None:
                message = (
                    "the guest speaks only v1 (it answered the protocol hello as a plain ':');"
                    " protocol='v2' requires v2: upgrade its agent, or use protocol='auto'"
                )
            else:
                message = f"the guest's answer to the protocol hello is not v2: {problem}"
            self._fail(ProtocolError(message))
            return
        if problem is not None:
            logger.warning("guest %s: %s; staying on protocol v1", conn.peer, problem)
        transport.set_protocol(conn)
        self.result.set_result(conn)

    def _problem(self, result: CommandResult) -> str | None:
        oversized = [n for n in self._reader.lengths if n > MAX_HELLO_ANSWER]
        if oversized:
            return f"its answer to the protocol hello held {max(oversized)} bytes of output"
        return hello_answer_problem(result, self._nonce)

    def _expired(self, timeout: float) -> None:
        self._timer = None
        logger.warning(
            "guest %s did not answer the protocol hello within %.3g s; closing the connection",
            self._conn.peer,
            timeout,
        )
        self._fail(
            ConnectTimeout(f"the guest did not answer the protocol hello within {timeout:.3g} s")
        )

    def _fail(self, error: ProtocolError | ConnectionLost | ConnectTimeout) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.result.done():
            self.result.set_exception(error)
            self.result.exception()  # a server, or a cancelled connect(), never awaits it
        self._conn.abort(error)


def _tell_lost(held: weakref.ref[GuestConnection]) -> None:
    """The v1 object of a connection that became a v2 session, if anyone still holds it,
    learns that the connection is gone."""
    conn = held()
    if conn is not None:
        conn.connection_lost(None)

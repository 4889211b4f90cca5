"""Hybrid vsock (Firecracker, Cloud Hypervisor): the host-initiated ``CONNECT``/``OK`` handshake.

A host process reaches guest vsock port P through the VMM's Unix socket: it
connects, sends ``CONNECT P\\n`` and reads ``OK <host_port>\\n``, after which
the socket is a byte stream to the guest. If nothing listens on port P in
the guest, the VMM closes the connection instead of answering.

:class:`OkReplyParser` is the pure half (bytes in, reply out, no I/O);
:func:`connect_hybrid` drives it over a socket, reading exactly through the
reply's newline so that not one byte of the guest's stream is consumed, and
retries on a new connection while the guest's listener is not up yet.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Final

from ._sockets import connect_socket
from .addresses import HybridVsockAddress
from .errors import ConnectFailed, ConnectTimeout, ProtocolError, UsageError

__all__ = ["OkReplyParser", "connect_hybrid", "encode_connect"]

logger = logging.getLogger("vsock_async")

_PORT_MAX: Final = 0xFFFF_FFFF
_MIN_REPLY: Final = len(b"OK 0\n")
MAX_REPLY: Final = len(b"OK 4294967295\n")
"""The longest valid reply; anything longer is a protocol error, not a reason to keep reading."""

FIRST_RETRY_DELAY: Final = 0.01
MAX_RETRY_DELAY: Final = 0.25


def encode_connect(port: int) -> bytes:
    """The request line for guest vsock port ``port``."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= _PORT_MAX:
        raise UsageError(f"a vsock port is an int in 0..{_PORT_MAX}, not {port!r}")
    return b"CONNECT %d\n" % port


class OkReplyParser:
    """Parses the VMM's ``OK <host_port>\\n`` reply from bytes in any chunking.

    :attr:`bytes_wanted` is how many bytes can be read next without reading
    past the newline (never more than a valid reply still needs), so a caller
    that reads at most that much leaves the stream after the reply untouched.
    A caller that reads more gets the surplus back in :attr:`leftover`.
    ``OK`` is accepted in any letter case.
    """

    __slots__ = ("_buffer", "_eof", "host_port", "leftover")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._eof = False
        self.host_port: int | None = None
        """The host-side port the VMM assigned, once the reply is complete."""
        self.leftover = b""
        """Bytes received after the reply's newline: the start of the guest's stream."""

    @property
    def done(self) -> bool:
        """True once a complete, valid reply has been parsed."""
        return self.host_port is not None

    @property
    def closed(self) -> bool:
        """True if the stream ended before any byte of a reply: the VMM refused the CONNECT."""
        return self._eof and not self._buffer and self.host_port is None

    @property
    def bytes_wanted(self) -> int:
        """The most bytes that can be read now without passing the reply's newline."""
        if self.done or self._eof:
            return 0
        received = len(self._buffer)
        if received < 3:
            return _MIN_REPLY - received
        return 2 if received == 3 else 1

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; raises :class:`ProtocolError` as soon as they cannot be a reply."""
        if self.done:
            self.leftover += data
            return
        if self._eof:
            raise UsageError("receive_data() after receive_eof()")
        newline = data.find(b"\n")
        line_part = data if newline < 0 else data[: newline + 1]
        self._buffer += line_part
        self._check_prefix()
        if newline >= 0:
            self.host_port = int(self._buffer[3:-1])
            self.leftover = bytes(data[newline + 1 :])

    def receive_eof(self) -> None:
        """The stream ended. Before any byte that is a refusal (see :attr:`closed`); mid-reply,
        a protocol error."""
        if self.done:
            return
        self._eof = True
        if self._buffer:
            raise ProtocolError(
                f"the VMM closed the connection in the middle of its reply {bytes(self._buffer)!r}"
            )

    def _check_prefix(self) -> None:
        line = bytes(self._buffer)
        head, digits = line[:3], line[3:]
        complete = digits.endswith(b"\n")
        if complete:
            digits = digits[:-1]
        valid = (
            b"OK "[: len(head)] == head.upper()
            and len(line) <= MAX_REPLY
            and (digits.isdigit() or (not digits and not complete))
            and (not complete or (len(head) == 3 and int(digits) <= _PORT_MAX))
        )
        if not valid:
            shown = line if len(line) <= MAX_REPLY else line[:MAX_REPLY] + b"..."
            raise ProtocolError(
                f"the VMM answered {shown!r} to CONNECT instead of 'OK <port>\\n'"
                " (is this a Firecracker or Cloud Hypervisor vsock socket?)"
            )


class _Refused(Exception):
    """The VMM closed the connection instead of answering: nothing listens on the guest port."""


async def _handshake(sock: socket.socket, port: int) -> int:
    """Send ``CONNECT port`` on ``sock`` and read exactly the reply; the VMM's host port."""
    loop = asyncio.get_running_loop()
    parser = OkReplyParser()
    try:
        await loop.sock_sendall(sock, encode_connect(port))
        while not parser.done:
            data = await loop.sock_recv(sock, parser.bytes_wanted)
            if not data:
                parser.receive_eof()
                raise _Refused
            parser.receive_data(data)
    except (BrokenPipeError, ConnectionResetError):
        raise _Refused from None
    assert parser.host_port is not None and not parser.leftover
    return parser.host_port


async def connect_hybrid(address: HybridVsockAddress, timeout: float | None) -> socket.socket:
    """A socket to the guest's vsock port behind ``address``, the handshake done.

    While the VMM refuses (the guest's listener is not up yet), retry on a
    new connection with a growing pause, until ``timeout``. Raises
    :class:`ConnectFailed` if the VMM still refuses at the deadline,
    :class:`ConnectTimeout` if the deadline fires during an attempt, and
    ConnectFailed at once if the VMM's socket cannot be reached or answers
    something that is not ``OK <port>``.
    """
    attempts = 0
    refused = False
    delay = FIRST_RETRY_DELAY
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            while True:
                attempts += 1
                sock = await connect_socket(address)
                try:
                    host_port = await _handshake(sock, address.port)
                except _Refused:
                    sock.close()
                    refused = True
                except ProtocolError as exc:
                    sock.close()
                    raise ConnectFailed(f"cannot connect to {address}: {exc}") from exc
                except BaseException:
                    sock.close()
                    raise
                else:
                    logger.debug(
                        "connected to %s after %d attempt(s), VMM host port %d",
                        address,
                        attempts,
                        host_port,
                    )
                    return sock
                if deadline is not None and loop.time() + delay >= deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
    except TimeoutError:
        if not refused:
            raise ConnectTimeout(
                f"could not connect to {address} within {timeout} s:"
                f" the VMM at {address.uds_path} did not answer CONNECT {address.port}"
                " (is the guest booted, with its vsock driver loaded?)"
            ) from None
    raise ConnectFailed(
        f"cannot connect to {address}: the VMM closed the connection after"
        f" CONNECT {address.port} on all {attempts} attempt(s) within {timeout} s;"
        f" nothing listens on vsock port {address.port} in the guest (is its agent running"
        f" with --listen vsock://any:{address.port}?)",
    )

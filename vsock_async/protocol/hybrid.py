"""Hybrid vsock (Firecracker, Cloud Hypervisor): the host-initiated ``CONNECT``/``OK`` handshake.

A host process reaches guest vsock port P through the VMM's Unix socket: it
connects, sends ``CONNECT P\\n`` and reads ``OK <host_port>\\n``, after which
the socket is a byte stream to the guest. If nothing listens on port P in
the guest, the VMM closes the connection instead of answering.

This module is the pure half (bytes in, reply out, no I/O);
:func:`vsock_async.host.hybrid.connect_hybrid` drives it over a socket.
"""

from __future__ import annotations

from typing import Final

from ..errors import ProtocolError, UsageError

__all__ = ["MAX_REPLY", "OkReplyParser", "encode_connect"]

_PORT_MAX: Final = 0xFFFF_FFFF
_MIN_REPLY: Final = len(b"OK 0\n")
MAX_REPLY: Final = len(b"OK 4294967295\n")
"""The longest valid reply; anything longer is a protocol error, not a reason to keep reading."""


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

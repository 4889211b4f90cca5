"""Hybrid vsock (Firecracker, Cloud Hypervisor): connect to a guest port through the VMM's socket.

:func:`connect_hybrid` drives :class:`~vsock_async.protocol.hybrid.OkReplyParser`
over a socket, reading exactly through the reply's newline so that not one
byte of the guest's stream is consumed, and retries on a new connection while
the guest's listener is not up yet.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Final

from .._sockets import connect_socket
from ..addresses import HybridVsockAddress
from ..errors import ConnectFailed, ConnectTimeout, ProtocolError
from ..protocol.hybrid import OkReplyParser, encode_connect
from .opening import running_loop

__all__ = ["connect_hybrid"]

logger = logging.getLogger("vsock_async")

FIRST_RETRY_DELAY: Final = 0.01
MAX_RETRY_DELAY: Final = 0.25


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
    :class:`ConnectTimeout` when the deadline comes, saying whether the VMM
    kept refusing (nothing listens in the guest) or never answered; and
    :class:`ConnectFailed` at once if the VMM's socket cannot be reached or
    answers something that is not ``OK <port>``.
    """
    attempts = 0
    refused = False
    delay = FIRST_RETRY_DELAY
    loop = running_loop()
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
                    break  # the next attempt would come after the deadline
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
    except TimeoutError:
        pass
    if refused:
        why = (
            f"the VMM closed the connection after CONNECT {address.port} on all {attempts}"
            f" attempt(s); nothing listens on vsock port {address.port} in the guest (is its"
            f" agent running with --listen vsock://any:{address.port}?)"
        )
    else:
        why = (
            f"the VMM at {address.uds_path} did not answer CONNECT {address.port}"
            " (is the guest booted, with its vsock driver loaded?)"
        )
    raise ConnectTimeout(f"could not connect to {address} within {timeout} s: {why}")

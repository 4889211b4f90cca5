"""``connect()``: the host dials a guest agent that listens (host-initiated connections)."""

from __future__ import annotations

import asyncio
import socket

from .._sockets import connect_socket
from ..addresses import Address, HybridVsockAddress, parse_address
from ..errors import ConnectTimeout
from ..protocol import Limits
from ..timeouts import DEFAULT_TIMEOUT, check_timeout
from .channel import GuestChannel
from .hybrid import connect_hybrid
from .opening import Opening, running_loop
from .transport import GuestConnection

__all__ = ["connect"]


async def _open_socket(address: Address, timeout: float | None) -> socket.socket:
    if isinstance(address, HybridVsockAddress):
        return await connect_hybrid(address, timeout)
    try:
        async with asyncio.timeout(timeout):
            return await connect_socket(address)
    except TimeoutError:
        raise ConnectTimeout(f"could not connect to {address} within {timeout} s") from None


async def _connect(
    address: str | Address,
    timeout: float | None,
    limits: Limits | None,
    default_timeout: float | None,
    key: object,
) -> GuestChannel:
    loop = running_loop()
    parsed = parse_address(address)
    check_timeout(timeout)
    sock = await _open_socket(parsed, timeout)
    try:
        _, conn = await loop.create_connection(
            lambda: GuestConnection(limits or Limits()), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    return GuestChannel(
        conn,
        default_timeout=default_timeout,
        key=str(parsed) if key is None else key,
    )


def connect(
    address: str | Address,
    *,
    timeout: float | None = 10.0,
    limits: Limits | None = None,
    default_timeout: float | None = DEFAULT_TIMEOUT,
    key: object = None,
) -> Opening[GuestChannel]:
    """Dial a guest agent listening on ``address``; the counterpart of :func:`listen`.

    ``vsock://CID:PORT`` dials AF_VSOCK (QEMU vhost-vsock); ``hvsock:UDS:PORT``
    dials a Firecracker / Cloud Hypervisor VMM socket and does its
    ``CONNECT PORT`` handshake, retrying on a new connection while nothing
    listens in the guest yet; ``unix:`` and ``tcp://`` dial directly.
    ``timeout`` covers it all: :class:`ConnectTimeout` (also a ConnectFailed)
    when it fires, :class:`ConnectFailed` for a refusal. Await it, or use it with ``async with``.
    """
    return Opening(_connect(address, timeout, limits, default_timeout, key))

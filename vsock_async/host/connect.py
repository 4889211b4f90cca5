"""``connect()``: the host dials a guest agent that listens (host-initiated connections)."""

from __future__ import annotations

import asyncio
import socket

from .._sockets import connect_socket
from ..addresses import Address, HybridVsockAddress, parse_address
from ..errors import ClosedLocally, ConnectTimeout
from ..protocol import Limits
from ..timeouts import DEFAULT_TIMEOUT, check_timeout
from .channel import GuestChannel
from .hybrid import connect_hybrid
from .negotiate import ProtocolChoice, check_protocol, negotiate
from .opening import Opening, running_loop
from .session import SessionConnection
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
    protocol: ProtocolChoice,
) -> GuestChannel:
    loop = running_loop()
    parsed = parse_address(address)
    check_timeout(timeout)
    check_protocol(protocol)
    deadline = None if timeout is None else loop.time() + timeout
    sock = await _open_socket(parsed, timeout)
    try:
        _, conn = await loop.create_connection(
            lambda: GuestConnection(limits or Limits()), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    agreed: GuestConnection | SessionConnection = conn
    if protocol != "v1":
        left = None if deadline is None else max(0.0, deadline - loop.time())
        hello = negotiate(conn, require_v2=protocol == "v2", timeout=left)
        try:
            agreed = await asyncio.shield(hello)
        except asyncio.CancelledError:
            conn.abort(ClosedLocally("connect() was cancelled during the protocol hello"))
            raise
    return GuestChannel(
        agreed,
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
    protocol: ProtocolChoice = "auto",
) -> Opening[GuestChannel]:
    """Dial a guest agent listening on ``address``; the counterpart of :func:`listen`.

    ``vsock://CID:PORT`` dials AF_VSOCK (QEMU vhost-vsock); ``hvsock:UDS:PORT``
    dials a Firecracker / Cloud Hypervisor VMM socket and does its
    ``CONNECT PORT`` handshake, retrying on a new connection while nothing
    listens in the guest yet; ``unix:`` and ``tcp://`` dial directly.
    ``timeout`` covers it all, the protocol hello included:
    :class:`ConnectTimeout` (also a ConnectFailed) when it fires,
    :class:`ConnectFailed` for a refusal.

    ``protocol="auto"`` (the default) sends the v2 hello and uses v2 if the
    agent answers it, v1 otherwise; ``"v2"`` requires v2 (:class:`ProtocolError`
    for a v1 guest); ``"v1"`` never sends the hello. :attr:`GuestChannel.protocol`
    says what was agreed. Await it, or use it with ``async with``.
    """
    return Opening(_connect(address, timeout, limits, default_timeout, key, protocol))

"""``connect()``: the host dials a guest agent that listens (host-initiated connections)."""

from __future__ import annotations

import asyncio

from ._opening import Opening
from ._sockets import connect_socket
from ._transport import GuestConnection
from .addresses import Address, parse_address
from .channel import DEFAULT_TIMEOUT, GuestChannel, check_timeout
from .errors import ConnectTimeout
from .protocol import Limits

__all__ = ["connect"]


async def _connect(
    address: str | Address,
    timeout: float | None,
    limits: Limits | None,
    default_timeout: float | None,
    key: object,
) -> GuestChannel:
    parsed = parse_address(address)
    check_timeout(timeout)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            sock = await connect_socket(parsed)
    except TimeoutError:
        raise ConnectTimeout(f"could not connect to {parsed} within {timeout} s") from None
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
    """Dial a guest agent listening on ``address``; :class:`ConnectTimeout` after ``timeout`` s.

    Await it, or use it with ``async with``.
    """
    return Opening(_connect(address, timeout, limits, default_timeout, key))

"""``listen()`` and ``CommandServer``: accept guest connections, with a CID allowlist."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import Collection
from types import TracebackType
from typing import Any

from ._opening import Opening
from ._sockets import UnixSocketOptions, bind_listener, listen_path
from ._transport import GuestConnection
from .addresses import (
    DEFAULT_ADDRESS,
    Address,
    HybridVsockAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)
from .channel import DEFAULT_TIMEOUT, GuestChannel, check_timeout
from .errors import AcceptTimeout, ConnectionClosed, UsageError
from .protocol import Limits

__all__ = ["CommandServer", "listen"]

logger = logging.getLogger("vsock_async")


class _Listener:
    """One listening socket of a server and what it admits."""

    def __init__(
        self,
        address: Address,
        label: str | None,
        allowed_cids: frozenset[int] | None,
        sock: socket.socket,
    ) -> None:
        self.address = address
        self.label = label
        self.allowed_cids = allowed_cids
        self.sock = sock
        self.server: asyncio.Server | None = None
        self.path = (
            listen_path(address) if isinstance(address, UnixAddress | HybridVsockAddress) else None
        )
        self._inode = os.stat(self.path).st_ino if self.path else None

    def remove_socket_file(self) -> None:
        """Unlink our socket file, unless someone else's listener has replaced it since."""
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


class CommandServer:
    """Accepts guest agents' connections and hands each out as a :class:`GuestChannel`.

    Several guests may be connected at once. Use it as ``async with await
    listen(...) as server`` (or ``async with listen(...)``); :meth:`aclose`
    stops listening, closes every channel and removes socket files.
    """

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        default_timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self.limits = limits or Limits()
        self.default_timeout = check_timeout(default_timeout, "default_timeout")
        self._listeners: list[_Listener] = []
        self._channels: dict[int, GuestChannel] = {}
        self._pending: deque[GuestChannel] = deque()
        self._accept_waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def __repr__(self) -> str:
        addresses = ", ".join(str(lst.address) for lst in self._listeners)
        return f"<CommandServer [{addresses}] channels={len(self._channels)}>"

    @property
    def addresses(self) -> list[Address]:
        """The addresses listened on."""
        return [lst.address for lst in self._listeners]

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets (to learn a port the kernel picked, for example)."""
        return [lst.sock for lst in self._listeners]

    @property
    def channels(self) -> list[GuestChannel]:
        """Every open channel, accepted or not yet."""
        return list(self._channels.values())

    async def add_listener(
        self,
        address: str | Address,
        *,
        label: str | None = None,
        allowed_cids: Collection[int] | None = None,
        unix_options: UnixSocketOptions | None = None,
        backlog: int = 128,
    ) -> None:
        """Start listening on one more address."""
        if self._closed:
            raise UsageError("the server is closed")
        parsed = parse_address(address)
        cids: frozenset[int] | None = None
        if allowed_cids is not None:
            if not isinstance(parsed, VsockAddress):
                raise UsageError(
                    f"allowed_cids applies to vsock:// listeners only, not {parsed}:"
                    " other address kinds report no CID to check"
                )
            cids = frozenset(allowed_cids)
        sock = bind_listener(parsed, backlog=backlog, unix=unix_options)
        listener = _Listener(parsed, label, cids, sock)
        loop = asyncio.get_running_loop()
        try:
            listener.server = await loop.create_server(
                lambda: GuestConnection(
                    self.limits, lambda conn: self._connection_made(listener, conn)
                ),
                sock=sock,
            )
        except BaseException:
            sock.close()
            listener.remove_socket_file()
            raise
        self._listeners.append(listener)
        logger.info("listening on %s", parsed)

    def _connection_made(self, listener: _Listener, conn: GuestConnection) -> None:
        peer = conn.peer
        if listener.allowed_cids is not None:
            cid = peer[0] if isinstance(peer, tuple) and peer else None
            if cid not in listener.allowed_cids:
                logger.warning(
                    "refused a connection from CID %s on %s: not in allowed_cids",
                    cid,
                    listener.address,
                )
                conn.abort(ConnectionClosed(f"CID {cid} is not allowed"))
                return
        key: Any = listener.label
        if key is None:
            vsock = isinstance(listener.address, VsockAddress) and isinstance(peer, tuple)
            key = peer[0] if vsock else str(listener.address)
        channel = GuestChannel(
            conn, default_timeout=self.default_timeout, key=key, listener=str(listener.address)
        )
        self._channels[channel.id] = channel
        self._pending.append(channel)
        conn.add_close_callback(lambda _: self._channel_gone(channel))
        logger.info("guest connected: channel %s from %r on %s", channel.id, peer, listener.address)
        for waiter in self._accept_waiters:
            if not waiter.done():
                waiter.set_result(None)
                break

    def _channel_gone(self, channel: GuestChannel) -> None:
        self._channels.pop(channel.id, None)
        with contextlib.suppress(ValueError):
            self._pending.remove(channel)
        logger.info("guest disconnected: channel %s (%s)", channel.id, channel.connection.error)

    async def accept(self, timeout: float | None = None) -> GuestChannel:
        """The next guest connection not yet accepted; AcceptTimeout after ``timeout`` seconds."""
        check_timeout(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._closed:
                raise ConnectionClosed("the server is closed")
            while self._pending:
                channel = self._pending.popleft()
                if not channel.closed:
                    return channel
            waiter: asyncio.Future[None] = loop.create_future()
            self._accept_waiters.append(waiter)
            try:
                if deadline is None:
                    await waiter
                else:
                    await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise AcceptTimeout(
                    f"no guest connected to {self._describe()} within {timeout} s"
                ) from None
            finally:
                with contextlib.suppress(ValueError):
                    self._accept_waiters.remove(waiter)

    def _describe(self) -> str:
        return ", ".join(str(lst.address) for lst in self._listeners) or "no address"

    async def aclose(self) -> None:
        """Stop listening, close every channel and remove the socket files."""
        if self._closed:
            return
        self._closed = True
        for listener in self._listeners:
            if listener.server is not None:
                listener.server.close()
            listener.remove_socket_file()
        for waiter in self._accept_waiters:
            if not waiter.done():
                waiter.set_result(None)
        channels = list(self._channels.values())
        for channel in channels:
            channel.connection.abort(ConnectionClosed("the server is closing"))
        for channel in channels:
            await channel.wait_closed()
        for listener in self._listeners:
            if listener.server is not None:
                await listener.server.wait_closed()
        logger.info("server closed: %s", self._describe())

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has begun."""
        return self._closed

    async def __aenter__(self) -> CommandServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _listen(
    address: str | Address,
    allowed_cids: Collection[int] | None,
    limits: Limits | None,
    default_timeout: float | None,
    label: str | None,
    unix_options: UnixSocketOptions | None,
) -> CommandServer:
    server = CommandServer(limits=limits, default_timeout=default_timeout)
    await server.add_listener(
        address, label=label, allowed_cids=allowed_cids, unix_options=unix_options
    )
    return server


def listen(
    address: str | Address = DEFAULT_ADDRESS,
    *,
    allowed_cids: Collection[int] | None = None,
    limits: Limits | None = None,
    default_timeout: float | None = DEFAULT_TIMEOUT,
    label: str | None = None,
    unix_options: UnixSocketOptions | None = None,
) -> Opening[CommandServer]:
    """Listen for guest agents on ``address`` (default ``vsock://any:1024``).

    ``allowed_cids`` (vsock:// only) closes, at once and with a log line, any
    connection from a CID outside it. ``label`` names the guest behind a
    Unix or hybrid-vsock listener. Await it, or use it with ``async with``.
    """
    return Opening(_listen(address, allowed_cids, limits, default_timeout, label, unix_options))

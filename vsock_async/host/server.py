"""``listen()`` and ``CommandServer``: accept guest connections on several addresses, keep the
registry of connected guests, with a CID allowlist."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import socket
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Hashable
from types import TracebackType
from typing import Any, Final, Literal

from .._sockets import (
    SocketFile,
    UnixSocketOptions,
    bind_listener,
    listen_path,
    stop_polling_accepts,
)
from ..addresses import (
    DEFAULT_ADDRESS,
    Address,
    HybridVsockAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)
from ..errors import (
    AcceptTimeout,
    ClosedLocally,
    ConnectTimeout,
    UnknownGuest,
    UsageError,
    VsockAsyncError,
)
from ..protocol import Limits
from ..timeouts import DEFAULT_TIMEOUT, check_timeout
from .channel import GuestChannel
from .deadlines import Deadlines
from .guests import Guest, GuestEvent, guest_key
from .negotiate import DEFAULT_NEGOTIATE_TIMEOUT, ProtocolChoice, check_protocol, negotiate
from .opening import Opening, running_loop
from .session import SessionConnection
from .transport import GuestConnection

__all__ = ["DEFAULT_MAX_CONNECTIONS_PER_GUEST", "CommandServer", "GuestCallback", "listen"]

DEFAULT_MAX_CONNECTIONS_PER_GUEST: Final = 64
"""How many connections one guest key may hold at once unless told otherwise."""

logger = logging.getLogger("vsock_async")

GuestCallback = Callable[[GuestEvent], object]
"""Called with each :class:`GuestEvent`; an awaitable it returns runs as a server task."""


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
        self.name = str(address)  # made once: each of its channels keeps it
        self.label = label
        self.key = guest_key(label) if label is not None else str(address)
        """The guest key of its connections (on vsock://, the peer's CID instead)."""
        self.allowed_cids = allowed_cids
        self.sock = sock
        self.server: asyncio.Server | None = None
        self.socket_file = (
            SocketFile(listen_path(address))
            if isinstance(address, UnixAddress | HybridVsockAddress)
            else None
        )

    def remove_socket_file(self) -> None:
        """Unlink our socket file, unless someone else's listener has replaced it since."""
        if self.socket_file is not None:
            self.socket_file.remove()

    def stop(self) -> None:
        """Accept nothing more; the Server closes one loop iteration later (gh-109564).

        Connections accepted just before are attached to the Server by tasks
        already queued; closing it only after them never strands one.
        """
        if self.server is not None:
            stop_polling_accepts(self.sock)
            asyncio.get_running_loop().call_soon(self.server.close)

    def describe_peer(self, peer: Any) -> str:
        """`` from PEER`` for a log line; empty for a Unix peer, which has no name."""
        if not peer:
            return ""
        if isinstance(self.address, VsockAddress):
            return f" from CID {peer[0]} port {peer[1]}"
        if isinstance(peer, tuple):
            host = f"[{peer[0]}]" if ":" in str(peer[0]) else peer[0]
            return f" from {host}:{peer[1]}"
        return f" from {peer!r}"


class CommandServer:
    """Accepts guest agents' connections on one or more addresses and keeps a guest registry.

    Each connection is a :class:`GuestChannel`; connections are grouped by
    guest key (the CID on ``vsock://`` listeners, the listener's label
    otherwise; see :func:`guest_key`) into :class:`Guest` handles. Take
    connections one by one with :meth:`accept`, or address guests by key with
    :meth:`guest` and :meth:`wait_for_guest`; :meth:`subscribe` reports every
    connect and disconnect. Use it as ``async with await listen(...) as
    server`` (or ``async with listen(...)``); :meth:`aclose` stops listening,
    closes every channel and removes socket files.

    With ``replace_older=True`` a new connection of a guest closes the
    guest's older ones (a rebooted or snapshot-restored VM whose old
    connections the host has not noticed dying yet). Otherwise a guest key
    holds at most ``max_connections_per_guest`` connections (``None``: no
    cap), counting those still in their protocol hello; one more is closed at
    once, with a warning in the log.

    ``protocol`` says what every new connection speaks: ``"auto"`` (the
    default) sends the v2 hello first and uses v2 if the agent answers it, v1
    otherwise; ``"v2"`` refuses (closes, with a log line) a guest that answers
    as v1; ``"v1"`` never sends the hello. A connection is handed out (to
    :meth:`accept`, its :class:`Guest`, subscribers) only once the hello is
    over; a guest that does not answer it within ``negotiate_timeout`` seconds
    is closed with a log line.
    """

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        default_timeout: float | None = DEFAULT_TIMEOUT,
        replace_older: bool = False,
        max_connections_per_guest: int | None = DEFAULT_MAX_CONNECTIONS_PER_GUEST,
        protocol: ProtocolChoice = "auto",
        negotiate_timeout: float | None = DEFAULT_NEGOTIATE_TIMEOUT,
    ) -> None:
        self.limits = limits or Limits()
        self.default_timeout = check_timeout(default_timeout, "default_timeout")
        self.replace_older = replace_older
        self.max_connections_per_guest = _check_cap(max_connections_per_guest)
        self.protocol = check_protocol(protocol)
        self.negotiate_timeout = check_timeout(negotiate_timeout, "negotiate_timeout")
        self._listeners: list[_Listener] = []
        self._channels: dict[int, GuestChannel] = {}
        # Connections still in their protocol hello, and how many each guest key has.
        self._negotiating: set[GuestConnection] = set()
        self._negotiating_per_key: dict[Hashable, int] = {}
        self._pending: OrderedDict[int, GuestChannel] = OrderedDict()
        self._accept_waiters: deque[asyncio.Future[None]] = deque()
        self._guests: dict[Hashable, Guest] = {}
        # Handles of guests gone away that someone still holds: a reconnect revives them.
        self._detached: weakref.WeakValueDictionary[Hashable, Guest] = weakref.WeakValueDictionary()
        self._guest_waiters: dict[Hashable, list[asyncio.Future[Guest]]] = {}
        self._subscribers: list[GuestCallback] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deadlines = Deadlines()  # one timer for the calls of all its channels
        self._closing = False  # aclose() has begun: nothing new is let in
        self._closed = False  # aclose() has finished

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

    # -- the guest registry --------------------------------------------------------------

    @property
    def guests(self) -> list[Guest]:
        """Every guest with at least one connection, in the order they connected."""
        return list(self._guests.values())

    def guest(self, key: Hashable) -> Guest:
        """The connected guest with ``key`` (``3`` and ``"3"`` alike: see :func:`guest_key`).

        Raises :class:`UnknownGuest` when no such guest is connected.
        """
        guest = self._guests.get(guest_key(key))
        if guest is None:
            known = ", ".join(repr(g.key) for g in self.guests) or "none"
            raise UnknownGuest(f"no guest {key!r} is connected (connected: {known})")
        return guest

    async def wait_for_guest(self, key: Hashable, *, timeout: float | None = None) -> Guest:
        """The guest ``key`` once it has a connection; AcceptTimeout after ``timeout`` s."""
        check_timeout(timeout)
        loop = running_loop()
        if self._closing:
            raise ClosedLocally("the server is closed")
        normal = guest_key(key)
        guest = self._guests.get(normal)
        if guest is not None:
            return guest
        waiter: asyncio.Future[Guest] = loop.create_future()
        self._guest_waiters.setdefault(normal, []).append(waiter)
        try:
            # Not wait_for: on 3.11 it swallows a cancel that lands as the guest arrives.
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                return waiter.result()
            raise AcceptTimeout(
                f"guest {key!r} did not connect to {self._describe()} within {timeout} s"
            ) from None
        finally:
            waiters = self._guest_waiters.get(normal)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._guest_waiters[normal]

    def subscribe(self, callback: GuestCallback) -> Callable[[], None]:
        """Call ``callback(event)`` for every connection that comes or goes; returns an unsubscribe.

        The callback runs in the event loop as the connection arrives or
        leaves, before any call can use it. If it returns an awaitable (an
        ``async def`` callback), that runs as a task. :meth:`aclose` cancels
        the tasks still running, then waits for those started for the
        disconnects it causes. Exceptions from callbacks are logged, never raised.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def _notify(
        self,
        kind: Literal["connected", "disconnected"],
        guest: Guest,
        channel: GuestChannel,
        error: VsockAsyncError | None = None,
    ) -> None:
        if not self._subscribers:  # the event is not even made: one per connect and disconnect
            return
        event = GuestEvent(kind, guest, channel, error)
        for callback in list(self._subscribers):
            try:
                outcome = callback(event)
            except Exception:
                logger.exception("guest event callback %r failed on %s", callback, event.kind)
                continue
            if inspect.isawaitable(outcome):
                task = asyncio.ensure_future(outcome)
                self._tasks.add(task)
                task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("guest event callback task failed", exc_info=task.exception())

    def _register(self, channel: GuestChannel) -> Guest:
        key = channel.key
        guest = self._guests.get(key)
        if guest is None:
            guest = self._detached.pop(key, None) or Guest(
                key, default_timeout=self.default_timeout
            )
            self._guests[key] = guest
        # Every older connection is closed here, so listing them costs O(1) per connection.
        older = guest.channels if self.replace_older else []
        guest.add_channel(channel)
        for old in older:
            logger.info(
                "closing connection %s of guest %r: replaced by %s", old.id, key, channel.id
            )
            old.abort(
                f"connection {old.id} of guest {key!r} was replaced by connection {channel.id}"
            )
        for waiter in self._guest_waiters.pop(key, ()):
            if not waiter.done():
                waiter.set_result(guest)
        return guest

    async def add_listener(
        self,
        address: str | Address,
        *,
        label: str | None = None,
        allowed_cids: Collection[int] | None = None,
        unix_options: UnixSocketOptions | None = None,
        backlog: int = 128,
    ) -> None:
        """Start listening on one more address; ``label`` is its guest key (not for vsock://)."""
        loop = running_loop()
        if self._closing:
            raise UsageError("the server is closed")
        parsed = parse_address(address)
        if label is not None and isinstance(parsed, VsockAddress):
            raise UsageError(
                f"label applies to unix:, hvsock: and tcp:// listeners, not {parsed}:"
                " a vsock:// guest is known by its CID"
            )
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
        made = functools.partial(self._connection_made, listener)  # one for all its connections
        try:
            listener.server = await loop.create_server(
                lambda: GuestConnection(self.limits, made), sock=sock
            )
        except BaseException:
            sock.close()
            listener.remove_socket_file()
            raise
        self._listeners.append(listener)
        if self._closing:  # aclose() began while the listener was being set up
            listener.stop()
            listener.remove_socket_file()
            raise ClosedLocally(f"the server closed while it set up a listener on {parsed}")
        logger.info("listening on %s", parsed)

    def _connection_made(self, listener: _Listener, conn: GuestConnection) -> None:
        peer = conn.peer
        if self._closing:  # accepted just before aclose() stopped the listeners
            conn.abort(ClosedLocally("the server is closing"))
            return
        if listener.allowed_cids is not None:
            cid = peer[0] if isinstance(peer, tuple) and peer else None
            if cid not in listener.allowed_cids:
                logger.warning(
                    "refused a connection from CID %s on %s: not in allowed_cids",
                    cid,
                    listener.address,
                )
                conn.abort(ClosedLocally(f"CID {cid} is not allowed"))
                return
        key = _key_for(listener, peer)
        cap = self.max_connections_per_guest
        guest = self._guests.get(key)
        held = (guest.connection_count if guest is not None else 0) + self._negotiating_per_key.get(
            key, 0
        )
        if cap is not None and not self.replace_older and held >= cap:
            logger.warning(
                "refused a connection of guest %r%s on %s: it holds %d connections already"
                " (max_connections_per_guest=%d)",
                key,
                listener.describe_peer(peer),
                listener.address,
                held,
                cap,
            )
            conn.abort(ClosedLocally(f"guest {key!r} holds {cap} connections already"))
            return
        if self.protocol == "v1":
            self._admit(listener, key, conn)
            return
        self._negotiating.add(conn)
        self._negotiating_per_key[key] = self._negotiating_per_key.get(key, 0) + 1
        hello = negotiate(conn, require_v2=self.protocol == "v2", timeout=self.negotiate_timeout)
        hello.add_done_callback(lambda done: self._negotiated(listener, key, conn, done))

    def _negotiated(
        self,
        listener: _Listener,
        key: Hashable,
        conn: GuestConnection,
        hello: asyncio.Future[GuestConnection | SessionConnection],
    ) -> None:
        """The hello of ``conn`` is over: admit the connection it gave, or drop it."""
        self._negotiating.discard(conn)
        left = self._negotiating_per_key[key] - 1
        if left:
            self._negotiating_per_key[key] = left
        else:
            del self._negotiating_per_key[key]
        error = hello.exception()  # never cancelled: nobody else holds it
        if error is not None:
            # A timeout was logged as it fired; our own closing needs no line.
            if not isinstance(error, ClosedLocally | ConnectTimeout):
                logger.warning(
                    "closed a connection of guest %r%s on %s during the protocol hello: %s",
                    key,
                    listener.describe_peer(conn.peer),
                    listener.address,
                    error,
                )
            return
        agreed = hello.result()
        if self._closing:
            agreed.abort(ClosedLocally("the server is closing"))
            return
        self._admit(listener, key, agreed)

    def _admit(
        self, listener: _Listener, key: Hashable, conn: GuestConnection | SessionConnection
    ) -> None:
        """Hand a ready connection out: a channel, registered with its guest and announced."""
        channel = GuestChannel(
            conn,
            default_timeout=self.default_timeout,
            key=key,
            listener=listener.name,
            deadlines=self._deadlines,
        )
        self._channels[channel.id] = channel
        self._pending[channel.id] = channel
        channel.add_close_callback(self._channel_gone)
        logger.info(
            "guest %r connected: channel %s (protocol %s)%s on %s",
            channel.key,
            channel.id,
            channel.protocol,
            listener.describe_peer(channel.peer),
            listener.address,
        )
        guest = self._register(channel)
        self._wake_one_acceptor()
        self._notify("connected", guest, channel)

    def _wake_one_acceptor(self, skip: asyncio.Future[None] | None = None) -> None:
        for waiter in self._accept_waiters:
            if waiter is not skip and not waiter.done():
                waiter.set_result(None)
                return

    def _channel_gone(self, channel: GuestChannel) -> None:
        self._channels.pop(channel.id, None)
        self._pending.pop(channel.id, None)
        error = channel.error
        logger.info("guest %r disconnected: channel %s (%s)", channel.key, channel.id, error)
        guest = self._guests.get(channel.key)
        if guest is None:
            return
        if guest.remove_channel(channel):
            del self._guests[channel.key]
            self._detached[channel.key] = guest
        self._notify("disconnected", guest, channel, error)

    async def accept(self, timeout: float | None = None) -> GuestChannel:
        """The next guest connection not yet accepted; AcceptTimeout after ``timeout`` seconds."""
        check_timeout(timeout)
        loop = running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._closing:
                raise ClosedLocally("the server is closed")
            channel = self._next_pending()
            if channel is not None:
                return channel
            waiter: asyncio.Future[None] = loop.create_future()
            self._accept_waiters.append(waiter)
            try:
                # Not wait_for: on 3.11 it swallows a cancel that lands as a guest arrives.
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                channel = self._next_pending()  # a guest that came as the deadline passed
                if channel is not None:
                    return channel
                raise AcceptTimeout(
                    f"no guest connected to {self._describe()} within {timeout} s"
                ) from None
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one_acceptor(skip=waiter)  # pass the news on; the channel waits
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._accept_waiters.remove(waiter)

    def _next_pending(self) -> GuestChannel | None:
        while self._pending:
            _, channel = self._pending.popitem(last=False)
            if not channel.closed:
                return channel
        return None

    def _describe(self) -> str:
        return ", ".join(str(lst.address) for lst in self._listeners) or "no address"

    def stop_listening(self) -> None:
        """Accept no new connection; open ones carry on until :meth:`aclose` (a graceful stop)."""
        for listener in self._listeners:
            listener.stop()

    async def aclose(self) -> None:
        """Stop listening, close every channel and remove the socket files.

        Everything is stopped at once, before the first await; what follows only
        waits for it to take effect (channels torn down, disconnect callbacks
        run, listeners closed). Cancelled, it leaves nothing open, and a call
        made again waits for what is left.
        """
        if not self._closing:
            self._closing = True
            self._stop_everything()
        for conn in list(self._negotiating):
            await conn.wait_closed()
        for channel in list(self._channels.values()):
            await channel.wait_closed()
        # The disconnects just caused run their callbacks to the end: every one gets reported.
        # asyncio.wait, not gather: a cancelled aclose() must not cancel them.
        while self._tasks:
            await asyncio.wait(list(self._tasks))
        for listener in self._listeners:
            if listener.server is not None:
                await listener.server.wait_closed()
        if not self._closed:
            self._closed = True
            logger.info("server closed: %s", self._describe())

    def _stop_everything(self) -> None:
        """aclose() without waiting: stop listening, fail waiters, cancel tasks, abort channels."""
        for listener in self._listeners:
            listener.stop()
            listener.remove_socket_file()
        for waiter in self._accept_waiters:
            if not waiter.done():
                waiter.set_result(None)
        for waiters in self._guest_waiters.values():
            for guest_waiter in waiters:
                if not guest_waiter.done():
                    guest_waiter.set_exception(ClosedLocally("the server is closing"))
        for task in self._tasks:
            task.cancel()
        for conn in list(self._negotiating):
            conn.abort(ClosedLocally("the server is closing"))
        for channel in list(self._channels.values()):
            channel.abort("the server is closing")

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has begun."""
        return self._closing

    async def __aenter__(self) -> CommandServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _key_for(listener: _Listener, peer: Any) -> Hashable:
    """The guest key of a connection: the peer's CID on vsock://, else the listener's key."""
    if isinstance(listener.address, VsockAddress) and isinstance(peer, tuple) and peer:
        return int(peer[0])
    return listener.key


def _check_cap(cap: int | None) -> int | None:
    if cap is not None and (type(cap) is not int or cap < 1):
        raise UsageError(
            f"max_connections_per_guest must be a whole number >= 1, or None for no cap;"
            f" not {cap!r}"
        )
    return cap


async def _listen(
    address: str | Address,
    allowed_cids: Collection[int] | None,
    limits: Limits | None,
    default_timeout: float | None,
    label: str | None,
    unix_options: UnixSocketOptions | None,
    replace_older: bool,
    max_connections_per_guest: int | None,
    protocol: ProtocolChoice,
    negotiate_timeout: float | None,
) -> CommandServer:
    server = CommandServer(
        limits=limits,
        default_timeout=default_timeout,
        replace_older=replace_older,
        max_connections_per_guest=max_connections_per_guest,
        protocol=protocol,
        negotiate_timeout=negotiate_timeout,
    )
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
    replace_older: bool = False,
    max_connections_per_guest: int | None = DEFAULT_MAX_CONNECTIONS_PER_GUEST,
    protocol: ProtocolChoice = "auto",
    negotiate_timeout: float | None = DEFAULT_NEGOTIATE_TIMEOUT,
) -> Opening[CommandServer]:
    """Listen for guest agents on ``address`` (default ``vsock://any:1024``).

    ``allowed_cids`` (vsock:// only) closes, at once and with a log line, any
    connection from a CID outside it. ``label`` is the guest key of a Unix,
    hybrid-vsock or TCP listener (default: the address string; a label of
    digits is the int it spells, see :func:`guest_key`); on vsock:// the key
    is the peer's CID. ``replace_older`` closes a guest's older connections
    when a new one arrives; otherwise a guest key holds at most
    ``max_connections_per_guest`` connections (``None``: no cap) and one more
    is closed at once with a log line. ``protocol`` (``"auto"``, ``"v1"`` or
    ``"v2"``) and ``negotiate_timeout`` say what new connections speak; see
    :class:`CommandServer`. More addresses can be added with
    :meth:`CommandServer.add_listener`. Await it, or use it with ``async with``.
    """
    return Opening(
        _listen(
            address,
            allowed_cids,
            limits,
            default_timeout,
            label,
            unix_options,
            replace_older,
            max_connections_per_guest,
            protocol,
            negotiate_timeout,
        )
    )

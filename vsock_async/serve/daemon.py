"""``serve``: the host daemon. Listeners, probing guests, the control API, graceful shutdown.

The daemon is a :class:`CommandServer` listening where guests dial in, a
probe of every new connection and of every idle one at an interval (a
connection that fails is dropped and logged), and the HTTP control API of
:mod:`vsock_async.serve.control_api` on a Unix socket (mode 0600) or, with a bearer
token, on TCP; health and metrics alone, read-only, may also get a TCP port.
SIGTERM or SIGINT stops accepting, sends SIGTERM to the processes of
streaming execs, lets running commands and processes finish within the grace
period, kills the processes left, then closes guests and the control API and removes socket
files; a second signal skips the wait.

Standard library only at import time: aiohttp is imported when the daemon
starts, so ``python -m vsock_async agent`` never needs it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import time
from typing import TYPE_CHECKING, Any

from .._logging import configure_logging
from .._sockets import SocketFile, UnixSocketOptions, bind_listener
from ..addresses import TcpAddress, UnixAddress, VsockAddress
from ..errors import ConnectionClosed, DeadlineExceeded, PeerError, UsageError
from ..host.channel import GuestChannel
from ..host.guests import Guest, GuestEvent
from ..host.server import CommandServer
from .config import ServeConfig
from .metrics import ServeMetrics

if TYPE_CHECKING:
    from .control_api import ControlAPI

__all__ = ["Daemon", "run_serve"]

logger = logging.getLogger("vsock_async.serve")


def _make_private_directories(path: str) -> None:
    """Create ``path`` and its missing parents, each 0700 whatever the umask."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:  # made meanwhile by someone else: checked by the caller
            continue
        os.chmod(directory, 0o700)  # a umask can only have taken bits away


def _tcp_text(sock: socket.socket) -> str:
    """The address a TCP listener is bound to, its port chosen by the kernel included."""
    host, port = sock.getsockname()[:2]
    return str(TcpAddress(host, port))


class Daemon:
    """One run of ``serve``: :meth:`run` until a signal, then a graceful shutdown."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = ServeMetrics()
        self.server = CommandServer(
            limits=config.limits,
            default_timeout=config.default_timeout,
            max_connections_per_guest=config.max_connections_per_guest,
            protocol=config.protocol,
        )
        self.control: ControlAPI | None = None
        self._control_file: SocketFile | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._signals = 0
        self._probes: set[asyncio.Task[None]] = set()
        self._probing: set[int] = set()
        self._present: set[object] = set()
        """Keys of the guests with a connection, as the events have told."""
        self._draining = False

    # -- start ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen for guests and serve the control API; ListenFailed/UsageError if it cannot."""
        try:
            from .control_api import ControlAPI
        except ImportError as exc:
            raise UsageError(
                f"the control API needs aiohttp ({exc}); install it with:"
                " pip install 'vsock_async[serve]'"
            ) from None

        self.server.subscribe(self._on_guest_event)
        for spec in self.config.listeners:
            vsock = isinstance(spec.address, VsockAddress)
            await self.server.add_listener(
                spec.address,
                label=spec.label,
                allowed_cids=self.config.allowed_cids if vsock else None,
            )
        sock = self._bind_control()
        read_only = None
        self.control = ControlAPI(self.server, self.metrics, token=self.config.token)
        try:
            if self.config.metrics is not None:
                read_only = bind_listener(self.config.metrics)
            await self.control.start(sock, read_only=read_only)
        except BaseException:
            sock.close()
            if read_only is not None:
                read_only.close()
            raise
        logger.info(
            "control API on %s%s",
            self._control_text(sock),
            " (bearer token required)" if self.config.token else "",
        )
        if read_only is not None:
            logger.info("metrics and health on %s (read-only, no token)", _tcp_text(read_only))

    def _bind_control(self) -> socket.socket:
        address = self.config.control
        if isinstance(address, UnixAddress):
            parent = os.path.dirname(os.path.abspath(address.path))
            try:
                _make_private_directories(parent)
                st = os.lstat(parent)
            except OSError as exc:
                raise UsageError(
                    f"cannot create {parent} for the control socket: {exc.strerror or exc}"
                ) from None
            # A directory another user made (say /tmp/vsock-async-UID, left open) would let
            # them swap the socket for their own: only ours or root's, and shared only if sticky.
            trusted_owner = st.st_uid in (os.geteuid(), 0)
            shared = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
            if not stat.S_ISDIR(st.st_mode) or not trusted_owner or shared:
                raise UsageError(
                    f"refusing to put the control socket in {parent}: it must be a directory"
                    " owned by this user or root, and not writable by others (unless sticky)"
                )
        sock = bind_listener(address, unix=UnixSocketOptions(mode=0o600))
        if isinstance(address, UnixAddress):
            self._control_file = SocketFile(address.path)
        return sock

    def _control_text(self, sock: socket.socket) -> str:
        address = self.config.control
        if isinstance(address, TcpAddress):
            return _tcp_text(sock)
        return str(address)

    # -- guests --------------------------------------------------------------------------

    def _on_guest_event(self, event: GuestEvent) -> Any:
        key = event.guest.key
        if event.kind == "disconnected":
            self.metrics.connection_closed(event.channel)
            # Connections that close together all see a guest with none left: say it once.
            if not event.guest.connected and key in self._present:
                self._present.discard(key)
                logger.info("guest %r is gone: no connection left", key)
            return None
        self._present.add(key)
        if self._draining:
            return None
        return self._probe(event.guest, event.channel, "first")

    async def _probe(self, guest: Guest, channel: GuestChannel, which: str) -> None:
        """Probe one connection; drop it, with a log line, if the probe fails."""
        self._probing.add(channel.id)
        start = time.monotonic()
        self.metrics.probes.inc()
        try:
            await channel.probe(timeout=self.config.probe_timeout)
        except (PeerError, ConnectionClosed, DeadlineExceeded) as exc:
            self.metrics.probes_failed.inc()
            logger.warning(
                "guest %r failed its %s probe on connection %s: %s; dropping the connection",
                guest.key,
                which,
                channel.id,
                exc,
            )
            channel.abort(f"guest {guest.key!r} failed its {which} probe: {exc}")
            return
        finally:
            self._probing.discard(channel.id)
            self.metrics.exchange_seconds.observe(time.monotonic() - start)
        level = logging.INFO if which == "first" else logging.DEBUG
        logger.log(
            level,
            "guest %r answered its %s probe on connection %s in %.1f ms",
            guest.key,
            which,
            channel.id,
            (time.monotonic() - start) * 1000,
        )

    async def _reprobe_idle(self, interval: float) -> None:
        """Every so often, probe each idle connection not probed within ``interval``."""
        while True:
            await asyncio.sleep(interval / 4)
            now = time.time()
            for guest in self.server.guests:
                for channel in guest.channels:
                    last = channel.last_probe or channel.connected_at
                    if (
                        now - last < interval
                        or channel.busy
                        or channel.queued
                        or channel.id in self._probing
                    ):
                        continue
                    task = asyncio.create_task(self._probe(guest, channel, "periodic"))
                    self._probes.add(task)
                    task.add_done_callback(self._probes.discard)

    # -- run, stop -----------------------------------------------------------------------

    def request_stop(self, why: str = "asked to stop") -> None:
        """Begin the graceful shutdown; a second call stops at once."""
        self._signals += 1
        if self._signals == 1:
            grace = self.config.grace
            logger.info(
                "%s: shutting down (%s for running commands; again to stop at once)",
                why,
                "no time limit" if grace is None else f"up to {grace:g} s",
            )
            self._stop.set()
        else:
            logger.info("%s again: stopping at once", why)
            self._force.set()

    async def run(self) -> None:
        """Start, serve until a signal, shut down. What made the start fail is raised."""
        loop = asyncio.get_running_loop()
        try:
            await self.start()
        except BaseException:
            await self._close()
            raise
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, f"received {sig.name}")
        reprobe = None
        if self.config.probe_interval is not None:
            reprobe = asyncio.create_task(self._reprobe_idle(self.config.probe_interval))
        logger.info("serving guests on %s", ", ".join(str(a) for a in self.server.addresses))
        try:
            await self._stop.wait()
            await self._drain()
        finally:
            if reprobe is not None:
                reprobe.cancel()
            await self._close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        logger.info("stopped")

    async def _drain(self) -> None:
        """Stop accepting; SIGTERM to exec processes; wait for running commands and processes
        until they end, the grace, or a signal; SIGKILL to the processes left."""
        self._draining = True
        self.server.stop_listening()
        control = self.control
        if control is None:
            return
        await control.stop_accepting()
        if not control.running:
            return
        signalled = control.signal_processes(signal.SIGTERM)
        if signalled:
            logger.info("sent SIGTERM to %d exec process(es)", signalled)
        logger.info("waiting for %d running command(s) and exec(s)", control.running)
        idle = asyncio.ensure_future(control.wait_idle())
        force = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait(
                {idle, force}, timeout=self.config.grace, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            idle.cancel()
            force.cancel()
        if control.running:
            if self._force.is_set():
                how = "on a second signal"
            else:
                grace = self.config.grace
                how = f"at the end of the shutdown drain (--grace {grace:g} s)"
            control.end_drain(how)
            killed = control.signal_processes(signal.SIGKILL)
            if killed:
                logger.warning("sent SIGKILL to %d exec process(es) still running", killed)
            logger.warning(
                "%d command(s) and exec(s) still running %s: closing their connections",
                control.running,
                how,
            )

    async def _close(self) -> None:
        """Close guests, the control API and the socket files; safe after a failed start."""
        self._draining = True
        for task in list(self._probes):
            task.cancel()
        await self.server.aclose()
        if self.control is not None:
            await self.control.aclose()
        if self._control_file is not None:
            self._control_file.remove()


def run_serve(config: ServeConfig) -> None:
    """Run the daemon in a new event loop until it is stopped.

    Raises :class:`VsockAsyncError` or :class:`OSError` when it cannot start.
    """
    configure_logging(config.log_level, config.log_format)
    asyncio.run(Daemon(config).run())

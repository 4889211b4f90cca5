"""``serve``: the host daemon. Listeners, probing guests, the control API, graceful shutdown.

The daemon is a :class:`CommandServer` listening where guests dial in, a
probe of every new connection and of every idle one at an interval (a
connection that fails is dropped and logged), and the HTTP control API of
:mod:`vsock_async.serve.control_api` on a Unix socket (mode 0600) or, with a bearer
token, on TCP. SIGTERM or SIGINT stops accepting, lets running commands
finish within the grace period, then closes guests and the control API
and removes socket files; a second signal skips the wait.

Standard library only at import time: aiohttp is imported when the daemon
starts, so ``python -m vsock_async agent`` never needs it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from .._logging import configure_logging
from .._sockets import SocketFile, UnixSocketOptions, bind_listener
from ..addresses import (
    DEFAULT_ADDRESS,
    Address,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)
from ..errors import (
    ConnectionClosed,
    DeadlineExceeded,
    PeerError,
    UsageError,
    VsockAsyncError,
)
from ..host.channel import GuestChannel
from ..host.guests import Guest, GuestEvent
from ..host.server import CommandServer
from ..protocol import Limits
from ..timeouts import DEFAULT_TIMEOUT
from .defaults import default_control_address, default_control_path, read_token_file
from .metrics import ServeMetrics

if TYPE_CHECKING:
    from .control_api import ControlAPI

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_PROBE_INTERVAL",
    "DEFAULT_PROBE_TIMEOUT",
    "Daemon",
    "ListenSpec",
    "ServeConfig",
    "parse_listen_spec",
    "run_serve",
]

DEFAULT_PROBE_INTERVAL: Final = 30.0
DEFAULT_PROBE_TIMEOUT: Final = 5.0
DEFAULT_GRACE: Final = 10.0

logger = logging.getLogger("vsock_async.serve")


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """One address guests dial in to, and the label naming the guest behind it."""

    address: Address
    label: str | None = None


def parse_listen_spec(text: str) -> ListenSpec:
    """``[LABEL=]ADDRESS``: a label is the part before ``=`` when it holds no ``:`` or ``/``."""
    label, sep, rest = text.partition("=")
    if sep and label and ":" not in label and "/" not in label:
        address = parse_address(rest)
        if isinstance(address, VsockAddress):
            raise UsageError(
                f"{text!r}: a vsock:// listener names each guest by its CID; labels are for"
                " hvsock:, unix: and tcp:// listeners"
            )
        return ListenSpec(address, label)
    return ListenSpec(parse_address(text))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything ``serve`` is told on its command line, checked."""

    listeners: tuple[ListenSpec, ...] = (ListenSpec(DEFAULT_ADDRESS),)
    allowed_cids: frozenset[int] | None = None
    control: UnixAddress | TcpAddress = field(
        default_factory=lambda: UnixAddress(default_control_path())
    )
    token: str | None = field(default=None, repr=False)
    limits: Limits = field(default_factory=Limits)
    default_timeout: float | None = DEFAULT_TIMEOUT
    probe_interval: float | None = DEFAULT_PROBE_INTERVAL
    probe_timeout: float = DEFAULT_PROBE_TIMEOUT
    grace: float = DEFAULT_GRACE
    log_level: str = "info"
    log_format: str = "text"

    @classmethod
    def from_options(
        cls,
        *,
        listen: Sequence[str] = (),
        allowed_cids: Sequence[int] | None = None,
        control: str | None = None,
        token_file: str | None = None,
        control_allow_remote: bool = False,
        default_timeout: float | None = DEFAULT_TIMEOUT,
        probe_interval: float | None = DEFAULT_PROBE_INTERVAL,
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
        grace: float = DEFAULT_GRACE,
        max_command: int | None = None,
        max_stdout: int | None = None,
        max_stderr: int | None = None,
        log_level: str = "info",
        log_format: str = "text",
    ) -> ServeConfig:
        """Check and combine command-line options; UsageError says what is wrong."""
        listeners = tuple(parse_listen_spec(t) for t in listen) or (ListenSpec(DEFAULT_ADDRESS),)
        cids = frozenset(allowed_cids) if allowed_cids else None
        if cids and not any(isinstance(s.address, VsockAddress) for s in listeners):
            raise UsageError("--allowed-cid applies to vsock:// listeners, and there is none")
        control_text = control or default_control_address()
        control_address = parse_address(control_text)
        if not isinstance(control_address, UnixAddress | TcpAddress):
            raise UsageError(
                f"--control {control_text}: the control API listens on unix:PATH or tcp://HOST:PORT"
            )
        token = read_token_file(token_file) if token_file else None
        if isinstance(control_address, TcpAddress):
            if token is None:
                raise UsageError(
                    f"--control {control_address} needs --token-file: on TCP anyone on the"
                    " machine could otherwise run commands in your guests"
                )
            if not _is_loopback(control_address.host) and not control_allow_remote:
                raise UsageError(
                    f"--control {control_address} is not a loopback address; add"
                    " --control-allow-remote to serve the control API beyond this machine"
                )
        base = Limits()
        limits = Limits(
            max_command=base.max_command if max_command is None else max_command,
            max_stdout=base.max_stdout if max_stdout is None else max_stdout,
            max_stderr=base.max_stderr if max_stderr is None else max_stderr,
        )
        return cls(
            listeners=listeners,
            allowed_cids=cids,
            control=control_address,
            token=token,
            limits=limits,
            default_timeout=default_timeout,
            probe_interval=probe_interval,
            probe_timeout=probe_timeout,
            grace=grace,
            log_level=log_level,
            log_format=log_format,
        )


# -- the daemon ---------------------------------------------------------------------------


class Daemon:
    """One run of ``serve``: :meth:`run` until a signal, then a graceful shutdown."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = ServeMetrics()
        self.server = CommandServer(limits=config.limits, default_timeout=config.default_timeout)
        self.control: ControlAPI | None = None
        self._control_file: SocketFile | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._signals = 0
        self._probes: set[asyncio.Task[None]] = set()
        self._probing: set[int] = set()
        self._draining = False

    # -- start ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen for guests and serve the control API; ListenFailed/UsageError if it cannot."""
        from .control_api import ControlAPI

        self.server.subscribe(self._on_guest_event)
        for spec in self.config.listeners:
            vsock = isinstance(spec.address, VsockAddress)
            await self.server.add_listener(
                spec.address,
                label=spec.label,
                allowed_cids=self.config.allowed_cids if vsock else None,
            )
        sock = self._bind_control()
        self.control = ControlAPI(self.server, self.metrics, token=self.config.token)
        try:
            await self.control.start(sock)
        except BaseException:
            sock.close()
            raise
        logger.info(
            "control API on %s%s",
            self._control_text(sock),
            " (bearer token required)" if self.config.token else "",
        )

    def _bind_control(self) -> socket.socket:
        address = self.config.control
        if isinstance(address, UnixAddress):
            parent = os.path.dirname(os.path.abspath(address.path))
            try:
                os.makedirs(parent, mode=0o700, exist_ok=True)
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
            host, port = sock.getsockname()[:2]
            return str(TcpAddress(host, port))
        return str(address)

    # -- guests --------------------------------------------------------------------------

    def _on_guest_event(self, event: GuestEvent) -> Any:
        if event.kind == "disconnected":
            self.metrics.connection_closed(event.channel.connection)
            if not event.guest.connected:
                logger.info("guest %r is gone: no connection left", event.guest.key)
            return None
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
            await channel.aclose()
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
            logger.info(
                "%s: shutting down (up to %s s for running commands; again to stop at once)",
                why,
                self.config.grace,
            )
            self._stop.set()
        else:
            logger.info("%s again: stopping at once", why)
            self._force.set()

    async def run(self) -> int:
        """Start, serve until a signal, shut down; the exit status."""
        loop = asyncio.get_running_loop()
        try:
            await self.start()
        except (VsockAsyncError, OSError) as exc:
            print(f"vsock-async serve: error: {exc}", file=sys.stderr)
            await self._close()
            return 1
        except ImportError as exc:
            print(
                f"vsock-async serve: error: the control API needs aiohttp ({exc});"
                " install it with: pip install 'vsock_async[serve]'",
                file=sys.stderr,
            )
            await self._close()
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, f"received {sig.name}")
        reprobe = None
        if self.config.probe_interval:
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
        return 0

    async def _drain(self) -> None:
        """Stop accepting; wait for running commands until they end, the grace, or a signal."""
        self._draining = True
        self.server.stop_listening()
        control = self.control
        if control is None:
            return
        await control.stop_accepting()
        if not control.running:
            return
        logger.info("waiting for %d running command(s)", control.running)
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
            logger.warning(
                "%d command(s) still running: closing their connections", control.running
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


def run_serve(config: ServeConfig) -> int:
    """Run the daemon in a new event loop until it is stopped; the exit status."""
    configure_logging(config.log_level, config.log_format)
    try:
        return asyncio.run(Daemon(config).run())
    except KeyboardInterrupt:
        return 130

"""What ``serve`` is told: listeners, the control address, limits and timeouts, all checked.

Standard library only: the CLI builds a :class:`ServeConfig` before the daemon
(and aiohttp) is imported, so a bad option is refused at once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from ..addresses import (
    DEFAULT_ADDRESS,
    Address,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)
from ..errors import UsageError
from ..host.negotiate import ProtocolChoice, check_protocol
from ..host.server import DEFAULT_MAX_CONNECTIONS_PER_GUEST
from ..protocol import Limits
from ..timeouts import DEFAULT_TIMEOUT, check_timeout
from .defaults import default_control_address, default_control_path, read_token_file

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_PROBE_INTERVAL",
    "DEFAULT_PROBE_TIMEOUT",
    "ListenSpec",
    "ServeConfig",
    "parse_listen_spec",
]

DEFAULT_PROBE_INTERVAL: Final = 30.0
DEFAULT_PROBE_TIMEOUT: Final = 5.0
DEFAULT_GRACE: Final = 10.0


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
    """Everything ``serve`` is told on its command line, checked.

    Timeouts follow :mod:`vsock_async.timeouts`: seconds, or ``None`` for none
    (no deadline for a command or a probe, no limit on the drain, no periodic
    probes). A ``probe_interval`` of 0 is refused: it would probe without pause.
    """

    listeners: tuple[ListenSpec, ...] = (ListenSpec(DEFAULT_ADDRESS),)
    allowed_cids: frozenset[int] | None = None
    control: UnixAddress | TcpAddress = field(
        default_factory=lambda: UnixAddress(default_control_path())
    )
    metrics: TcpAddress | None = None
    """Where ``GET /metrics`` and ``GET /v1/health`` are also served, read-only and without
    the token: what Prometheus and a kubelet's probes reach. None: only on ``control``."""
    token: str | None = field(default=None, repr=False)
    limits: Limits = field(default_factory=Limits)
    max_connections_per_guest: int | None = DEFAULT_MAX_CONNECTIONS_PER_GUEST
    protocol: ProtocolChoice = "auto"
    default_timeout: float | None = DEFAULT_TIMEOUT
    probe_interval: float | None = DEFAULT_PROBE_INTERVAL
    probe_timeout: float | None = DEFAULT_PROBE_TIMEOUT
    grace: float | None = DEFAULT_GRACE
    log_level: str = "info"
    log_format: str = "text"

    def __post_init__(self) -> None:
        check_protocol(self.protocol)
        check_timeout(self.default_timeout, "--default-timeout")
        check_timeout(self.probe_timeout, "--probe-timeout")
        check_timeout(self.grace, "--grace")
        if check_timeout(self.probe_interval, "--probe-interval") == 0:
            raise UsageError(
                "--probe-interval 0 would probe without pause; use 'none' to turn periodic"
                " probes off"
            )

    @classmethod
    def from_options(
        cls,
        *,
        listen: Sequence[str] = (),
        allowed_cids: Sequence[int] | None = None,
        control: str | None = None,
        metrics: str | None = None,
        token_file: str | None = None,
        control_allow_remote: bool = False,
        max_connections_per_guest: int | None = DEFAULT_MAX_CONNECTIONS_PER_GUEST,
        protocol: ProtocolChoice = "auto",
        default_timeout: float | None = DEFAULT_TIMEOUT,
        probe_interval: float | None = DEFAULT_PROBE_INTERVAL,
        probe_timeout: float | None = DEFAULT_PROBE_TIMEOUT,
        grace: float | None = DEFAULT_GRACE,
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
        metrics_address = parse_address(metrics) if metrics is not None else None
        if metrics_address is not None and not isinstance(metrics_address, TcpAddress):
            raise UsageError(
                f"--metrics {metrics}: metrics and health are served on tcp://HOST:PORT"
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
            metrics=metrics_address,
            token=token,
            limits=limits,
            max_connections_per_guest=max_connections_per_guest,
            protocol=protocol,
            default_timeout=default_timeout,
            probe_interval=probe_interval,
            probe_timeout=probe_timeout,
            grace=grace,
            log_level=log_level,
            log_format=log_format,
        )

"""Counters, gauges and a histogram rendered in the Prometheus text exposition format (0.0.4).

Standard library only: ``serve`` keeps one :class:`ServeMetrics` and its
control API answers ``GET /metrics`` with :meth:`ServeMetrics.render`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ..host.channel import GuestChannel
    from ..host.server import CommandServer

__all__ = [
    "EXCHANGE_BUCKETS",
    "FILE_OPERATIONS",
    "FILE_OUTCOMES",
    "PROMETHEUS_CONTENT_TYPE",
    "Counter",
    "Gauge",
    "Histogram",
    "LabelledCounter",
    "ServeMetrics",
]

PROMETHEUS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

EXCHANGE_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds (seconds) of the exchange latency histogram: a probe to a long build."""

FILE_OPERATIONS: Final = ("put", "get", "stat", "list", "delete", "mkdir", "symlink", "attributes")
"""The file routes of the control API, as the metrics name them."""
FILE_OUTCOMES: Final = ("ok", "file_error", "refused", "failed")
"""How a file operation ended: done; refused by the guest (a ``GuestFileError``: 404 or 422);
refused by the daemon (a bad request, a v1 guest: 400 or 409); or failed (the guest's
connection lost, a download cut short, the client gone, an internal error)."""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A value that only goes up."""

    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0)."""
        if amount < 0:
            raise ValueError(f"a counter cannot go down (inc({amount}))")
        self.value += amount

    def lines(self) -> list[str]:
        return [*self.header(), f"{self.name} {_number(self.value)}"]


class LabelledCounter(_Metric):
    """Counters that only go up, one per value of one label, or per combination of the values
    of several (a fixed set, all always shown)."""

    kind = "counter"

    def __init__(
        self,
        name: str,
        help_text: str,
        label: str | tuple[str, ...],
        values: Iterable[str | tuple[str, ...]],
    ) -> None:
        super().__init__(name, help_text)
        self.labels = _labels(label)
        self.values = dict.fromkeys(map(_labels, values), 0.0)

    def inc(self, value: str | tuple[str, ...], amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0) to the counter of label value(s) ``value`` (one of the set)."""
        if amount < 0:
            raise ValueError(f"a counter cannot go down (inc({value!r}, {amount}))")
        self.values[_labels(value)] += amount

    def lines(self) -> list[str]:
        return [
            *self.header(),
            *(
                f"{self.name}{{{_label_set(self.labels, values)}}} {_number(count)}"
                for values, count in self.values.items()
            ),
        ]


def _labels(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else value


def _label_set(labels: tuple[str, ...], values: tuple[str, ...]) -> str:
    return ",".join(f'{label}="{value}"' for label, value in zip(labels, values, strict=True))


class Gauge(_Metric):
    """A value that is set to what it is now."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self.value = 0.0

    def set(self, value: float) -> None:
        """Record the current value."""
        self.value = value

    def lines(self) -> list[str]:
        return [*self.header(), f"{self.name} {_number(self.value)}"]


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or len(set(bounds)) != len(bounds) or math.isinf(bounds[-1]):
            raise ValueError("histogram buckets must be distinct finite bounds")
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        out = self.header()
        running = 0
        for bound, n in zip([*self.bounds, math.inf], self._counts, strict=True):
            running += n
            out.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        out.append(f"{self.name}_sum {_number(self.sum)}")
        out.append(f"{self.name}_count {self.count}")
        return out


def render(metrics: Iterable[_Metric]) -> str:
    """The exposition text of ``metrics``, one family after another."""
    return "".join(line + "\n" for metric in metrics for line in metric.lines())


class ServeMetrics:
    """What ``serve`` counts: guests, commands, processes and file operations and their
    outcomes, bytes, exchange latency."""

    def __init__(self) -> None:
        self.guests_connected = Gauge(
            "vsock_async_guests_connected", "Guests with at least one open connection."
        )
        self.connections_open = Gauge(
            "vsock_async_connections_open", "Open guest connections, over all guests."
        )
        self.commands = Counter(
            "vsock_async_commands_total", "Commands sent to a guest through the control API."
        )
        self.commands_failed = Counter(
            "vsock_async_commands_failed_total",
            "Commands that exited non-zero or whose guest connection failed.",
        )
        self.commands_timed_out = Counter(
            "vsock_async_commands_timed_out_total", "Commands whose deadline fired."
        )
        self.probes = Counter("vsock_async_probes_total", "Readiness probes sent to guests.")
        self.probes_failed = Counter(
            "vsock_async_probes_failed_total", "Probes that failed; their guest was dropped."
        )
        self.bytes_sent = Counter(
            "vsock_async_bytes_sent_total", "Bytes written to guest connections (command frames)."
        )
        self.bytes_received = Counter(
            "vsock_async_bytes_received_total", "Bytes read from guest connections (results)."
        )
        self.processes_started = Counter(
            "vsock_async_processes_started_total",
            "Processes started in guests by streaming exec.",
        )
        self.processes_running = Gauge(
            "vsock_async_processes_running", "Processes of streaming exec running now."
        )
        self.processes_exited = LabelledCounter(
            "vsock_async_processes_exited_total",
            "Processes of streaming exec that ended: by their exit code, by a signal, stopped"
            " at their timeout, lost with their guest connection, or still running when the"
            " shutdown drain ended.",
            "how",
            ("code", "signal", "timed_out", "lost", "shutdown"),
        )
        self.exec_bytes = LabelledCounter(
            "vsock_async_exec_bytes_total",
            "Bytes streamed by exec: stdin from clients, stdout and stderr to them.",
            "stream",
            ("stdin", "stdout", "stderr"),
        )
        self.file_operations = LabelledCounter(
            "vsock_async_file_operations_total",
            "File operations through the control API, by route and how they ended.",
            ("op", "outcome"),
            [(op, outcome) for op in FILE_OPERATIONS for outcome in FILE_OUTCOMES],
        )
        self.file_bytes = LabelledCounter(
            "vsock_async_file_bytes_total",
            "File bytes streamed by the control API: uploaded from clients into guests,"
            " downloaded from guests to clients.",
            "direction",
            ("upload", "download"),
        )
        self.exchange_seconds = Histogram(
            "vsock_async_exchange_duration_seconds",
            "Duration of command and probe exchanges, queueing included.",
            EXCHANGE_BUCKETS,
        )
        self._closed_sent = 0
        self._closed_received = 0

    def connection_closed(self, channel: GuestChannel) -> None:
        """Keep the byte counts of a connection that is gone (open ones are read live)."""
        self._closed_sent += channel.bytes_sent
        self._closed_received += channel.bytes_received

    def render(self, server: CommandServer | None = None) -> str:
        """Every metric in the Prometheus text format, with ``server``'s live state."""
        if server is not None:
            channels = server.channels
            self.guests_connected.set(len(server.guests))
            self.connections_open.set(len(channels))
            self.bytes_sent.value = self._closed_sent + sum(c.bytes_sent for c in channels)
            self.bytes_received.value = self._closed_received + sum(
                c.bytes_received for c in channels
            )
        return render(
            [
                self.guests_connected,
                self.connections_open,
                self.commands,
                self.commands_failed,
                self.commands_timed_out,
                self.probes,
                self.probes_failed,
                self.bytes_sent,
                self.bytes_received,
                self.processes_started,
                self.processes_running,
                self.processes_exited,
                self.exec_bytes,
                self.file_operations,
                self.file_bytes,
                self.exchange_seconds,
            ]
        )

"""What every benchmark shares: alternating rounds, median-of-ratios summaries, the table, limits.

A benchmark runs ``ours`` and its baselines in alternating rounds in one
process (or one set of processes), so load from other work on the machine
hits both sides alike. Each row quotes the median of the per-round ratios
and their spread (min-max), never a ratio of medians.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

__all__ = [
    "ChildProcess",
    "Endpoint",
    "Row",
    "Table",
    "endpoint",
    "fresh_dir",
    "guest_process",
    "python_process",
    "raise_nofile_limit",
    "read_status_kib",
    "reset_peak_rss",
]


def in_vm() -> bool:
    """True only inside the VM tier's guest (the same test as ``tests.vm.plugin.in_vm``):
    its init sets the variable and its payload carries /vmrun/run.sh."""
    return os.environ.get("VSOCK_ASYNC_IN_VM") == "1" and os.path.isfile("/vmrun/run.sh")


# Outside the VM tier's guest no benchmark ever connects AF_VSOCK; children inherit the guard.
if not in_vm():
    os.environ.setdefault("VSOCK_ASYNC_FORBID_VSOCK_CONNECT", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Row:
    """One comparison: our figure against a baseline's, one value per round each.

    ``higher_is_better`` says how to read the unit (rates: yes; seconds, bytes: no);
    the ratio is always ours/baseline for rates and baseline/ours for costs, so a
    ratio above 1 always means we are ahead.
    """

    name: str
    unit: str
    ours: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    baseline_name: str = ""
    higher_is_better: bool = True
    target: float | None = None

    def add(self, ours: float, baseline: float) -> None:
        self.ours.append(ours)
        self.baseline.append(baseline)

    def ratios(self) -> list[float]:
        """One ratio per round; ``inf`` where the side divided by is 0 and the other is not
        (a cost of 0 against any cost is ahead by any factor), 1 where both are 0."""
        pairs = zip(self.ours, self.baseline, strict=True)
        if self.higher_is_better:
            return [_ratio(o, b) for o, b in pairs]
        return [_ratio(b, o) for o, b in pairs]


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return math.inf if a > 0 else 1.0


@dataclass
class Single:
    """A figure with no baseline to compare against (memory per guest, for example)."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    limit: float | None = None  # at most this much, when there is a target


@dataclass
class Table:
    """The results of one benchmark, printed as a fixed-width table."""

    title: str
    rows: list[Row | Single] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, *args: object, **kwargs: object) -> Row:
        r = Row(*args, **kwargs)  # type: ignore[arg-type]
        self.rows.append(r)
        return r

    def single(self, *args: object, **kwargs: object) -> Single:
        s = Single(*args, **kwargs)  # type: ignore[arg-type]
        self.rows.append(s)
        return s

    def render(self) -> str:
        lines = [f"== {self.title}"]
        header = (
            f"{'measure':<64} {'ours':>12} {'baseline':>12} {'ratio':>7}"
            f" {'spread':>13} {'target':>8}  {'ok':<3} vs"
        )
        lines.append(header)
        lines.append("-" * len(header))
        for r in self.rows:
            if isinstance(r, Single):
                median = statistics.median(r.values) if r.values else float("nan")
                spread = f"{_fmt(min(r.values))}-{_fmt(max(r.values))}" if r.values else ""
                target = f"<={_fmt(r.limit)}" if r.limit is not None else ""
                ok = "" if r.limit is None else ("yes" if median <= r.limit else "NO")
                lines.append(
                    f"{r.name + ' [' + r.unit + ']':<64} {_fmt(median):>12} {'':>12} {'':>7}"
                    f" {spread:>13} {target:>8}  {ok:<3}"
                )
                continue
            ratios = r.ratios()
            if not ratios:
                continue
            ratio = statistics.median(ratios)
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
            target = f">={r.target:.2f}" if r.target is not None else ""
            ok = "" if r.target is None else ("yes" if ratio >= r.target else "NO")
            lines.append(
                f"{r.name + ' [' + r.unit + ']':<64} {_fmt(statistics.median(r.ours)):>12}"
                f" {_fmt(statistics.median(r.baseline)):>12} {ratio:>6.2f}x {spread:>13}"
                f" {target:>8}  {ok:<3} {r.baseline_name}"
            )
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


TRANSPORTS = ("unix", "vsock")
# Below 1024: vsock auto-binds client ports above 1023 in sequence, and a later listener must
# never find its port taken by an earlier client (docs/testing.md, "Writing VM tests").
_VSOCK_PORTS = itertools.count(600)


@dataclass(frozen=True)
class Endpoint:
    """Where one host side listens and how its guest dials it, on one transport.

    ``address`` is for ``vsock_async.listen``; ``guest`` is the ``--connect`` argument of
    ``benchmarks._guest``; ``raw_listener()`` is a plain listening socket for the baselines.
    """

    transport: str
    address: str
    guest: str
    bind: str | tuple[int, int]

    def raw_listener(self) -> socket.socket:
        family = socket.AF_UNIX if self.transport == "unix" else socket.AF_VSOCK
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind(self.bind)
            sock.listen(1)
        except BaseException:
            sock.close()
            raise
        return sock


def endpoint(transport: str, directory: str, name: str) -> Endpoint:
    """A fresh endpoint: a socket file in ``directory``, or the next vsock port.

    Over vsock the host side listens on ``VMADDR_CID_ANY`` and the guest dials CID 2 (the
    host); only inside the VM tier's guest, where vsock_loopback carries it.
    """
    if transport == "unix":
        path = os.path.join(directory, f"{name}.sock")
        return Endpoint("unix", f"unix:{path}", path, path)
    if transport != "vsock":
        raise ValueError(f"unknown transport {transport!r}")
    if os.environ.get("VSOCK_ASYNC_FORBID_VSOCK_CONNECT") or not in_vm():
        raise SystemExit(
            "--transport vsock runs only inside the VM tier's guest"
            " (python -m benchmarks.vm): never connect AF_VSOCK on this machine"
        )
    port = next(_VSOCK_PORTS)
    return Endpoint(
        "vsock", f"vsock://any:{port}", f"vsock://2:{port}", (socket.VMADDR_CID_ANY, port)
    )


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@contextlib.contextmanager
def fresh_dir() -> Iterator[str]:
    """A private temporary directory for socket files, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="vsock-bench-") as path:
        yield path


@contextlib.contextmanager
def python_process(args: Sequence[str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python ARGS`` from the repository for the duration; killed (by its pid) after."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


ChildProcess = contextlib.AbstractContextManager[subprocess.Popen[bytes]]


def guest_process(args: Sequence[str]) -> ChildProcess:
    """Run ``python -m benchmarks._guest ARGS`` for the duration; killed (by its pid) after."""
    return python_process(["-m", "benchmarks._guest", *args])


def read_status_kib(field_name: str, pid: int | str = "self") -> int:
    """A ``kB`` figure from /proc/PID/status (VmRSS, VmHWM, ...), this process's by default."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def reset_peak_rss(pid: int | str = "self") -> None:
    """Make VmHWM of process ``pid`` (this one by default) start again from its current RSS
    (Linux: write 5 to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` itself, its threads included (not its
    children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

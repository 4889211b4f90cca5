"""Benchmark 4: commands end to end through the host library and the real agent, vs a local spawn.

Ours: ``GuestChannel.run(...)`` to ``python -m vsock_async agent`` (its own process, dialling
the host's Unix socket), which runs ``/bin/sh -c COMMAND`` and sends back stdout, stderr and
the exit code. Baselines, the same command started in the host process directly:
``subprocess.run(..., capture_output=True)`` (blocking: the cheapest local spawn) and
``asyncio.create_subprocess_exec(...)`` with ``communicate()``. Two commands:

- ``true``: the cost of one command, per command;
- ``head -c 100000000 /dev/zero``: 100 MB of output through the agent against reading it
  directly; the agent's own CPU time (``/proc/PID/stat``) and its peak RSS above idle
  (``/proc/PID/clear_refs`` ``5``, then ``VmHWM``) are reported with it.

The probe ``:`` needs no process at all and is benchmark 1's subject.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable

import vsock_async

from ._harness import ChildProcess, Table, fresh_dir, python_process

NAME = "agent"
SHELL = "/bin/sh"
TRUE = "true"
BULK_BYTES = 100_000_000
TICK = os.sysconf("SC_CLK_TCK")

Measure = tuple[float, float]  # (seconds per command, host CPU seconds per command)


def agent_process(address: str, max_output: int) -> ChildProcess:
    """The real agent dialling ``address``; killed by its pid afterwards."""
    args = ["-m", "vsock_async", "agent", "--connect", address, "--log-level", "warning"]
    return python_process([*args, "--max-output", str(max_output)])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` itself (not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kib(pid: int, field_name: str) -> int:
    """A ``kB`` figure from /proc/PID/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def reset_peak_rss(pid: int) -> None:
    """Make VmHWM of ``pid`` start again from its current RSS."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def _timed(n: int, once: Callable[[], None]) -> Measure:
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        once()
    return (time.perf_counter() - start) / n, (time.process_time() - cpu) / n


async def _timed_async(n: int, once: Callable[[], Awaitable[None]]) -> Measure:
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        await once()
    return (time.perf_counter() - start) / n, (time.process_time() - cpu) / n


def local_run(command: str, size: int) -> None:
    done = subprocess.run([SHELL, "-c", command], capture_output=True, check=True)
    assert len(done.stdout) == size


async def local_exec(command: str, size: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        SHELL, "-c", command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and len(out) == size


class _Agent:
    """Our channel to a real agent, with the agent's pid for its CPU and memory."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, channel: vsock_async.GuestChannel, pid: int
    ):
        self.loop = loop
        self.channel = channel
        self.pid = pid
        self.cpu: list[float] = []  # the agent's CPU seconds per command, per round
        self.peak_mib: list[float] = []

    async def _one(self, command: str, size: int) -> None:
        result = await self.channel.run(command, timeout=120)
        assert result.exit_code == 0 and len(result.stdout) == size, result.stderr[-200:]

    def measure(self, command: str, size: int, n: int) -> Measure:
        idle = status_kib(self.pid, "VmRSS")
        reset_peak_rss(self.pid)
        agent_cpu = cpu_seconds(self.pid)
        measure = self.loop.run_until_complete(_timed_async(n, lambda: self._one(command, size)))
        self.cpu.append((cpu_seconds(self.pid) - agent_cpu) / n)
        self.peak_mib.append((status_kib(self.pid, "VmHWM") - idle) / 1024)
        return measure


def _compare(
    table: Table,
    label: str,
    unit_scale: float,
    unit: str,
    agent: _Agent,
    command: str,
    size: int,
    n: int,
    rounds: int,
    target: float | None,
) -> None:
    loop = agent.loop
    contenders: dict[str, Callable[[], Measure]] = {
        "ours": lambda: agent.measure(command, size, n),
        "subprocess.run": lambda: _timed(n, lambda: local_run(command, size)),
        "create_subprocess_exec": lambda: loop.run_until_complete(
            _timed_async(n, lambda: local_exec(command, size))
        ),
    }
    order = list(contenders)
    for name in order:  # warm up every path once
        contenders[name]()
    agent.cpu.clear()
    agent.peak_mib.clear()
    measures: dict[str, list[Measure]] = {name: [] for name in order}
    for r in range(rounds):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            measures[name].append(contenders[name]())
    for base in order[1:]:
        time_row = table.row(
            f"{label}: agent vs local {base}",
            unit,
            baseline_name=base,
            higher_is_better=False,
            target=target if base == "create_subprocess_exec" else None,
        )
        cpu_row = table.row(
            f"{label}: host CPU, agent vs local {base}",
            f"CPU {unit}",
            baseline_name=base,
            higher_is_better=False,
        )
        for o, b in zip(measures["ours"], measures[base], strict=True):
            time_row.add(o[0] * unit_scale, b[0] * unit_scale)
            cpu_row.add(o[1] * unit_scale, b[1] * unit_scale)
    table.single(
        f"{label}: the agent's own CPU per command",
        f"CPU {unit}",
        [c * unit_scale for c in agent.cpu],
    )
    table.single(f"{label}: the agent's peak RSS above idle", "MiB", list(agent.peak_mib))


def run(quick: bool = False, rounds: int | None = None) -> Table:
    n = 5 if quick else 100
    size = 4_000_000 if quick else BULK_BYTES
    rounds = rounds or (2 if quick else 9)
    bulk_rounds = rounds if quick else max(3, rounds // 2)
    table = Table(
        f"4. agent: `true` ({rounds} rounds of {n}) and {size / 1e6:g} MB of output"
        f" ({bulk_rounds} rounds of 1) end to end, against local spawns"
    )
    loop = asyncio.new_event_loop()
    try:
        with fresh_dir() as d:
            path = os.path.join(d, "host.sock")
            limits = vsock_async.Limits(max_stdout=size)
            server = loop.run_until_complete(vsock_async.listen(f"unix:{path}", limits=limits))
            try:
                with agent_process(f"unix:{path}", size) as proc:
                    channel = loop.run_until_complete(server.accept(timeout=30))
                    agent = _Agent(loop, channel, proc.pid)
                    _compare(table, TRUE, 1000, "ms", agent, TRUE, 0, n, rounds, 0.9)
                    bulk = f"head -c {size} /dev/zero"
                    _compare(
                        table, f"{size / 1e6:g} MB", 1, "s", agent, bulk, size, 1, bulk_rounds, 0.8
                    )
            finally:
                loop.run_until_complete(server.aclose())
    finally:
        loop.close()
    table.notes.append(
        "time and CPU ratios are local/agent: above 1 means the agent is faster; the targets"
        " (issue 15) are against create_subprocess_exec"
    )
    table.notes.append(
        "host CPU = process_time of the host process; the agent's own CPU is utime+stime of"
        " the agent process (/proc/PID/stat; its children, the shells, not included)"
    )
    return table

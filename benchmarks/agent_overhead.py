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
import contextlib
import functools
import math
import os
import subprocess
import time
from asyncio.subprocess import DEVNULL
from collections.abc import Awaitable, Callable

import vsock_async

from ._harness import (
    ChildProcess,
    Table,
    cpu_seconds,
    fresh_dir,
    python_process,
    read_status_kib,
    reset_peak_rss,
)

NAME = "agent"
SHELL = "/bin/sh"
TRUE = "true"
BULK_BYTES = 100_000_000

Measure = tuple[float, float]  # (seconds per command, host CPU seconds per command)
# ... and the agent's own CPU seconds per command and its peak RSS above idle (MiB; NaN for
# the local spawns)
Sample = tuple[float, float, float, float]
STREAM_MEMORY_MIB = 16


def agent_process(address: str, max_output: int) -> ChildProcess:
    """The real agent dialling ``address``; killed by its pid afterwards."""
    args = ["-m", "vsock_async", "agent", "--connect", address, "--log-level", "warning"]
    return python_process([*args, "--max-output", str(max_output)])


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
    """Our channel to one real agent, with the agent's pid for its CPU and memory."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, channel: vsock_async.GuestChannel, pid: int
    ):
        self.loop = loop
        self.channel = channel
        self.pid = pid
        self.buffer = bytearray(256 * 1024)  # what a streamed output is read into, reused

    async def _run(self, command: str, size: int) -> None:
        result = await self.channel.run(command, timeout=120)
        assert result.exit_code == 0 and len(result.stdout) == size, result.stderr[-200:]

    async def _stream(self, command: str, size: int) -> None:
        proc = await self.channel.create_process([SHELL, "-c", command], stderr=DEVNULL)
        assert proc.stdout is not None
        got = 0
        while n := await proc.stdout.readinto(self.buffer):
            got += n
        assert await proc.wait() == 0 and got == size

    def measure(self, command: str, size: int, n: int, stream: bool) -> Sample:
        """``n`` commands: seconds and host CPU per command, the agent's own CPU per command
        and its peak RSS above idle (MiB)."""
        one = self._stream if stream else self._run
        idle = read_status_kib("VmRSS", self.pid)
        reset_peak_rss(self.pid)
        agent_cpu = cpu_seconds(self.pid)
        seconds, host_cpu = self.loop.run_until_complete(
            _timed_async(n, lambda: one(command, size))
        )
        agent_cpu = (cpu_seconds(self.pid) - agent_cpu) / n
        return seconds, host_cpu, agent_cpu, (read_status_kib("VmHWM", self.pid) - idle) / 1024


def _no_agent(measure: Callable[[], Measure]) -> Sample:
    """A local spawn's measure as a sample: no agent, so no agent CPU or memory."""
    return (*measure(), math.nan, math.nan)


def _compare(
    table: Table,
    label: str,
    unit: tuple[str, float],
    ours: dict[str, Callable[[], Sample]],
    local: dict[str, Callable[[], Measure]],
    rounds: int,
    target: float | None,
) -> None:
    """Alternate rounds of every contender; rows of each of ours against each local spawn."""
    unit_name, scale = unit
    contenders: dict[str, Callable[[], Sample]] = dict(ours)
    for name, measure in local.items():
        contenders[name] = functools.partial(_no_agent, measure)
    order = list(contenders)
    for name in order:  # warm up every path once
        contenders[name]()
    samples: dict[str, list[Sample]] = {name: [] for name in order}
    for r in range(rounds):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            samples[name].append(contenders[name]())
    for mine in ours:
        for base in local:
            time_row = table.row(
                f"{label}: {mine} vs local {base}",
                unit_name,
                baseline_name=base,
                higher_is_better=False,
                target=target if base == "create_subprocess_exec" else None,
            )
            cpu_row = table.row(
                f"{label}: host CPU, {mine} vs local {base}",
                f"CPU {unit_name}",
                baseline_name=base,
                higher_is_better=False,
            )
            for o, b in zip(samples[mine], samples[base], strict=True):
                time_row.add(o[0] * scale, b[0] * scale)
                cpu_row.add(o[1] * scale, b[1] * scale)
        table.single(
            f"{label}: {mine}: the agent's own CPU per command",
            f"CPU {unit_name}",
            [x[2] * scale for x in samples[mine]],
        )
        table.single(
            f"{label}: {mine}: the agent's peak RSS above idle",
            "MiB",
            [x[3] for x in samples[mine]],
            limit=STREAM_MEMORY_MIB if "stream" in mine else None,
        )


def run(quick: bool = False, rounds: int | None = None) -> Table:
    n = 5 if quick else 100
    size = 4_000_000 if quick else BULK_BYTES
    rounds = rounds or (2 if quick else 9)
    bulk_rounds = rounds if quick else max(3, rounds // 2)
    table = Table(
        f"4. agent: `true` ({rounds} rounds of {n}) and {size / 1e6:g} MB of output"
        f" ({bulk_rounds} rounds of 1) end to end over v1 and v2, against local spawns"
    )
    loop = asyncio.new_event_loop()
    bulk = f"head -c {size} /dev/zero"
    local: dict[str, Callable[[str, int, int], Measure]] = {
        "subprocess.run": lambda c, k, m: _timed(m, lambda: local_run(c, k)),
        "create_subprocess_exec": lambda c, k, m: loop.run_until_complete(
            _timed_async(m, lambda: local_exec(c, k))
        ),
    }
    try:
        with contextlib.ExitStack() as stack, fresh_dir() as d:
            agents = {}
            for protocol in ("v1", "v2"):
                path = os.path.join(d, f"{protocol}.sock")
                server = loop.run_until_complete(
                    vsock_async.listen(
                        f"unix:{path}",
                        limits=vsock_async.Limits(max_stdout=size),
                        protocol=protocol,
                    )
                )
                stack.callback(loop.run_until_complete, server.aclose())
                proc = stack.enter_context(agent_process(f"unix:{path}", size))
                channel = loop.run_until_complete(server.accept(timeout=30))
                assert channel.protocol == protocol
                agents[protocol] = _Agent(loop, channel, proc.pid)
            v1, v2 = agents["v1"], agents["v2"]
            _compare(
                table,
                TRUE,
                ("ms", 1000),
                {
                    "agent v1": lambda: v1.measure(TRUE, 0, n, stream=False),
                    "agent v2": lambda: v2.measure(TRUE, 0, n, stream=False),
                },
                {name: functools.partial(f, TRUE, 0, n) for name, f in local.items()},
                rounds,
                0.9,
            )
            _compare(
                table,
                f"{size / 1e6:g} MB",
                ("s", 1),
                {
                    "agent v1 run()": lambda: v1.measure(bulk, size, 1, stream=False),
                    "agent v2 run()": lambda: v2.measure(bulk, size, 1, stream=False),
                    "agent v2 streamed": lambda: v2.measure(bulk, size, 1, stream=True),
                },
                {name: functools.partial(f, bulk, size, 1) for name, f in local.items()},
                bulk_rounds,
                0.8,
            )
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
    table.notes.append(
        "v2 streamed: create_process() and readinto() one reused 256 KiB buffer; the agent's"
        f" memory target (issue 15) is at most {STREAM_MEMORY_MIB} MiB above idle"
    )
    return table

"""Benchmark 4: ``true`` end to end through the host library and the real agent, vs a local spawn.

Ours: ``GuestChannel.run("true")`` to ``python -m vsock_async agent`` (its
own process, dialling the host's Unix socket), which runs ``/bin/sh -c
true`` and sends back stdout, stderr and the exit code. Baseline: the same
command started directly with ``asyncio.create_subprocess_exec("/bin/sh",
"-c", "true")``, its output collected with ``communicate()``, as the agent
does. The probe ``:`` needs no process at all and is benchmark 1's subject.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import vsock_async

from ._harness import ChildProcess, Table, fresh_dir, python_process

NAME = "agent"
TARGET = 1.3


def agent_process(address: str) -> ChildProcess:
    """The real agent dialling ``address``; killed by its pid afterwards."""
    args = ["-m", "vsock_async", "agent", "--connect", address, "--log-level", "warning"]
    return python_process(args)


async def ours_per_command(channel: vsock_async.GuestChannel, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        result = await channel.run("true", timeout=30)
        assert result.exit_code == 0
    return (time.perf_counter() - start) / n


async def local_per_command(n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", "true", stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        await proc.communicate()
        assert proc.returncode == 0
    return (time.perf_counter() - start) / n


def run(quick: bool = False, rounds: int | None = None) -> Table:
    n = 5 if quick else 100
    rounds = rounds or (2 if quick else 9)
    table = Table(f"4. agent overhead: `true` end to end ({n} commands per round)")
    row = table.row(
        "per command: agent vs local create_subprocess_exec",
        "ms",
        baseline_name="local spawn",
        higher_is_better=False,
        target=1 / TARGET,
    )
    loop = asyncio.new_event_loop()
    try:
        with fresh_dir() as d:
            path = os.path.join(d, "host.sock")
            server = loop.run_until_complete(vsock_async.listen(f"unix:{path}"))
            try:
                with agent_process(f"unix:{path}"):
                    channel = loop.run_until_complete(server.accept(timeout=30))
                    loop.run_until_complete(ours_per_command(channel, max(2, n // 10)))
                    loop.run_until_complete(local_per_command(max(2, n // 10)))
                    for r in range(rounds):
                        run_ = loop.run_until_complete
                        if r % 2:
                            base = run_(local_per_command(n))
                            mine = run_(ours_per_command(channel, n))
                        else:
                            mine = run_(ours_per_command(channel, n))
                            base = run_(local_per_command(n))
                        row.add(mine * 1000, base * 1000)
            finally:
                loop.run_until_complete(server.aclose())
    finally:
        loop.close()
    table.notes.append(
        f"ratio is local/agent time: the target 'at most {TARGET}x the local spawn' is"
        f" ratio >= {1 / TARGET:.2f}"
    )
    return table

"""Benchmark 4b: the v1 agent's peak memory for one command with large output on both streams.

Ours: the real agent (``python -m vsock_async agent``, its own process)
runs ``head -c N /dev/zero; head -c N /dev/zero >&2`` for our host and
sends the result back; before each command its peak RSS is reset
(``/proc/PID/clear_refs`` ``5``) and afterwards ``VmHWM`` minus the RSS it
had just before is its cost. The command's output is exactly
``--max-output`` per stream, so all ``2 N`` bytes are captured and sent.
Baseline: the same command in a fresh Python process, its output collected
with ``asyncio.create_subprocess_exec(...).communicate()``, the plain
asyncio way to capture a command's output, measured the same way. It only
captures; the agent also frames and sends.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import vsock_async

from ._harness import Table, fresh_dir, python_process, read_status_kib, reset_peak_rss

NAME = "agent-memory"
MiB = 1024 * 1024
SLACK_MIB = 8  # "about 1x the captured output plus a few MiB"

BASELINE = """
import asyncio, gc, json, sys

def status(name):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(name + ":"))

async def main(command):
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return len(out) + len(err)

command = sys.argv[1]
asyncio.run(main("true"))
gc.collect()
idle = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
captured = asyncio.run(main(command))
print(json.dumps({"idle_kib": idle, "peak_kib": status("VmHWM"), "captured": captured}))
"""


def command_for(size: int) -> str:
    return f"head -c {size} /dev/zero; head -c {size} /dev/zero >&2"


async def ours(channel: vsock_async.GuestChannel, pid: int, size: int) -> float:
    """MiB the agent's RSS peaked above its idle RSS while answering one command."""
    await channel.run("true", timeout=60)
    idle = read_status_kib("VmRSS", pid)
    reset_peak_rss(pid)
    result = await channel.run(command_for(size), timeout=60)
    assert (len(result.stdout), len(result.stderr)) == (size, size), result.stderr[-200:]
    return (read_status_kib("VmHWM", pid) - idle) / 1024


def baseline(size: int) -> float:
    """MiB a fresh Python process's RSS peaked above idle while capturing the same output."""
    done = subprocess.run(
        [sys.executable, "-c", BASELINE, command_for(size)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    figures = json.loads(done.stdout)
    assert figures["captured"] == 2 * size
    return float(figures["peak_kib"] - figures["idle_kib"]) / 1024


def run(quick: bool = False, rounds: int | None = None) -> Table:
    size = (4 if quick else 64) * MiB
    rounds = rounds or (2 if quick else 5)
    captured_mib = 2 * size / MiB
    table = Table(f"4b. agent memory: one command writing {size // MiB} MiB to each stream")
    row = table.row(
        "peak RSS above idle: agent vs communicate()",
        "MiB",
        baseline_name="asyncio communicate()",
        higher_is_better=False,
    )
    per_byte = table.single(
        "agent: peak RSS above idle / captured bytes",
        "x",
        limit=1 + SLACK_MIB / captured_mib,
    )
    loop = asyncio.new_event_loop()
    try:
        with fresh_dir() as d:
            path = os.path.join(d, "host.sock")
            # v1, where the agent holds the output to send it whole (over v2 it streams it:
            # benchmark 4 measures that)
            server = loop.run_until_complete(vsock_async.listen(f"unix:{path}", protocol="v1"))
            args = ["-m", "vsock_async", "agent", "--connect", f"unix:{path}"]
            args += ["--max-output", str(size), "--log-level", "warning"]
            try:
                with python_process(args) as agent:
                    channel = loop.run_until_complete(server.accept(timeout=30))
                    for r in range(rounds):
                        if r % 2:
                            base = baseline(size)
                            mine = loop.run_until_complete(ours(channel, agent.pid, size))
                        else:
                            mine = loop.run_until_complete(ours(channel, agent.pid, size))
                            base = baseline(size)
                        row.add(mine, base)
                        per_byte.values.append(mine / captured_mib)
            finally:
                loop.run_until_complete(server.aclose())
    finally:
        loop.close()
    table.notes.append(
        f"captured output: {captured_mib:g} MiB per command; the target is about 1x that"
        f" plus {SLACK_MIB} MiB"
    )
    return table

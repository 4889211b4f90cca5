"""The benchmark scripts run on tiny sizes and print their tables. No timing is asserted here:
performance targets belong to the benchmarks themselves (docs/performance.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from benchmarks.instructions import CONTENDERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_benchmarks(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--rounds", "1", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize(
    ("name", "title", "rows"),
    [
        (
            "exchange",
            "1. exchange rate",
            [
                "asyncio: ours probe vs floor [exch/s]",
                "asyncio: ours probe vs floor [CPU us/exch]",
                "asyncio: ours run('echo') vs floor [exch/s]",
                "asyncio: ours probe vs floor + call_later",
                "asyncio: ours probe vs streams + asyncio.timeout",
                "asyncio: ours probe vs blocking sockets",
                "uvloop: ours probe vs floor [exch/s]",
            ],
        ),
        (
            "bulk",
            "2. bulk",
            [
                "ours vs lazy-mmap [MiB/s]",
                "ours vs lazy-mmap [receiver CPU ms]",
                "ours vs makefile-read [MiB/s]",
                "ours vs raw-preallocated [MiB/s]",
                "ours: peak RSS above idle",
            ],
        ),
        (
            "many",
            "3. many guests",
            [
                "N=1: accept+probe all, ours vs streams",
                "N=10: aggregate rate, ours vs streams",
                "N=10: aggregate rate, ours vs threads",
                "N=10: server CPU per exchange, ours vs streams",
                "N=10: p99 latency, ours vs threads",
                "N=10: close all, ours vs streams",
                "N=10: aggregate rate, ours + gc.freeze() vs ours",
                "N=10: ours: server RSS per idle guest",
                "N=10: streams: server RSS per idle guest",
            ],
        ),
        (
            "agent",
            "4. agent",
            [
                "true: agent v1 vs local create_subprocess_exec [ms]",
                "true: agent v2 vs local subprocess.run [ms]",
                "true: host CPU, agent v1 vs local create_subprocess_exec",
                "true: agent v2: the agent's own CPU per command",
                "4 MB: agent v1 run() vs local create_subprocess_exec [s]",
                "4 MB: agent v2 run() vs local create_subprocess_exec [s]",
                "4 MB: agent v2 streamed vs local create_subprocess_exec [s]",
                "4 MB: agent v2 streamed: the agent's peak RSS above idle",
            ],
        ),
        (
            "v2",
            "5. v2",
            [
                "8 x `true`: at once on one v2 connection vs one at a time, blocking v1",
                "8 x `true`: host CPU per command",
                "8 MiB: create_process + readinto vs local Popen + readinto",
                "8 MiB: host peak RSS above idle while ours streams",
            ],
        ),
        (
            "files",
            "6. files",
            [
                "upload: put_file vs raw socket copy [MiB/s]",
                "upload: host CPU [CPU s]",
                "download: get_file vs raw socket copy [MiB/s]",
                "upload: agent peak RSS above idle while ours runs",
                "download: host peak RSS above idle while ours runs",
            ],
        ),
        (
            "agent-memory",
            "4b. agent memory",
            [
                "peak RSS above idle: agent vs communicate()",
                "agent: peak RSS above idle / captured bytes",
            ],
        ),
    ],
)
def test_benchmark_runs_and_prints_its_table(name: str, title: str, rows: list[str]) -> None:
    out = _run_benchmarks("--only", name)
    assert out.startswith("# "), out  # the machine line
    assert f"== {title}" in out
    for row in rows:
        line = next((ln for ln in out.splitlines() if ln.startswith(row)), None)
        assert line is not None, f"row {row!r} missing from:\n{out}"
        # a ratio with its spread, or a figure with its limit or its spread
        assert "x " in line or "<=" in line or re.search(r"\d-\d", line), line


@pytest.mark.parametrize("name", sorted(CONTENDERS))
def test_each_counted_loop_runs_without_valgrind(name: str) -> None:
    """What benchmarks.instructions runs under callgrind, run plainly: it must work for the
    counts to mean anything (valgrind itself is too slow for the suite)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.instructions", "--run", name, "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_unknown_benchmark_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "nonesuch"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


def test_vsock_transport_is_refused_outside_the_vm() -> None:
    """The guard that keeps benchmarks from ever connecting AF_VSOCK on this machine."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "exchange",
            "--transport",
            "vsock",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "only inside the VM tier's guest" in proc.stderr
    assert "== 1." not in proc.stdout


def test_vsock_guest_refuses_to_dial_while_the_guard_is_set() -> None:
    env = {**os.environ, "VSOCK_ASYNC_FORBID_VSOCK_CONNECT": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._guest", "--connect", "vsock://2:600"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode != 0
    assert "refusing to connect AF_VSOCK" in proc.stderr


def test_vm_guest_side_is_refused_on_the_host() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.vm", "--in-guest"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "only inside the VM tier's guest" in proc.stderr

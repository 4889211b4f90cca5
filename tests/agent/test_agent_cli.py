"""The agent's command line: sizes with K/M/G, timeouts by the one rule of
``vsock_async.timeouts``, and the single-file form's own usage and options."""

from __future__ import annotations

import asyncio
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import vsock_async
from tests.agent_process import (
    BUILD_SCRIPT,
    LONG,
    build_single_file,
    served_agent,
    short_socket_path,
    single_file_agent,
)


def agent_cli(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    """``python -m vsock_async agent ARGS`` run to its end (it must refuse to start)."""
    return subprocess.run(
        [python, "-m", "vsock_async", "agent", *args],
        capture_output=True,
        text=True,
        timeout=LONG,
    )


@pytest.mark.asyncio
async def test_sizes_take_k_m_g_suffixes(tmp_path: Path) -> None:
    options = ("--max-output", "1K", "--max-command", "1k")
    async with served_agent(tmp_path, "sizes.sock", *options, protocol="v1") as (_, guest, _):
        cut = await guest.run("yes | head -c 5000", timeout=LONG)
        assert cut.stdout == b"y\n" * 512
        assert b"stdout cut to its first 1024 bytes of 5000 (--max-output)" in cut.stderr
        assert (await guest.run(b"#" * 1024, timeout=LONG)).exit_code == 0
        refused = await guest.run(b"#" * 1025, timeout=LONG)
        assert refused.exit_code == 126
        assert b"longer than the agent's limit of 1024 bytes" in refused.stderr


@pytest.mark.asyncio
async def test_the_sizes_of_the_issue_are_accepted(tmp_path: Path) -> None:
    options = ("--max-output", "10M", "--max-command", "2M")
    async with served_agent(tmp_path, "issue.sock", *options, protocol="v1") as (_, guest, _):
        result = await guest.run(f"head -c {10 * 1024 * 1024 + 1} /dev/zero", timeout=LONG)
        assert len(result.stdout) == 10 * 1024 * 1024
        assert b"of 10485761 (--max-output)" in result.stderr


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-output", "10Q", "'10Q' is not a size"),
        ("--max-command", "-1", "'-1' is not a size"),
        ("--max-output", "5G", "max_output must be a number of bytes in 0..4294967295"),
        ("--command-timeout", "soon", "--command-timeout 'soon' is not a number of seconds"),
        ("--command-timeout", "-1", "--command-timeout must be a finite number of seconds"),
        ("--output-grace", "inf", "--output-grace must be a finite number of seconds"),
        ("--command-timeout", "0", "command_timeout of 0 s would kill every command"),
    ],
)
def test_bad_values_are_refused_with_exit_2(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    done = agent_cli("--connect", f"unix:{tmp_path}/none.sock", option, value)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


@pytest.mark.asyncio
async def test_no_command_timeout_and_no_output_grace(tmp_path: Path) -> None:
    options = ("--command-timeout", "none", "--output-grace", "0")
    async with served_agent(tmp_path, "none.sock", *options, protocol="v1") as (_, guest, _):
        assert (await guest.run("sleep 0.2; echo slow", timeout=LONG)).stdout == b"slow\n"
        held = await guest.run("sleep 30 & echo started", timeout=LONG)
        assert held.stdout == b"started\n"
        assert b"kept stdout or stderr open for 0 s" in held.stderr


def test_help_names_the_one_timeout_rule() -> None:
    done = agent_cli("--help")
    assert done.returncode == 0
    assert done.stdout.startswith("usage: vsock-async agent [-h]")
    text = " ".join(done.stdout.split())
    assert "'none' for no limit" in text
    assert "K, M or G" in text


def test_single_file_usage_takes_no_subcommand(tmp_path: Path) -> None:
    single = build_single_file(tmp_path)
    bare = (sys.executable, "-S", "-E", str(single))
    helped = subprocess.run([*bare, "--help"], capture_output=True, text=True, timeout=LONG)
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: vsock-async-agent [-h] [--connect ADDRESS")
    assert "vsock-async-agent agent" not in helped.stdout
    wrong = subprocess.run([*bare, "agent"], capture_output=True, text=True, timeout=LONG)
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("usage: vsock-async-agent [-h]")
    assert "unrecognized arguments: agent" in wrong.stderr


def test_the_single_file_build_refuses_one_name_bound_to_two_things() -> None:
    """Its modules share one namespace: an import must not hide another module's name."""
    check = runpy.run_path(str(BUILD_SCRIPT))["_check_names"]
    check({"a": "from types import FrameType\n", "b": "from types import FrameType\n"})
    with pytest.raises(SystemExit, match="FrameType is bound in both a and b"):
        check({"a": "class FrameType: ...\n", "b": "from types import FrameType\n"})
    with pytest.raises(SystemExit, match="limit is bound in both a and b"):
        check({"a": "limit = 1\n", "b": "def limit() -> None: ...\n"})


@pytest.mark.asyncio
async def test_single_file_takes_timeouts_and_sizes(tmp_path: Path) -> None:
    path = short_socket_path(tmp_path, "single.sock")
    options = ("--command-timeout", "0.3", "--output-grace", "0.5", "--max-output", "1K")
    async with (
        vsock_async.listen(f"unix:{path}", protocol="v1") as server,
        single_file_agent("--connect", f"unix:{path}", *options, tmp_path=tmp_path) as proc,
    ):
        guest = await server.accept(timeout=LONG)
        slow = await guest.run("sleep 30", timeout=LONG)
        assert slow.exit_code == 124
        assert b"ran longer than 0.3 s (--command-timeout)" in slow.stderr
        assert len((await guest.run("yes | head -c 5000", timeout=LONG)).stdout) == 1024
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), LONG) == 0


RECORD_MODULES = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print('modules:', *sorted(sys.modules), file=sys.stderr))\n"
    "sys.argv = sys.argv[2:]  # what -m leaves: ['vsock_async', 'agent', ...]\n"
    "runpy.run_module('vsock_async', run_name='__main__', alter_sys=True)\n"
)
"""Runs ``-m vsock_async ...`` as ``python -m`` does, and prints the modules loaded at exit."""


@pytest.mark.asyncio
async def test_the_agent_loads_neither_the_host_side_nor_the_daemon(tmp_path: Path) -> None:
    """The agent starts on a guest's boot path, and needs only its own modules."""
    async with served_agent(tmp_path, "lean.sock", python=("-c", RECORD_MODULES)) as served:
        assert (await served.guest.run("echo v2", timeout=LONG)).stdout == b"v2\n"
        await served.guest.put_file(b"data", str(tmp_path / "put"))
        served.agent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.agent.wait(), LONG) == 0
    [line] = [
        line for line in (tmp_path / "agent.log").read_text().splitlines() if "modules:" in line
    ]
    modules = line.split()[1:]
    assert "vsock_async.agent.v2" in modules and "vsock_async.agent.files" in modules
    assert [m for m in modules if m.startswith(("vsock_async.host", "vsock_async.serve"))] == []
    assert [m for m in modules if m.split(".")[0] == "aiohttp"] == []

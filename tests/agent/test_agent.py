"""The guest agent end to end: our CommandServer (or connect()) on one side, the agent on the other.

The agent runs as a separate process (``python -m vsock_async agent``) where signals, process
groups and the standard-library-only promise matter, and in-process elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import vsock_async
from tests.agent_process import (
    LONG,
    agent_process,
    agent_task,
    alive,
    children_of,
    eventually,
    live_members,
    served_agent,
    short_socket_path,
    single_file_agent,
)
from vsock_async.agent import GuestAgent
from vsock_async.agent.runner import run_command
from vsock_async.protocol import encode_command, encode_result

PACKAGE_DIR = Path(vsock_async.__file__).parent


# -- end to end, agent as a process --------------------------------------------------------


@pytest.mark.asyncio
async def test_probe_output_and_exit_codes_over_unix(tmp_path: Path) -> None:
    async with served_agent(tmp_path, "host.sock") as (_, guest, _):
        await guest.probe(timeout=LONG)
        result = await guest.run("echo out; echo err >&2", timeout=LONG)
        assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 0)
        for code in (0, 1, 42, 255):
            assert (await guest.run(f"exit {code}", timeout=LONG)).exit_code == code
        killed = await guest.run("echo before; kill -TERM $$; echo after", timeout=LONG)
        assert (killed.stdout, killed.exit_code) == (b"before\n", 128 + signal.SIGTERM)
        assert (await guest.run("kill -KILL $$", timeout=LONG)).exit_code == 128 + 9
        stdin = await guest.run("cat; echo done", timeout=LONG)
        assert stdin.stdout == b"done\n"


@pytest.mark.asyncio
async def test_over_tcp_loopback_with_large_output(tmp_path: Path) -> None:
    async with vsock_async.listen("tcp://127.0.0.1:0") as server:
        port = server.sockets[0].getsockname()[1]
        async with agent_process("--connect", f"tcp://127.0.0.1:{port}", tmp_path=tmp_path):
            guest = await server.accept(timeout=LONG)
            size = 32 * 1024 * 1024
            result = await guest.run(f"yes 0123456789abcde | head -c {size}", timeout=LONG)
            assert result.exit_code == 0
            assert len(result.stdout) == size
            assert result.stdout == (b"0123456789abcde\n" * (size // 16))
            both = await guest.run("head -c 3000000 /dev/zero >&2; echo x", timeout=LONG)
            assert (both.stdout, both.stderr, both.exit_code) == (b"x\n", bytes(3000000), 0)


@pytest.mark.asyncio
async def test_output_over_the_cap_is_cut_with_the_note_inside(tmp_path: Path) -> None:
    cap = 1000
    limits = vsock_async.Limits(max_stdout=cap, max_stderr=cap)
    async with served_agent(
        tmp_path, "cap.sock", "--max-output", str(cap), limits=limits, protocol="v1"
    ) as (
        _,
        guest,
        _,
    ):
        out = await guest.run("yes | head -c 5000; exit 3", timeout=LONG)
        assert out.stdout == b"y\n" * (cap // 2)
        assert out.exit_code == 3
        assert b"stdout cut to its first 1000 bytes of 5000" in out.stderr
        both = await guest.run("yes | head -c 5000; yes e | head -c 7000 >&2", timeout=LONG)
        assert len(both.stdout) == cap
        assert len(both.stderr) == cap
        assert both.stderr.startswith(b"e\ne\n")
        assert b"stdout cut" in both.stderr
        assert b"stderr cut: the command wrote 7000 bytes" in both.stderr
        within = await guest.run("yes | head -c 1000; yes e | head -c 1000 >&2", timeout=LONG)
        assert (len(within.stdout), len(within.stderr)) == (cap, cap)
        assert b"vsock-async agent" not in within.stderr


@pytest.mark.asyncio
async def test_oversized_command_and_nul_are_refused_and_the_connection_lives(
    tmp_path: Path,
) -> None:
    async with served_agent(tmp_path, "big.sock", "--max-command", "100", protocol="v1") as (
        _,
        guest,
        _,
    ):
        for size in (101, 300_000):
            refused = await guest.run(b"#" * size, timeout=LONG)
            assert refused.exit_code == 126
            assert refused.stdout == b""
            assert f"command of {size} bytes is longer than the agent's limit of 100".encode() in (
                refused.stderr
            )
            assert (await guest.run("echo still here", timeout=LONG)).stdout == b"still here\n"
        nul = await guest.run(b"echo a\0b", timeout=LONG)
        assert nul.exit_code == 126
        assert b"NUL byte" in nul.stderr
        assert (await guest.run("exit 126", timeout=LONG)).stderr == b""
        await guest.probe(timeout=LONG)


@pytest.mark.asyncio
async def test_command_timeout_kills_the_group_and_answers_124(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    async with served_agent(tmp_path, "slow.sock", "--command-timeout", "0.3", protocol="v1") as (
        _,
        guest,
        agent,
    ):
        command = f"echo $$; (sleep 1; touch {marker}) & sleep 30"
        result = await guest.run(command, timeout=LONG)
        assert result.exit_code == 124
        assert b"ran longer than 0.3 s (--command-timeout)" in result.stderr
        shell = int(result.stdout.split()[0])
        await eventually(lambda: not live_members(shell), "no live process left in the group")
        assert not children_of(agent.pid)
        assert (await guest.run("exit 124", timeout=LONG)).stderr == b""
        assert (await guest.run("sleep 1.5; echo ok", timeout=LONG)).exit_code == 124
        assert not marker.exists()


@pytest.mark.asyncio
async def test_host_closing_mid_command_kills_the_process_group(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    pidfile = tmp_path / "shell.pid"
    async with served_agent(tmp_path, "gone.sock", protocol="v1") as (server, guest, agent):
        command = f"echo $$ > {pidfile}; (sleep 0.6; touch {marker}) & sleep 0.6; touch {marker}"
        with pytest.raises(vsock_async.CommandTimeout):
            await guest.run(command, timeout=0.3)
        assert guest.closed
        shell = int(pidfile.read_text())
        again = await server.accept(timeout=LONG)
        await eventually(lambda: not live_members(shell), "no live process left in the group")
        assert not children_of(agent.pid)
        # Long enough for the marker to appear had anything in the group survived.
        assert (await again.run("sleep 1; echo late", timeout=LONG)).stdout == b"late\n"
        assert not marker.exists()


@pytest.mark.asyncio
async def test_agent_redials_after_the_host_restarts(tmp_path: Path) -> None:
    path = short_socket_path(tmp_path, "restart.sock")
    async with agent_process("--connect", f"unix:{path}", tmp_path=tmp_path):
        for round_ in range(3):
            async with vsock_async.listen(f"unix:{path}") as server:
                guest = await server.accept(timeout=LONG)
                result = await guest.run(f"echo round {round_}", timeout=LONG)
                assert result.stdout == f"round {round_}\n".encode()
            await asyncio.sleep(0.3)  # the agent finds nobody listening and backs off


@pytest.mark.asyncio
async def test_listen_mode_with_n_connections(tmp_path: Path) -> None:
    path = short_socket_path(tmp_path, "agent.sock")
    async with agent_process(
        "--listen", f"unix:{path}", "--connections", "2", tmp_path=tmp_path
    ) as agent:
        # The socket file appears at bind(), before listen(): wait for the agent to say it listens.
        log = tmp_path / "agent.log"
        await eventually(lambda: "agent listening" in log.read_text(), "the agent listens")
        first = await vsock_async.connect(f"unix:{path}", timeout=LONG)
        second = await vsock_async.connect(f"unix:{path}", timeout=LONG)
        results = await asyncio.gather(
            first.run("sleep 0.3; echo 1", timeout=LONG),
            second.run("sleep 0.3; echo 2", timeout=LONG),
        )
        assert [r.stdout for r in results] == [b"1\n", b"2\n"]
        # A third waits in the backlog (both slots taken): its protocol hello gets no answer.
        with pytest.raises(vsock_async.ConnectTimeout, match="protocol hello"):
            await vsock_async.connect(f"unix:{path}", timeout=0.2)
        on_v1 = await vsock_async.connect(f"unix:{path}", timeout=LONG, protocol="v1")
        with pytest.raises(vsock_async.CommandTimeout):
            await on_v1.run("echo 3", timeout=0.2)  # the same wait, on v1: no hello to answer
        assert (first.protocol, second.protocol, on_v1.protocol) == ("v2", "v2", "v1")
        await on_v1.aclose()
        await first.aclose()
        fourth = await vsock_async.connect(f"unix:{path}", timeout=LONG)
        assert (await fourth.run("echo 4", timeout=LONG)).stdout == b"4\n"
        await second.aclose()
        await fourth.aclose()
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(agent.wait(), LONG) == 0
        assert not os.path.exists(path)


@pytest.mark.asyncio
async def test_n_dialled_connections_run_commands_at_once(tmp_path: Path) -> None:
    path = short_socket_path(tmp_path, "many.sock")
    async with (
        vsock_async.listen(f"unix:{path}") as server,
        agent_process("--connect", f"unix:{path}", "--connections", "3", tmp_path=tmp_path),
    ):
        guests = [await server.accept(timeout=LONG) for _ in range(3)]
        barrier = tmp_path / "barrier"
        # Each command waits until all three have started: only concurrent runs finish.
        command = f"echo x >> {barrier}; while [ $(wc -l < {barrier}) -lt 3 ]; do sleep 0.01; done"
        results = await asyncio.gather(*(g.run(command, timeout=LONG) for g in guests))
        assert [r.exit_code for r in results] == [0, 0, 0]


@pytest.mark.asyncio
async def test_sigterm_stops_the_agent_and_kills_the_running_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "shell.pid"
    async with served_agent(tmp_path, "term.sock") as (_, guest, agent):
        running = asyncio.create_task(guest.run(f"echo $$ > {pidfile}; sleep 30", timeout=LONG))
        await eventually(lambda: pidfile.exists() and pidfile.read_text(), "the command started")
        shell = int(pidfile.read_text())
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(agent.wait(), LONG) == 0
        with pytest.raises(vsock_async.ConnectionClosed):
            await running
        await eventually(lambda: not live_members(shell), "no live process left in the group")


@pytest.mark.asyncio
async def test_runs_with_the_package_files_alone(tmp_path: Path) -> None:
    """No site-packages, no PYTHONPATH: only a copy of the package directory."""
    shutil.copytree(PACKAGE_DIR, tmp_path / "vsock_async", ignore=shutil.ignore_patterns("*.pyc"))
    bare = (sys.executable, "-S", "-E", "-c")
    check = "import sys, vsock_async; print(vsock_async.__file__); import aiohttp"
    probe = subprocess.run([*bare, check], cwd=tmp_path, capture_output=True, text=True)
    assert probe.stdout.startswith(str(tmp_path / "vsock_async"))
    assert "No module named 'aiohttp'" in probe.stderr
    async with served_agent(tmp_path, "bare.sock", cwd=tmp_path, python=("-S", "-E")) as (
        _,
        guest,
        _,
    ):
        await guest.probe(timeout=LONG)
        assert (await guest.run("echo bare", timeout=LONG)).stdout == b"bare\n"


@pytest.mark.asyncio
async def test_single_file_form(tmp_path: Path) -> None:
    """The generated one-file agent, run with no site-packages and no package on sys.path."""
    path = short_socket_path(tmp_path, "single.sock")
    async with (
        vsock_async.listen(f"unix:{path}") as server,
        single_file_agent(
            "--connect", f"unix:{path}", "--max-command", "20", tmp_path=tmp_path
        ) as proc,
    ):
        guest = await server.accept(timeout=LONG)
        await guest.probe(timeout=LONG)
        assert (await guest.run("echo one; exit 3", timeout=LONG)).exit_code == 3
        assert (await guest.run("echo this is far too long", timeout=LONG)).exit_code == 126
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), LONG) == 0


def test_refuses_to_dial_vsock_under_the_guard(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vsock_async", "agent", "--connect", "vsock://host:1024"],
        capture_output=True,
        text=True,
        timeout=LONG,
    )
    assert done.returncode == 2
    assert "VSOCK_ASYNC_FORBID_VSOCK_CONNECT" in done.stderr


def test_a_listen_address_that_cannot_be_bound_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vsock_async", "agent", "--listen", f"unix:{tmp_path}"],
        capture_output=True,
        text=True,
        timeout=LONG,
    )
    assert done.returncode == 2
    assert f"cannot listen on unix:{tmp_path}" in done.stderr


@pytest.mark.asyncio
async def test_json_log_lines(tmp_path: Path) -> None:
    async with served_agent(tmp_path, "json.sock", "--log-format", "json", protocol="v1") as (
        _,
        guest,
        a,
    ):
        await guest.run("exit 5", timeout=LONG)
        a.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(a.wait(), LONG) == 0
    entries = [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines()]
    answered = [e for e in entries if e["message"] == "command answered"]
    assert answered[0]["exit_code"] == 5
    assert answered[0]["level"] == "info"
    assert entries[-1]["message"] == "agent stopped"


# -- in-process: the wire bytes and the runner ---------------------------------------------


@pytest.mark.asyncio
async def test_pipelined_commands_are_answered_in_order_byte_for_byte(tmp_path: Path) -> None:
    path = short_socket_path(tmp_path, "raw.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    async with agent_task(GuestAgent(f"unix:{path}", max_command=40)):
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), LONG)
        frames = [b":", b"printf abc; printf de >&2; exit 7", b"x" * 41, b"exit 0"]
        await loop.sock_sendall(conn, b"".join(map(encode_command, frames)))
        expected = (
            encode_result(b"", b"", 0)
            + encode_result(b"abc", b"de", 7)
            + encode_result(
                b"",
                b"vsock-async agent: the command of 41 bytes is longer than the agent's limit of"
                b" 40 bytes (--max-command); it was discarded, not run\n",
                126,
            )
            + encode_result(b"", b"", 0)
        )
        received = b""
        while len(received) < len(expected):
            chunk = await asyncio.wait_for(loop.sock_recv(conn, 65536), LONG)
            assert chunk, f"agent closed after {received!r}"
            received += chunk
        assert received == expected
        conn.close()
    listener.close()


@pytest.mark.asyncio
async def test_the_agent_stops_reading_while_a_command_runs(tmp_path: Path) -> None:
    """A host that pipelines gets back-pressure: nothing more is read until the command ends."""
    path = short_socket_path(tmp_path, "pressure.sock")
    gate = tmp_path / "gate"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    async with agent_task(GuestAgent(f"unix:{path}", max_command=1000)):
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), LONG)
        reader, writer = await asyncio.open_unix_connection(sock=conn)
        waiting = f"while [ ! -e {gate} ]; do sleep 0.01; done; echo open".encode()
        pipelined = 4 * 1024 * 1024
        writer.write(encode_command(waiting))
        writer.write(encode_command(b"#" * pipelined))
        await asyncio.sleep(0.3)
        unsent = writer.transport.get_write_buffer_size()
        assert unsent > pipelined // 2, "the agent read on while the command ran"
        gate.touch()
        await asyncio.wait_for(writer.drain(), LONG)
        answer = await asyncio.wait_for(
            reader.readexactly(len(encode_result(b"open\n", b"", 0))), LONG
        )
        assert answer == encode_result(b"open\n", b"", 0)
        refused = await asyncio.wait_for(reader.readexactly(8), LONG)
        assert refused[:4] == bytes(4)
        stderr = await reader.readexactly(int.from_bytes(refused[4:], "big") + 1)
        assert stderr.endswith(b"not run\n\x7e")
        writer.close()
    listener.close()


@pytest.mark.asyncio
async def test_in_process_agent_counts_connections_and_answers(tmp_path: Path) -> None:
    path = short_socket_path(tmp_path, "inproc.sock")
    agent = GuestAgent(f"unix:{path}", connections=2)
    async with vsock_async.listen(f"unix:{path}", protocol="v1") as server, agent_task(agent):
        guests = [await server.accept(timeout=LONG) for _ in range(2)]
        await eventually(lambda: agent.connections_open == 2, "both connections are open")
        for guest in guests:
            await guest.probe(timeout=LONG)
        assert (await guests[1].run("echo in", timeout=LONG)).stdout == b"in\n"
        assert agent.commands_answered == 3
        with pytest.raises(vsock_async.UsageError):
            await agent.run()
    assert agent.connections_open == 0


@pytest.mark.asyncio
async def test_background_process_holding_stdout_is_killed_after_the_grace() -> None:
    outcome = await run_command(b"sleep 30 & echo $!", grace=0.1)
    assert outcome.exit_code == 0
    assert b"kept stdout or stderr open for 0.1 s" in outcome.stderr
    background = int(outcome.stdout)
    await eventually(lambda: not alive(background), "the background process is dead")


@pytest.mark.asyncio
async def test_background_process_with_detached_output_is_left_running() -> None:
    outcome = await run_command(b"sleep 30 >/dev/null 2>&1 & echo $!", grace=LONG)
    assert (outcome.stderr, outcome.exit_code) == (b"", 0)
    background = int(outcome.stdout)
    try:
        assert alive(background)
    finally:
        os.kill(background, signal.SIGKILL)


@pytest.mark.asyncio
async def test_cancelling_a_command_kills_its_group_and_reaps_the_shell(tmp_path: Path) -> None:
    pidfile = tmp_path / "shell.pid"
    running = asyncio.create_task(run_command(f"echo $$ > {pidfile}; sleep 30 & sleep 30".encode()))
    await eventually(lambda: pidfile.exists() and pidfile.read_text(), "the command started")
    shell = int(pidfile.read_text())
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert shell not in children_of(os.getpid())
    await eventually(lambda: not live_members(shell), "no live process left in the group")


@pytest.mark.asyncio
async def test_without_pidfd_the_exit_is_polled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels before 5.3 have no pidfd_open."""
    monkeypatch.delattr(os, "pidfd_open")
    assert (await run_command(b"echo polled; exit 9")).exit_code == 9
    slow = await run_command(b"sleep 30", timeout=0.1)
    assert slow.exit_code == 124


@pytest.mark.asyncio
async def test_late_output_within_the_grace_is_kept() -> None:
    outcome = await run_command(b"(sleep 0.1; echo late) & echo early", grace=LONG)
    assert outcome.stdout == b"early\nlate\n"
    assert outcome.stderr == b""


@pytest.mark.asyncio
async def test_a_cap_smaller_than_the_note_still_holds() -> None:
    outcome = await run_command(b"echo 0123456789abcdef; echo x >&2", max_output=8)
    assert outcome.stdout == b"01234567"
    assert len(outcome.stderr) == 8


@pytest.mark.asyncio
async def test_a_missing_shell_answers_127() -> None:
    outcome = await run_command(b"true", shell="/nonexistent/sh")
    assert outcome.exit_code == 127
    assert b"cannot start the shell /nonexistent/sh" in outcome.stderr


def test_bad_settings_are_usage_errors() -> None:
    with pytest.raises(vsock_async.UsageError):
        GuestAgent("unix:/x", connections=0)
    with pytest.raises(vsock_async.UsageError):
        GuestAgent("unix:/x", max_output=-1)
    with pytest.raises(vsock_async.UsageError):
        GuestAgent(listen=True)
    with pytest.raises(vsock_async.UsageError, match="command_timeout of 0 s would kill"):
        GuestAgent("unix:/x", command_timeout=0)
    with pytest.raises(vsock_async.UsageError):
        GuestAgent("unix:/x", output_grace=float("nan"))
    assert GuestAgent("unix:/x", output_grace=None, command_timeout=None).output_grace is None
    with pytest.raises(vsock_async.InvalidAddress):
        GuestAgent("nowhere")
    assert str(GuestAgent().address) == "vsock://host:1024"

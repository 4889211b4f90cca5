"""How the agent runs one command: commands of every allowed size, output of every size,
and ``--output-grace 0``. In-process with :func:`run_command`, and end to end through the
agent process where the wire matters."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import vsock_async
from tests.agent_process import LONG, agent_process, alive, eventually, short_socket_path
from vsock_async.agent.runner import run_command
from vsock_async.host.negotiate import ProtocolChoice

MiB = 1024 * 1024
# Linux caps one argv string at 128 KiB (MAX_ARG_STRLEN, the NUL included).
ARGV_STRING_MAX = 128 * 1024
# $0 and $#, stdin at EOF, the descriptors a program it starts sees (ls adds its own 3).
PROBE = b'\necho "$0 $#"; cat; ls /proc/self/fd | tr "\\n" " "; echo; exit 3\n'
EXPECTED = (b"/bin/sh 0\n0 1 2 3 \n", b"", 3)


def command_of(size: int) -> bytes:
    """A command of exactly ``size`` bytes: a long comment, then :data:`PROBE`."""
    return b"#" + b"x" * (size - 1 - len(PROBE)) + PROBE


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "size",
    [1000, ARGV_STRING_MAX - 1, ARGV_STRING_MAX, 200 * 1024, vsock_async.Limits().max_command],
)
async def test_a_command_of_any_allowed_size_runs_with_the_same_semantics(size: int) -> None:
    outcome = await run_command(command_of(size))
    assert (outcome.stdout, outcome.stderr, outcome.exit_code) == EXPECTED


@pytest.mark.asyncio
async def test_a_long_script_keeps_shell_semantics() -> None:
    """Functions, a syntax error's exit status, and exit from inside a function."""
    padding = b"#" + b"x" * (300 * 1024) + b"\n"
    functions = padding + b"f() { echo in f; exit 7; }\nf\necho never\n"
    outcome = await run_command(functions)
    assert (outcome.stdout, outcome.exit_code) == (b"in f\n", 7)
    broken = await run_command(padding + b"echo before\nif then fi\n")
    assert broken.stdout == b"before\n"
    assert broken.exit_code == 2
    assert b"yntax error" in broken.stderr


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["v1", "v2"])
async def test_a_one_mib_command_runs_end_to_end(tmp_path: Path, protocol: ProtocolChoice) -> None:
    """Up to max_command on either protocol (v2 passes a long command line on stdin)."""
    path = short_socket_path(tmp_path, "long.sock")
    command = command_of(vsock_async.Limits().max_command)
    async with (
        vsock_async.listen(f"unix:{path}", protocol=protocol) as server,
        agent_process("--connect", f"unix:{path}", tmp_path=tmp_path),
    ):
        guest = await server.accept(timeout=LONG)
        result = await guest.run(command, timeout=LONG)
        assert (result.stdout, result.stderr, result.exit_code) == EXPECTED
        assert (await guest.run("echo short", timeout=LONG)).stdout == b"short\n"


@pytest.mark.asyncio
async def test_large_outputs_round_trip_byte_for_byte(tmp_path: Path) -> None:
    path = short_socket_path(tmp_path, "large.sock")
    cap = 8 * MiB
    out_line, err_line = b"0123456789abcde\n", b"edcba9876543210\n"

    def pattern(line: bytes, size: int) -> bytes:
        return (line * (size // len(line) + 1))[:size]

    def command(out: int, err: int) -> str:
        return (
            f"yes {out_line.decode().strip()} | head -c {out};"
            f" yes {err_line.decode().strip()} | head -c {err} >&2"
        )

    async with (
        vsock_async.listen(f"unix:{path}", protocol="v1") as server,
        agent_process("--connect", f"unix:{path}", "--max-output", str(cap), tmp_path=tmp_path),
    ):
        guest = await server.accept(timeout=LONG)
        for out, err in ((5 * MiB + 3, 3 * MiB + 1), (cap, cap)):
            result = await guest.run(command(out, err), timeout=LONG)
            assert result.exit_code == 0
            assert result.stdout == pattern(out_line, out)
            assert result.stderr == pattern(err_line, err)
        cut = await guest.run(command(12 * MiB, 10 * MiB), timeout=LONG)
        assert cut.exit_code == 0
        assert cut.stdout == pattern(out_line, cap)
        assert len(cut.stderr) == cap
        notes = (
            f"vsock-async agent: stderr cut: the command wrote {10 * MiB} bytes, more than fit"
            f" in {cap} (--max-output) with these notes\n"
            f"vsock-async agent: stdout cut to its first {cap} bytes of {12 * MiB}"
            " (--max-output)\n"
        ).encode()
        assert cut.stderr == pattern(err_line, cap - len(notes)) + notes


@pytest.mark.asyncio
async def test_no_output_grace_keeps_what_was_written_and_kills_at_once() -> None:
    for _ in range(20):
        outcome = await run_command(b"head -c 300000 /dev/zero; echo err >&2", grace=0)
        assert (outcome.stdout, outcome.stderr, outcome.exit_code) == (bytes(300000), b"err\n", 0)
    held = await run_command(b"sleep 30 & echo $!", grace=0)
    assert held.exit_code == 0
    assert b"kept stdout or stderr open for 0 s: its process group was killed" in held.stderr
    background = int(held.stdout)
    await eventually(lambda: not alive(background), "the background process is dead")


@pytest.mark.asyncio
async def test_waiting_out_the_output_grace_does_not_spin() -> None:
    """The exit is noticed once: a pidfd stays readable after the exit, and a reader left
    on it would run the event loop flat out for the whole grace."""
    before = time.process_time()
    outcome = await run_command(b"sleep 30 & echo $!", grace=0.5)
    spent = time.process_time() - before
    assert outcome.exit_code == 0
    assert spent < 0.25, f"{spent:.2f} s of CPU while waiting 0.5 s"

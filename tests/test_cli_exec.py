"""``vsock-async exec`` and ``vsock-async guests`` as child processes against a real ``serve``
and a real agent: exit codes passing through, binary output, quoting, guest selection and
errors (streaming, stdin and terminals: test_cli_exec_stream.py)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon_process import (
    LONG,
    Daemon,
    Stack,
    exec_cli,
    python_m,
    serve_with_agent,
    stack,
    wait_for_guest,
)

__all__ = ["stack"]

ALL_BYTES = bytes(range(256))
PRINTF_ALL_BYTES = "".join(f"\\{b:03o}" for b in range(256))


@dataclass
class Served:
    daemon: Daemon
    directory: Path

    def exec(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return exec_cli(self.daemon.control_socket, *args)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with serve_with_agent() as (daemon, directory):
        yield Served(daemon, directory)


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_codes_pass_through(served: Served, code: int) -> None:
    result = served.exec("--", "sh", "-c", f"echo out; echo err >&2; exit {code}")
    assert result.returncode == code
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")


def test_killed_by_a_signal_is_128_plus_the_signal(served: Served) -> None:
    assert served.exec("-c", "kill -KILL $$").returncode == 128 + 9
    assert served.exec("-c", "kill -TERM $$").returncode == 128 + 15


def test_binary_output_round_trips_on_both_streams(served: Served) -> None:
    result = served.exec("--", "printf", PRINTF_ALL_BYTES)
    assert (result.returncode, result.stdout, result.stderr) == (0, ALL_BYTES, b"")
    result = served.exec("-c", f"printf '{PRINTF_ALL_BYTES}' >&2")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", ALL_BYTES)


def test_large_output(served: Served) -> None:
    result = served.exec("-c", "yes 0123456789abcde | head -c 3000000")
    assert result.returncode == 0
    assert result.stdout == (b"0123456789abcde\n" * 187_500)


def test_argv_is_quoted_and_c_is_a_raw_line(served: Served) -> None:
    result = served.exec("--", "printf", "%s\\n", "my file", "$HOME", "*")
    assert result.stdout == b"my file\n$HOME\n*\n"
    result = served.exec("--", "sh", "-c", "echo hi; exit 3")
    assert (result.returncode, result.stdout) == (3, b"hi\n")
    result = served.exec("-c", "cd / && echo $((6 * 7)) && pwd")
    assert (result.returncode, result.stdout) == (0, b"42\n/\n")


def test_command_is_required_once(served: Served) -> None:
    for args in ([], ["-c", "true", "--", "true"]):
        result = served.exec(*args)
        assert result.returncode == 2
        assert b"exactly one of them" in result.stderr


def test_options_of_the_guest_command_get_a_hint_about_the_double_dash(served: Served) -> None:
    result = served.exec("ls", "-l", "/")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(
        b"put the command after --: vsock-async exec [options] -- ls -l /"
    )
    result = served.exec("-c", "ls", "-l", "/")
    assert result.returncode == 2
    assert b"quote the whole command line: vsock-async exec [options] -c 'ls -l /'" in (
        result.stderr
    )


def test_timeout_none_is_no_deadline_and_0_is_no_time(served: Served) -> None:
    result = served.exec("--timeout", "none", "--", "echo", "waited")
    assert (result.returncode, result.stdout) == (0, b"waited\n"), result.stderr
    result = served.exec("--timeout", "0", "--", "echo", "never sent")
    assert (result.returncode, result.stdout) == (124, b""), result.stderr
    result = served.exec("--timeout", "-1", "--", "true")
    assert result.returncode == 2
    assert b"--timeout must be a finite number of seconds >= 0" in result.stderr


def test_timeout_exits_124(served: Served) -> None:
    result = served.exec("--timeout", "0.05", "--", "sleep", "10")
    assert result.returncode == 124
    assert result.stderr == b"vsock-async exec: command 'sleep 10' timed out after 0.05 s\n"
    wait_for_guest(served.daemon.client(), "vm1")  # the agent dials again


def test_unknown_guest_and_no_daemon_exit_125(served: Served) -> None:
    result = served.exec("--guest", "vm9", "--", "true")
    assert result.returncode == 125
    assert b"guest_not_found" in result.stderr and b"vm9" in result.stderr
    result = exec_cli(str(served.directory / "nothing.sock"), "--", "true")
    assert result.returncode == 125
    assert b"is `vsock-async serve` running?" in result.stderr
    assert b"Traceback" not in result.stderr


def guests_cli(served: Served, *args: str) -> str:
    control = f"unix:{served.daemon.control_socket}"
    return subprocess.run(
        python_m("guests", "--control", control, *args),
        capture_output=True,
        timeout=LONG,
        check=True,
        text=True,
    ).stdout


def test_guests_table_and_json(served: Served) -> None:
    header, row = guests_cli(served).splitlines()
    assert header.split()[:3] == ["KEY", "CONNECTIONS", "BUSY"]
    assert row.split()[:3] == ["vm1", "1", "0/1"]
    (guest,) = json.loads(guests_cli(served, "--json"))["guests"]
    assert guest["key"] == "vm1" and guest["connections"] == 1


def test_guest_must_be_named_when_several_are_connected(stack: Stack) -> None:
    second = f"unix:{stack.directory / 'second.sock'}"
    daemon = stack.daemon(
        "--listen", f"vm1=unix:{stack.directory / 'guest.sock'}", "--listen", f"vm2={second}"
    )
    stack.agent(daemon.guest_address)
    stack.agent(second)
    client = daemon.client()
    wait_for_guest(client, "vm1")
    wait_for_guest(client, "vm2")
    result = exec_cli(daemon.control_socket, "--", "true")
    assert result.returncode == 125
    assert b"2 guests are connected (vm1, vm2): pick one with --guest" in result.stderr
    result = exec_cli(daemon.control_socket, "--guest", "vm2", "--", "echo", "two")
    assert (result.returncode, result.stdout) == (0, b"two\n")


def test_a_reader_that_goes_away_is_a_quiet_sigpipe_exit(served: Served) -> None:
    proc = subprocess.Popen(
        python_m(
            "exec",
            "--control",
            f"unix:{served.daemon.control_socket}",
            "-c",
            "yes | head -c 3000000",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(LONG) == 128 + 13
    assert stderr == b""

"""``vsock-async exec`` streaming, as people use it: real ``serve``, agent and ``exec``
processes, ``exec`` on pipes or on a pty driven by Python's ``pty`` module as a person's
terminal would be (keys typed, Ctrl-C, a window resized). Output as it comes, stdin and its
end, ``-i -t`` in raw mode and the terminal restored on every way out, signals forwarded,
exit codes; each time nothing is left running in the guest. And a guest speaking only v1:
plain exec still runs, ``-i`` says why it cannot."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agent_process import IGNORING_LAUNCHER, live_members
from tests.daemon_process import (
    LONG,
    Daemon,
    Stack,
    eventually,
    exec_cli,
    python_m,
    serve_with_agent,
    stack,
    wait_for_guest,
)

__all__ = ["stack"]


@dataclass
class Served:
    daemon: Daemon
    directory: Path

    def argv(self, *args: str) -> list[str]:
        return python_m("exec", "--control", f"unix:{self.daemon.control_socket}", *args)

    def exec(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.argv(*args), input=input, capture_output=True, timeout=LONG, check=False
        )

    def pid_file(self, name: str) -> tuple[str, Path]:
        """A shell prefix recording the command's pid (its process group) in a file."""
        path = self.directory / name
        return f"echo $$ > {path}.tmp; mv {path}.tmp {path}; ", path


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    # An agent started with SIGINT, SIGQUIT and more ignored and signals blocked: Ctrl-C and
    # forwarded signals must reach its commands all the same.
    with serve_with_agent(agent_launcher=IGNORING_LAUNCHER) as (daemon, directory):
        yield Served(daemon, directory)


def ended(path: Path) -> None:
    """The process group whose id is in ``path`` has nothing left running in the guest."""
    pid = int(path.read_text())
    eventually(lambda: not live_members(pid), f"process group {pid} gone from the guest")


def _take_terminal() -> None:
    """In the child: make the pty on stdin our controlling terminal (we lead a new session)."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A pty standing for a person's terminal, ``exec`` in its foreground."""

    def __init__(self, argv: list[str], rows: int = 24, cols: int = 80) -> None:
        self.master, self.slave = pty.openpty()
        termios.tcsetwinsize(self.slave, (rows, cols))
        self.before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(
            argv,
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        self.seen = b""

    def read_until(self, wanted: bytes) -> bytes:
        """What the terminal showed up to ``wanted``; fail if it never does."""
        deadline = time.monotonic() + LONG
        while wanted not in self.seen:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(0.0, left))
            if not ready:
                pytest.fail(f"the terminal never showed {wanted!r}; it showed {self.seen!r}")
            self.seen += os.read(self.master, 65536)
        shown, _, self.seen = self.seen.partition(wanted)
        return shown + wanted

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def settings(self) -> list[object]:
        return termios.tcgetattr(self.slave)

    def wait(self) -> int:
        return self.proc.wait(LONG)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    try:
        yield opened
    finally:
        for terminal in opened:
            terminal.close()


def on_terminal(terminals: list[Terminal], argv: list[str]) -> Terminal:
    terminal = Terminal(argv)
    terminals.append(terminal)
    return terminal


def raw(settings: list[object]) -> bool:
    lflag = settings[3]
    assert isinstance(lflag, int)
    return not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)


# -- pipes -------------------------------------------------------------------------------------


def test_output_streams_as_it_comes(served: Served) -> None:
    marker = served.directory / "stream-gate"
    command = f"echo first; while [ ! -e {marker} ]; do sleep 0.01; done; echo second"
    proc = subprocess.Popen(served.argv("-c", command), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"first\n"
        assert not marker.exists()  # still running: the line came as it was written
    finally:
        marker.touch()
    assert proc.stdout.read() == b"second\n"
    assert proc.wait(LONG) == 0


def test_piped_stdin_and_its_end_reach_the_command(served: Served) -> None:
    shell = f"echo hi | {' '.join(served.argv('-i', '--', 'cat'))}"
    result = subprocess.run(shell, shell=True, capture_output=True, timeout=LONG, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"hi\n", b"")
    record, pid = served.pid_file("cat-pid")
    result = served.exec("-i", "--", "sh", "-c", record + "exec cat", input=b"x" * 3_000_000)
    assert (result.returncode, len(result.stdout)) == (0, 3_000_000)
    ended(pid)
    result = served.exec("-i", "--", "wc", "-c", input=b"")
    assert (result.returncode, result.stdout.strip()) == (0, b"0")


def test_sigterm_is_forwarded_to_the_command(served: Served) -> None:
    script = "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.01; done"
    proc = subprocess.Popen(served.argv("--", "sh", "-c", script), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.read() == b"got TERM\n"
    assert proc.wait(LONG) == 3


def test_a_second_ctrl_c_stops_waiting_and_the_command(served: Served) -> None:
    record, pid = served.pid_file("traps-int-pid")
    script = record + "trap 'echo got INT' INT; echo ready; while :; do sleep 0.01; done"
    proc = subprocess.Popen(served.argv("--", "sh", "-c", script), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)  # forwarded: the command carries on
    assert proc.stdout.readline() == b"got INT\n"
    proc.send_signal(signal.SIGINT)  # the second: stop waiting
    assert proc.wait(LONG) == 130
    ended(pid)


def test_t_without_i_gives_a_terminal(served: Served) -> None:
    result = served.exec("-t", "--", "sh", "-c", "tty; stty size")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"/dev/pts/")
    assert result.stdout.endswith(b"24 80\r\n")  # no terminal here: the default size


def test_stderr_stdout_merges_stderr_into_stdout_in_the_order_written(served: Served) -> None:
    script = "echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 3"
    result = served.exec("--stderr", "stdout", "--", "sh", "-c", script)
    assert (result.returncode, result.stdout, result.stderr) == (
        3,
        b"out1\nerr1\nout2\nerr2\n",
        b"",
    )
    result = served.exec("--stderr", "pipe", "--", "sh", "-c", script)
    assert (result.returncode, result.stdout, result.stderr) == (
        3,
        b"out1\nout2\n",
        b"err1\nerr2\n",
    )
    result = served.exec("-t", "--stderr", "stdout", "--", "sh", "-c", "echo out; echo err >&2")
    assert (result.returncode, result.stdout) == (0, b"out\r\nerr\r\n")  # as -t alone
    result = served.exec("-t", "--stderr", "pipe", "--", "true")
    assert result.returncode == 2
    assert b"-t gives the command a terminal, its stdout and stderr both" in result.stderr


def test_env_cwd_and_user(served: Served) -> None:
    script = 'echo "$A $B"; pwd; id -u'
    result = served.exec(
        "--env", "A=1", "--env", "B=x=y", "--cwd", "/", "--user", "nobody", "--", "sh", "-c", script
    )
    assert (result.returncode, result.stdout) == (0, b"1 x=y\n/\n65534\n"), result.stderr


def test_a_program_the_guest_cannot_start(served: Served) -> None:
    result = served.exec("--", "/no/such/program")
    assert result.returncode == 127
    assert b"/no/such/program" in result.stderr and b"No such file" in result.stderr
    assert served.exec("--cwd", "/no/such/dir", "--", "true").returncode == 127
    plain = served.directory / "not-a-program"
    plain.write_text("data\n")
    plain.chmod(0o644)
    result = served.exec("--", str(plain))
    assert result.returncode == 126
    assert b"Permission denied" in result.stderr
    result = served.exec("--env", "NOEQUALS", "--", "true")
    assert result.returncode == 2
    assert b"'NOEQUALS' is not NAME=VALUE" in result.stderr


# -- a person's terminal ---------------------------------------------------------------------


def test_ctrl_c_reaches_the_command_and_the_terminal_is_untouched(
    served: Served, terminals: list[Terminal]
) -> None:
    record, pid = served.pid_file("ctrl-c-pid")
    terminal = on_terminal(
        terminals, served.argv("--", "sh", "-c", record + "echo ready; exec sleep 30")
    )
    terminal.read_until(b"ready")
    terminal.type(b"\x03")  # the terminal sends SIGINT to its foreground: exec
    assert terminal.wait() == 128 + signal.SIGINT
    ended(pid)
    assert terminal.settings() == terminal.before


def test_it_types_into_a_guest_terminal_in_raw_mode_and_restores_ours(
    served: Served, terminals: list[Terminal]
) -> None:
    record, pid = served.pid_file("it-pid")
    script = record + 'tty; stty size; read line; echo "got:$line"; exit 5'
    terminal = on_terminal(terminals, served.argv("-it", "--", "sh", "-c", script))
    assert b"/dev/pts/" in terminal.read_until(b"24 80")
    assert raw(terminal.settings())  # every key goes to the guest
    terminal.type(b"hello\r")
    terminal.read_until(b"got:hello")
    assert terminal.wait() == 5
    ended(pid)
    assert terminal.settings() == terminal.before


def test_it_follows_window_resizes_and_ctrl_c_goes_to_the_guest(
    served: Served, terminals: list[Terminal]
) -> None:
    record, pid = served.pid_file("winch-pid")
    script = record + "stty size; while read x; do stty size; echo end; done"
    terminal = on_terminal(terminals, served.argv("-it", "--", "sh", "-c", script))
    terminal.read_until(b"24 80")
    termios.tcsetwinsize(terminal.slave, (40, 100))  # the kernel sends SIGWINCH to exec
    answers = 0
    while True:  # the resize and the keys travel apart: ask until the new size shows
        answers += 1
        assert answers < 1000
        terminal.type(b"\r")
        if b"40 100" in terminal.read_until(b"end"):
            break
    terminal.type(b"\x03")  # a byte in raw mode: the guest's terminal makes it SIGINT
    assert terminal.wait() == 128 + signal.SIGINT
    ended(pid)
    assert terminal.settings() == terminal.before


def test_ctrl_backslash_in_raw_mode_quits_the_command(
    served: Served, terminals: list[Terminal]
) -> None:
    """SIGQUIT, which the agent was started ignoring, is the command's to take."""
    record, pid = served.pid_file("quit-pid")
    script = record + "ulimit -c 0; echo ready; exec sleep 30"  # no core file
    terminal = on_terminal(terminals, served.argv("-it", "--", "sh", "-c", script))
    terminal.read_until(b"ready")
    terminal.type(b"\x1c")  # ^\ in raw mode: the guest's terminal makes it SIGQUIT
    assert terminal.wait() == 128 + signal.SIGQUIT
    ended(pid)
    assert terminal.settings() == terminal.before


def test_sigterm_in_raw_mode_ends_exec_stops_the_command_and_restores_the_terminal(
    served: Served, terminals: list[Terminal]
) -> None:
    record, pid = served.pid_file("raw-term-pid")
    terminal = on_terminal(
        terminals, served.argv("-it", "--", "sh", "-c", record + "echo ready; exec sleep 30")
    )
    terminal.read_until(b"ready")
    assert raw(terminal.settings())
    terminal.proc.send_signal(signal.SIGTERM)
    assert terminal.wait() == 128 + signal.SIGTERM
    ended(pid)
    assert terminal.settings() == terminal.before


@pytest.mark.parametrize("protocol", ["v2", "v1"])
def test_the_timeout_covers_the_wait_for_the_guest(stack: Stack, protocol: str) -> None:
    """Every stream (v2) or connection (v1) of the guest busy: ``exec --timeout`` waits for
    one within its deadline only, exits 124, and its command never runs."""
    daemon = stack.daemon("--probe-interval", "none", "--protocol", protocol)
    stack.agent(daemon.guest_address, "--max-streams", "1")
    wait_for_guest(daemon.client(), "vm1")
    release, marker = stack.directory / "release", stack.directory / "never-started"
    holder = threading.Thread(
        target=daemon.client().run, args=("vm1", f"while [ ! -e {release} ]; do sleep 0.01; done")
    )
    holder.start()
    try:
        eventually(lambda: daemon.client().guest("vm1")["running"], "the guest kept busy")
        result = exec_cli(daemon.control_socket, "--timeout", "0.05", "--", "touch", str(marker))
    finally:
        release.touch()
        holder.join(LONG)
    assert result.returncode == 124, result.stderr
    assert b"timed out" in result.stderr
    assert not marker.exists()
    assert exec_cli(daemon.control_socket, "--", "true").returncode == 0


def test_only_a_session_goes_without_the_daemons_default_deadline(stack: Stack) -> None:
    """``--user`` and ``--stderr stdout`` take the streamed path, not an interactive session:
    the daemon's default deadline still applies to them; ``-i`` has none by default."""
    daemon = stack.daemon("--probe-interval", "none", "--default-timeout", "0.2")
    stack.agent(daemon.guest_address)
    wait_for_guest(daemon.client(), "vm1")
    for flags in (["--user", "nobody"], ["--stderr", "stdout"], []):
        result = exec_cli(daemon.control_socket, *flags, "--", "sleep", "5")
        assert result.returncode == 124, (flags, result.stderr)
        assert b"timed out" in result.stderr
    session = subprocess.run(
        python_m(
            "exec",
            "--control",
            f"unix:{daemon.control_socket}",
            "-i",
            "--",
            "sh",
            "-c",
            "sleep 0.5; echo done",
        ),
        input=b"",
        capture_output=True,
        timeout=LONG,
        check=False,
    )
    assert (session.returncode, session.stdout) == (0, b"done\n"), session.stderr


# -- a guest speaking only v1 ----------------------------------------------------------------


def test_a_v1_guest_runs_plain_exec_and_refuses_i_and_t(stack: Stack) -> None:
    daemon = stack.daemon("--probe-interval", "none", "--protocol", "v1")
    stack.agent(daemon.guest_address)
    wait_for_guest(daemon.client(), "vm1")
    result = exec_cli(daemon.control_socket, "--env", "A=1", "--", "sh", "-c", "echo $A; exit 4")
    assert (result.returncode, result.stdout) == (4, b"1\n")
    for options in (["-i"], ["-t"], ["--stderr", "stdout"]):
        result = exec_cli(daemon.control_socket, *options, "--", "true")
        assert result.returncode == 125
        assert b"speaks only protocol v1" in result.stderr
    result = exec_cli(daemon.control_socket, "--stderr", "pipe", "--", "sh", "-c", "echo e >&2")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"e\n")


def test_elapsed_time_shows_on_a_terminal_only_with_a_v1_guest(stack: Stack) -> None:
    daemon = stack.daemon("--probe-interval", "none", "--protocol", "v1")
    stack.agent(daemon.guest_address)
    wait_for_guest(daemon.client(), "vm1")
    marker = stack.directory / "tty-go"
    command = f"while [ ! -e {marker} ]; do sleep 0.01; done; echo done"
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        python_m("exec", "--control", f"unix:{daemon.control_socket}", "-c", command),
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    seen = b""
    try:
        while b"[running " not in seen:
            ready, _, _ = select.select([controller], [], [], LONG)
            assert ready, f"no elapsed time on the terminal: {seen!r}"
            seen += os.read(controller, 1024)
    finally:
        marker.touch()
        stdout, _ = proc.communicate(timeout=LONG)
        os.close(controller)
    assert (proc.returncode, stdout) == (0, b"done\n")

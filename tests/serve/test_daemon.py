"""``serve`` as a child process: socket modes, token auth on TCP, probing, logging, startup
errors, and the graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from tests.daemon_process import (
    LONG,
    Daemon,
    Stack,
    eventually,
    free_tcp_port,
    python_m,
    stack,
    wait_for_guest,
)
from vsock_async.cli import main
from vsock_async.errors import ConnectFailed
from vsock_async.protocol import CommandDecoder, encode_result
from vsock_async.protocol.v2 import HELLO_PREFIX
from vsock_async.serve.control_client import ControlClient, ControlError, RunOutcome

__all__ = ["stack"]


def gate(directory: Path, name: str) -> tuple[str, Path]:
    """A command that runs until the returned file exists, then prints ``released``."""
    marker = directory / name
    return f"while [ ! -e {marker} ]; do sleep 0.01; done; echo released", marker


def serve_error(*args: str) -> subprocess.CompletedProcess[str]:
    """Run serve expecting it to fail at startup."""
    return subprocess.run(
        python_m("serve", "--log-level", "warning", *args),
        capture_output=True,
        text=True,
        timeout=LONG,
        check=False,
    )


def serve_usage_error(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run serve in this process with options it must refuse before starting anything."""
    status = main(["serve", *args])
    return status, capsys.readouterr().err


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vsock-async serve: error: ")
    assert fragment in lines[0]


# -- sockets, auth ----------------------------------------------------------------------------


def test_socket_files_are_0600_and_removed_on_exit(stack: Stack) -> None:
    daemon = stack.daemon()
    for path in (daemon.control_socket, daemon.guest_socket):
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
    assert daemon.stop() == 0
    assert not os.path.exists(daemon.control_socket)
    assert not os.path.exists(daemon.guest_socket)


def test_control_directory_is_created_private(stack: Stack) -> None:
    control = stack.directory / "run" / "vsock-async" / "control.sock"
    daemon = stack.daemon("--control", f"unix:{control}", ready=False)
    daemon.wait_ready(daemon.client(address=f"unix:{control}"))
    assert stat.S_IMODE(os.stat(control.parent).st_mode) == 0o700


def test_every_directory_serve_creates_is_private_even_under_umask_0(stack: Stack) -> None:
    control = stack.directory / "a" / "b" / "c" / "control.sock"
    daemon = stack.daemon("--control", f"unix:{control}", ready=False, umask=0)
    daemon.wait_ready(daemon.client(address=f"unix:{control}"))
    for directory in (control.parent, control.parent.parent, control.parent.parent.parent):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory


def test_tcp_control_requires_the_bearer_token(stack: Stack) -> None:
    token = "s3cret-token-value"
    token_file = stack.directory / "token"
    token_file.write_text(token + "\n")
    port = free_tcp_port()
    address = f"tcp://127.0.0.1:{port}"
    daemon = stack.daemon("--control", address, "--token-file", str(token_file), ready=False)
    good = daemon.client(token=token, address=address)
    daemon.wait_ready(good)
    stack.agent(daemon.guest_address)
    wait_for_guest(good, "vm1")

    for client in (daemon.client(address=address), daemon.client(token="wrong", address=address)):
        for call in (client.health, client.guests, client.metrics):
            with pytest.raises(ControlError) as info:
                call()
            assert (info.value.status, info.value.code) == (401, "unauthorized")
    assert good.run("vm1", "echo authorised").stdout == b"authorised\n"

    result = subprocess.run(
        python_m("exec", "--control", address, "--token-file", str(token_file), "--", "true"),
        capture_output=True,
        timeout=LONG,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    daemon.stop()
    assert token not in daemon.log()


def test_the_metrics_port_serves_health_and_metrics_alone_without_the_token(
    stack: Stack,
) -> None:
    token_file = stack.directory / "token"
    token_file.write_text("tok")
    metrics = f"tcp://127.0.0.1:{free_tcp_port()}"
    daemon = stack.daemon("--token-file", str(token_file), "--metrics", metrics, ready=False)
    daemon.wait_ready(daemon.client(token="tok"))
    stack.agent(daemon.guest_address)
    wait_for_guest(daemon.client(token="tok"), "vm1")

    open_port = daemon.client(address=metrics)
    health = open_port.health()
    assert (health["status"], health["guests"]) == ("ok", 1)
    assert "vsock_async_guests_connected 1" in open_port.metrics().splitlines()
    for call, status, code in [
        (open_port.guests, 404, "not_found"),
        (lambda: open_port.run("vm1", "true"), 404, "not_found"),
        (lambda: open_port.request("POST", "/metrics"), 405, "method_not_allowed"),
        (daemon.client().health, 401, "unauthorized"),  # the control socket keeps its token
    ]:
        with pytest.raises(ControlError) as info:
            call()
        assert (info.value.status, info.value.code) == (status, code)
    assert f"metrics and health on {metrics} (read-only, no token)" in daemon.log()

    assert daemon.stop() == 0
    with pytest.raises(ConnectFailed):
        open_port.health()


def test_a_metrics_port_in_use_stops_serve_and_removes_its_sockets(stack: Stack) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        control = stack.directory / "c.sock"
        result = serve_error(
            *("--listen", f"unix:{stack.directory}/g.sock", "--control", f"unix:{control}"),
            *("--metrics", f"tcp://127.0.0.1:{port}"),
        )
    assert result.returncode == 1
    assert_one_line_error(result, "address already in use")
    assert not control.exists()
    assert not (stack.directory / "g.sock").exists()


def test_unix_control_with_a_token_file_requires_it_too(stack: Stack) -> None:
    token_file = stack.directory / "token"
    token_file.write_text("tok")
    daemon = stack.daemon("--token-file", str(token_file), ready=False)
    daemon.wait_ready(daemon.client(token="tok"))
    with pytest.raises(ControlError) as info:
        daemon.client().health()
    assert info.value.status == 401


# -- guests: probing, logging ---------------------------------------------------------------


def answer_probe_wrongly(path: str, done: threading.Event) -> None:
    """A v1 guest that runs the protocol hello as a shell would (exit 0), answers the probe
    ``:`` with exit code 1, then waits to be dropped."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        decoder = CommandDecoder()
        while True:
            while (event := decoder.next_event()) is None:
                decoder.receive_data(sock.recv(4096))
            command = getattr(event, "command", None)
            if command is not None and command.startswith(HELLO_PREFIX):
                sock.sendall(encode_result(b"", b"", 0))
                continue
            break
        assert command == b":"
        sock.sendall(encode_result(b"", b"", 1))
        sock.settimeout(LONG)
        if sock.recv(1) == b"":
            done.set()


def test_a_guest_failing_its_first_probe_is_dropped_and_logged(stack: Stack) -> None:
    daemon = stack.daemon()
    dropped = threading.Event()
    guest = threading.Thread(target=answer_probe_wrongly, args=(daemon.guest_socket, dropped))
    guest.start()
    guest.join(LONG)
    assert dropped.is_set()
    eventually(lambda: daemon.client().guests() == [], "the guest gone from the registry")
    eventually(lambda: "failed its first probe" in daemon.log(), "the drop logged")
    assert "exit code 1" in daemon.log()


def test_connect_probe_and_disconnect_are_logged_and_idle_guests_reprobed(stack: Stack) -> None:
    daemon = stack.daemon("--probe-interval", "0.2")
    agent = stack.agent(daemon.guest_address)
    client = daemon.client()
    first = wait_for_guest(client, "vm1")["last_probe"]
    assert isinstance(first, str)
    eventually(
        lambda: client.guest("vm1")["last_probe"] > first, "a periodic probe of the idle guest"
    )
    agent.stop()
    eventually(lambda: client.guests() == [], "the guest gone after its agent stopped")
    log = daemon.log()
    assert "guest 'vm1' connected" in log
    assert "guest 'vm1' answered its first probe" in log
    assert "guest 'vm1' is gone" in log


def test_a_guest_gone_is_logged_once_whatever_its_connection_count(stack: Stack) -> None:
    daemon = stack.daemon("--probe-interval", "none")
    agent = stack.agent(daemon.guest_address, "--connections", "4")
    client = daemon.client()
    wait_for_guest(client, "vm1")
    eventually(lambda: client.guest("vm1")["connections"] == 4, "4 connections")
    agent.stop()
    eventually(lambda: client.guests() == [], "the guest gone after its agent stopped")
    eventually(lambda: daemon.log().count("disconnected") >= 4, "4 disconnects logged")
    assert daemon.log().count("guest 'vm1' is gone") == 1


def test_connections_beyond_the_cap_per_guest_are_refused_and_logged(stack: Stack) -> None:
    daemon = stack.daemon("--probe-interval", "none", "--max-connections-per-guest", "2")
    stack.agent(daemon.guest_address, "--connections", "3")
    client = daemon.client()
    wait_for_guest(client, "vm1")
    eventually(
        lambda: "refused a connection of guest 'vm1'" in daemon.log(), "the third one refused"
    )
    assert client.guest("vm1")["connections"] == 2


def test_the_api_finds_a_guest_by_any_spelling_of_its_key(stack: Stack) -> None:
    """The API goes through the library's one key rule: a label of digits is a CID-like key."""
    daemon = stack.daemon("--probe-interval", "none", guest_label="7")
    stack.agent(daemon.guest_address)
    client = daemon.client()
    assert client.guest("007", wait=LONG)["key"] == "7"  # waited for, then already there
    assert client.guest("0007", wait=LONG)["key"] == "7"
    assert client.run("07", "echo found").stdout == b"found\n"


def test_json_log_lines(stack: Stack) -> None:
    daemon = stack.daemon("--log-format", "json")
    daemon.stop()
    entries = [json.loads(line) for line in daemon.log().splitlines()]
    assert entries
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e["message"].startswith("control API on unix:") for e in entries)


# -- startup errors ---------------------------------------------------------------------------


def test_bad_address_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    status, err = serve_usage_error(capsys, "--listen", "vsock://any", "--control", "unix:/x")
    assert status == 2
    assert err == "vsock-async serve: error: 'vsock://any': missing ':PORT' at the end\n"


def test_address_in_use(stack: Stack) -> None:
    daemon = stack.daemon()
    other = stack.directory / "other.sock"
    result = serve_error("--listen", daemon.guest_address, "--control", f"unix:{other}")
    assert result.returncode == 1
    assert_one_line_error(result, "address already in use")
    result = serve_error("--listen", f"unix:{other}", "--control", f"unix:{daemon.control_socket}")
    assert_one_line_error(result, "address already in use")
    assert not other.exists()  # the guest listener opened first was closed and removed
    assert daemon.client().health()["status"] == "ok"


def test_missing_directory_and_no_permission(tmp_path: Path) -> None:
    control = f"unix:{tmp_path}/c.sock"
    result = serve_error("--listen", "unix:/nonexistent-dir/g.sock", "--control", control)
    assert_one_line_error(result, "directory does not exist")
    if os.geteuid() != 0:
        result = serve_error("--listen", "tcp://127.0.0.1:1", "--control", control)
        assert_one_line_error(result, "permission denied")


def test_control_socket_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    """Someone else's open directory (say /tmp/vsock-async-UID made first) could swap the socket."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by all, not sticky
    control = f"unix:{shared}/c.sock"
    result = serve_error("--listen", f"unix:{tmp_path}/g.sock", "--control", control)
    assert_one_line_error(result, "not writable by others")
    assert not (shared / "c.sock").exists()


def test_tcp_control_needs_a_token_and_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text("tok")
    for args, fragment in [
        (["--control", "tcp://127.0.0.1:0"], "needs --token-file"),
        (["--control", "tcp://192.0.2.1:0", "--token-file", str(token)], "--control-allow-remote"),
        (["--control", "tcp://[::1]:0", "--token-file", str(tmp_path / "no")], "cannot read"),
        (["--control", "vsock://any:5"], "unix:PATH or tcp://HOST:PORT"),
        (["--listen", "vm=vsock://any:1024"], "labels are for"),
        (["--listen", "unix:/g.sock", "--allowed-cid", "3"], "--allowed-cid applies"),
        (["--metrics", "unix:/m.sock"], "served on tcp://HOST:PORT"),
    ]:
        status, err = serve_usage_error(capsys, *args)
        assert status == 2
        assert err.startswith("vsock-async serve: error: ") and err.count("\n") == 1
        assert fragment in err


def test_a_probe_interval_of_0_is_refused(tmp_path: Path) -> None:
    result = serve_error(
        *("--listen", f"unix:{tmp_path}/g.sock", "--control", f"unix:{tmp_path}/c.sock"),
        *("--probe-interval", "0"),
    )
    assert result.returncode == 2
    assert_one_line_error(result, "use 'none' to turn periodic probes off")


def test_a_cap_of_0_connections_per_guest_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--max-connections-per-guest", "0"])
    assert info.value.code == 2
    assert "'0' is not a whole number >= 1 (or 'none')" in capsys.readouterr().err


def test_timeouts_follow_the_one_rule(stack: Stack) -> None:
    """0 is no time at all (a run is never sent); none is no deadline, also for the grace."""
    daemon = stack.daemon("--default-timeout", "0", "--grace", "none", "--probe-timeout", "none")
    stack.agent(daemon.guest_address)
    client = daemon.client()
    wait_for_guest(client, "vm1")
    with pytest.raises(ControlError) as info:
        client.run("vm1", "echo never sent")
    assert (info.value.status, info.value.code) == (504, "command_timeout")
    assert client.run("vm1", "echo given time", timeout=LONG).stdout == b"given time\n"


# -- shutdown ---------------------------------------------------------------------------------


class Running:
    """A run through the control API in a thread: its outcome, or the error it ended with.

    The drain treats runs and streamed execs apart (execs get SIGTERM: test_exec_api.py);
    these tests are about runs.
    """

    def __init__(self, client: ControlClient, command: str) -> None:
        self.outcome: RunOutcome | None = None
        self.error: ControlError | None = None
        self._thread = threading.Thread(target=self._run, args=(client, command), daemon=True)
        self._thread.start()

    def _run(self, client: ControlClient, command: str) -> None:
        try:
            self.outcome = client.run("vm1", command)
        except ControlError as exc:
            self.error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join(LONG)
        assert self.done(), "the run never ended"


def busy(client: ControlClient) -> bool:
    """True while guest vm1 runs something (on v1 a busy connection, on v2 a stream)."""
    return bool(client.guest("vm1")["running"])


def refused(client: ControlClient) -> bool:
    try:
        client.health()
    except ConnectFailed:
        return True
    return False


def draining_setup(
    stack: Stack, grace: str, gate_name: str, protocol: str = "auto"
) -> tuple[Daemon, ControlClient, Running, Path]:
    """serve with ``--grace``, an agent, and a run of a command held until the marker exists."""
    daemon = stack.daemon(  # busy means: the command
        "--grace", grace, "--probe-interval", "none", "--protocol", protocol
    )
    stack.agent(daemon.guest_address)
    client = daemon.client()
    wait_for_guest(client, "vm1")
    command, marker = gate(stack.directory, gate_name)
    running = Running(daemon.client(), command)

    def started() -> bool:
        if running.done():
            pytest.fail(f"the run ended early: {running.outcome, running.error}\n{daemon.log()}")
        return busy(client)

    eventually(started, "the command running")
    return daemon, client, running, marker


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_lets_a_running_command_finish(stack: Stack, signum: int) -> None:
    daemon, client, running, marker = draining_setup(stack, str(LONG), "go")
    daemon.send(signum)
    eventually(lambda: refused(client), "the control API refusing new connections")
    with socket.socket(socket.AF_UNIX) as guest, pytest.raises(ConnectionRefusedError):
        guest.connect(daemon.guest_socket)
    assert daemon.proc.poll() is None  # still draining
    marker.touch()
    running.wait()
    assert running.outcome is not None, running.error
    assert (running.outcome.exit_code, running.outcome.stdout) == (0, b"released\n")
    assert daemon.proc.wait(LONG) == 0
    assert not os.path.exists(daemon.control_socket)
    assert not os.path.exists(daemon.guest_socket)
    assert "waiting for 1 running command" in daemon.log()


@pytest.mark.parametrize("protocol", ["v2", "v1"])
def test_the_grace_period_ends_the_wait(stack: Stack, protocol: str) -> None:
    """A run still going when the grace ends is the daemon's doing, not the guest's: 503
    ``shutting_down`` saying so, on either protocol, and the log agrees."""
    daemon, _, running, _ = draining_setup(stack, "0.2", "never", protocol)
    daemon.send(signal.SIGTERM)
    running.wait()
    assert running.error is not None, running.outcome
    assert (running.error.status, running.error.code) == (503, "shutting_down")
    assert "the daemon ended command 'while" in running.error.message
    assert "at the end of the shutdown drain (--grace 0.2 s)" in running.error.message
    assert daemon.proc.wait(LONG) == 0
    log = daemon.log()
    assert "1 command(s) and exec(s) still running at the end of the shutdown drain" in log
    assert "in guest 'vm1' was still running at the end of the shutdown drain" in log
    assert "guest_failed" not in log


def test_a_second_signal_stops_at_once(stack: Stack) -> None:
    daemon, _, running, _ = draining_setup(stack, "3600", "never")
    daemon.send(signal.SIGTERM)
    eventually(lambda: "waiting for 1 running command" in daemon.log(), "the drain begun")
    daemon.send(signal.SIGTERM)
    assert daemon.proc.wait(LONG) == 0
    running.wait()
    assert running.error is not None and running.error.code == "shutting_down"
    assert "the daemon ended command 'while" in running.error.message
    assert "on a second signal" in running.error.message
    assert "again: stopping at once" in daemon.log()

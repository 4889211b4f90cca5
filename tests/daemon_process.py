"""``serve`` and the agent as real child processes over real sockets, for the serve tests."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vsock_async.errors import VsockAsyncError
from vsock_async.serve.control_client import ControlClient

LONG = 20.0


def eventually(predicate: Callable[[], object], what: str, limit: float = LONG) -> None:
    """Poll ``predicate()`` until it is true; fail with ``what`` if it never is."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.02)


def python_m(*args: str) -> list[str]:
    """The argv of ``python -m vsock_async ARGS``."""
    return [sys.executable, "-m", "vsock_async", *args]


def free_tcp_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(proc: subprocess.Popen[bytes], signum: int) -> int:
    """Send ``signum`` unless ``proc`` has exited; kill it if it lingers; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signum)
        try:
            proc.wait(LONG)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Daemon:
    """One ``python -m vsock_async serve`` child; its stderr goes to a log file."""

    def __init__(
        self, directory: Path, *args: str, guest_label: str | None = "vm1", umask: int = -1
    ) -> None:
        self.directory = directory
        self.guest_socket = str(directory / "guest.sock")
        self.control_socket = str(directory / "control.sock")
        self.guest_address = f"unix:{self.guest_socket}"
        self.log_path = directory / "serve.log"
        listen = f"{guest_label}={self.guest_address}" if guest_label else self.guest_address
        argv = ["serve", "--log-level", "debug"]
        if "--listen" not in args:
            argv += ["--listen", listen]
        if "--control" not in args:
            argv += ["--control", f"unix:{self.control_socket}"]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            python_m(*argv, *args),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            umask=umask,
        )

    def client(self, token: str | None = None, address: str | None = None) -> ControlClient:
        """A control client of this daemon."""
        return ControlClient(address or f"unix:{self.control_socket}", token=token, timeout=LONG)

    def wait_ready(self, client: ControlClient | None = None) -> None:
        """Return once the control API answers; fail with the log if serve exits first."""
        client = client or self.client()

        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                client.health()
            except VsockAsyncError:
                return False
            return True

        eventually(ready, "serve's control API answering")

    def log(self) -> str:
        """Everything serve has logged so far."""
        return self.log_path.read_text(errors="replace")

    def send(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` to serve."""
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Stop serve (kill it if it does not stop in time); its exit status."""
        self._log.close()
        return stop_process(self.proc, signum)


class Agent:
    """One ``python -m vsock_async agent --connect ADDRESS`` child."""

    def __init__(
        self, address: str, directory: Path, *args: str, launcher: tuple[str, ...] = ()
    ) -> None:
        self._log = open(directory / "agent.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*launcher, *python_m("agent", "--connect", address, "--log-level", "debug", *args)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )

    def stop(self) -> None:
        """Terminate the agent and reap it."""
        self._log.close()
        stop_process(self.proc, signal.SIGTERM)


@contextlib.contextmanager
def short_directory() -> Iterator[Path]:
    """A fresh directory whose socket paths fit in sun_path, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="vsa-serve-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Stack:
    """Processes started by one test, stopped at its end in reverse order."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stops: list[Callable[[], object]] = []

    def daemon(
        self, *args: str, guest_label: str | None = "vm1", ready: bool = True, umask: int = -1
    ) -> Daemon:
        """Start serve (``umask`` -1: ours); wait for its control API unless ``ready=False``."""
        daemon = Daemon(self.directory, *args, guest_label=guest_label, umask=umask)
        self._stops.append(daemon.stop)
        if ready:
            daemon.wait_ready()
        return daemon

    def agent(self, address: str, *args: str, launcher: tuple[str, ...] = ()) -> Agent:
        """Start an agent dialing ``address`` (through ``launcher``, an argv prefix)."""
        agent = Agent(address, self.directory, *args, launcher=launcher)
        self._stops.append(agent.stop)
        return agent

    def close(self) -> None:
        for stop in reversed(self._stops):
            stop()


@pytest.fixture
def stack() -> Iterator[Stack]:
    """Start serve and agents as child processes; all stopped when the test ends."""
    with short_directory() as directory:
        processes = Stack(directory)
        try:
            yield processes
        finally:
            processes.close()


def wait_for_guest(client: ControlClient, key: str) -> dict[str, object]:
    """The guest ``key`` once connected and probed by serve."""
    guest = client.guest(key, wait=LONG)

    def probed() -> bool:
        nonlocal guest
        guest = client.guest(key)
        return guest["last_probe"] is not None

    eventually(probed, f"serve probing guest {key}")
    return guest


@contextlib.contextmanager
def serve_with_agent(agent_launcher: tuple[str, ...] = ()) -> Iterator[tuple[Daemon, Path]]:
    """A real serve (no periodic probes) and one agent connected to it as guest vm1 (started
    through ``agent_launcher``), in a fresh short directory; both stopped at the end."""
    with short_directory() as directory:
        processes = Stack(directory)
        try:
            daemon = processes.daemon("--probe-interval", "none")
            processes.agent(daemon.guest_address, launcher=agent_launcher)
            wait_for_guest(daemon.client(), "vm1")
            yield daemon, directory
        finally:
            processes.close()


def exec_cli(control_socket: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``python -m vsock_async exec --control unix:SOCKET ARGS``, output captured as bytes."""
    return subprocess.run(
        python_m("exec", "--control", f"unix:{control_socket}", *args),
        capture_output=True,
        timeout=LONG,
        check=False,
    )


__all__ = [
    "LONG",
    "Agent",
    "Daemon",
    "Stack",
    "eventually",
    "exec_cli",
    "free_tcp_port",
    "python_m",
    "serve_with_agent",
    "short_directory",
    "stack",
    "wait_for_guest",
]

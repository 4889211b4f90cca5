"""``python -m vsock_async demo``: the whole product on one machine, no VM, in a few seconds.

It starts the real ``serve`` on a temporary Unix socket, the real agent as
a separate process dialing it (the way an agent in a guest dials the host
over vsock), drives a few commands through the control API with the same
client ``exec`` uses, prints what happened, and cleans up.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import TextIO

from .._sockets import FORBID_VSOCK_CONNECT_ENV
from ..errors import VsockAsyncError
from ..timeouts import DEFAULT, Timeout
from .control_client import ControlClient, ControlError

__all__ = ["run_demo"]

GUEST_KEY = "demo"

_COMMANDS: list[tuple[str, str | list[str], Timeout]] = [
    ("a shell command line", "uname -sr; echo hello from the guest", DEFAULT),
    ("stderr and an exit code", "echo 'this goes to stderr' >&2; exit 42", DEFAULT),
    ("argv, quoted with shlex.join", ["printf", "[%s]\\n", "it's one argument", "*"], DEFAULT),
    ("binary output, lossless", "printf '\\000\\001\\377'", DEFAULT),
    ("a deadline that fires: HTTP 504", "echo started; sleep 5", 0.3),
]


def _start(args: list[str], log: TextIO, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vsock_async", *args],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=env,
    )


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def _wait_for_api(client: ControlClient, serve: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if serve.poll() is not None:
            raise RuntimeError(f"serve exited with status {serve.returncode} before it was ready")
        try:
            client.health()
            return
        except VsockAsyncError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"serve's control API did not come up within {timeout} s"
                ) from None
            time.sleep(0.05)


def _show(data: bytes) -> str:
    lines = data.decode("utf-8", "replace").rstrip("\n").split("\n")
    if data and all(line.isprintable() and "\ufffd" not in line for line in lines):
        return ("\n" + " " * 18).join(lines)
    return f"{len(data)} bytes: {data!r}"


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _drive(client: ControlClient) -> None:
    guest = client.guest(GUEST_KEY, wait=10)
    print(
        f"  guests         GET /v1/guests/{GUEST_KEY}: {guest['connections']} connection(s),"
        f" protocol {guest['protocol']}, connected at {guest['connected_at']}"
    )
    for title, command, timeout in _COMMANDS:
        shown = shlex.join(command) if isinstance(command, list) else command
        print(f"\n  {title}\n    $ {shown}")
        try:
            outcome = client.run(GUEST_KEY, command, timeout=timeout)
        except ControlError as exc:
            print(f"    -> HTTP {exc.status} {exc.code}: {exc.message}")
            if exc.code == "command_timeout":
                guest = client.guest(GUEST_KEY, wait=10)
                if guest["protocol"] == "v2":
                    print(
                        "    on protocol v2 each command has a stream of its own: the agent"
                        "\n    stopped that command's process group; the connection carries on"
                    )
                    print(f"    -> {GUEST_KEY} still has {guest['connections']} connection(s)")
                else:
                    print(
                        "    the daemon closed that connection (v1: a late result must never"
                        "\n    be read as the next one's); the agent killed the command and dials"
                        " again"
                    )
                    print(f"    -> {GUEST_KEY} is back with {guest['connections']} connection(s)")
            continue
        print(f"    -> exit code {outcome.exit_code} in {outcome.duration * 1000:.1f} ms")
        if outcome.stdout:
            print(f"    stdout        {_show(outcome.stdout)}")
        if outcome.stderr:
            print(f"    stderr        {_show(outcome.stderr)}")
    probe = client.probe(GUEST_KEY)
    print(f"\n  probe          POST /v1/guests/{GUEST_KEY}/probe: ok in {probe['duration']:.4f} s")
    wanted = ("vsock_async_commands_total", "vsock_async_commands_timed_out_total")
    lines = [ln for ln in client.metrics().splitlines() if ln.split(" ")[0] in wanted]
    print("  metrics        GET /metrics: " + ", ".join(lines))


def run_demo() -> int:
    """Run the demo; 0 when everything behaved as it should."""
    with tempfile.TemporaryDirectory(prefix="vsock-async-demo-") as tmp:
        guest_address = f"unix:{os.path.join(tmp, 'guest.sock')}"
        control_address = f"unix:{os.path.join(tmp, 'control.sock')}"
        env = {**os.environ, FORBID_VSOCK_CONNECT_ENV: "1"}
        log_path = os.path.join(tmp, "processes.log")
        client = ControlClient(control_address)
        print("vsock-async demo: the host daemon and a guest agent on this machine, no VM.")
        print(
            "The agent dials a Unix socket, just as an agent in a guest dials the host's vsock.\n"
        )
        with open(log_path, "w") as log, _processes() as procs:
            try:
                serve = _start(
                    [
                        "serve",
                        "--listen",
                        f"{GUEST_KEY}={guest_address}",
                        "--control",
                        control_address,
                        "--log-level",
                        "warning",
                    ],
                    log,
                    env,
                )
                procs.append(serve)
                _wait_for_api(client, serve, 15)
                print(f"  serve          pid {serve.pid}: guests dial {guest_address}")
                print(f"                 control API (HTTP+JSON) on {control_address}")
                agent = _start(
                    ["agent", "--connect", guest_address, "--log-level", "warning"], log, env
                )
                procs.append(agent)
                print(f"  agent          pid {agent.pid}: dialing {guest_address}")
                _drive(client)
            except (VsockAsyncError, RuntimeError, OSError) as exc:
                print(f"\nvsock-async demo: failed: {exc}", file=sys.stderr)
                log.flush()
                with open(log_path) as f:
                    sys.stderr.write(f.read()[-4000:])
                return 1
            statuses = [_stop(p) for p in reversed(procs)]
            procs.clear()
        print(f"\n  shutdown       SIGTERM: agent exited {statuses[0]}, serve exited {statuses[1]}")
        if any(statuses):
            print("vsock-async demo: a process did not exit cleanly", file=sys.stderr)
            return 1
    print("\nDone. Next: `vsock-async serve` on a host, `vsock-async agent` in a guest.")
    print("See docs/serve.md and docs/control-api.md.")
    return 0

"""A control API client that goes away: its run is cancelled like a timeout (the guest's
process group killed, the connection free again), a queued run is dropped unrun, and an
abandoned ``?wait=`` poll ends. Real ``serve`` and agent processes, raw HTTP clients."""

from __future__ import annotations

import json
import socket
import threading

from tests.agent_process import live_members
from tests.daemon_process import LONG, Daemon, Stack, eventually, stack, wait_for_guest
from vsock_async.serve.control_client import ControlClient, ControlError

__all__ = ["stack"]


def started(stack: Stack) -> tuple[Daemon, ControlClient]:
    """serve and an agent holding one v2 connection that runs one process at a time, probed."""
    daemon = stack.daemon("--probe-interval", "none")
    stack.agent(daemon.guest_address, "--max-streams", "1")
    client = daemon.client()
    wait_for_guest(client, "vm1")
    return daemon, client


def free(client: ControlClient) -> bool:
    """True when guest vm1 is connected and not busy (False while its agent redials)."""
    try:
        guest = client.guest("vm1")
    except ControlError:
        return False
    return guest["connections"] == 1 and not guest["busy"]


def raw_request(daemon: Daemon, method: str, path: str, body: object = None) -> socket.socket:
    """Send one HTTP request on a new connection and leave it open, the answer unread."""
    data = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(daemon.control_socket)
    sock.sendall(head.encode() + data)
    return sock


def test_a_run_whose_client_leaves_is_cancelled_and_its_process_group_killed(
    stack: Stack,
) -> None:
    daemon, client = started(stack)
    pgid_file = stack.directory / "pgid"
    command = f"cut -d' ' -f5 /proc/$$/stat > {pgid_file}.tmp; mv {pgid_file}.tmp {pgid_file};"
    with raw_request(daemon, "POST", "/v1/guests/vm1/run", {"command": command + "sleep 30"}):
        eventually(pgid_file.exists, "the command started")
        pgid = int(pgid_file.read_text())
        assert live_members(pgid)
    eventually(lambda: not live_members(pgid), "the command's process group killed")
    eventually(lambda: free(client), "the guest connected and free again")
    assert client.run("vm1", "echo next", wait=False).stdout == b"next\n"
    assert "the client went away" in daemon.log()


def test_a_queued_run_whose_client_leaves_never_runs(stack: Stack) -> None:
    daemon, client = started(stack)
    release = stack.directory / "release"
    holder = threading.Thread(
        target=client.run, args=("vm1", f"while [ ! -e {release} ]; do sleep 0.01; done")
    )
    holder.start()
    try:
        eventually(lambda: client.guest("vm1")["busy"], "the one connection busy")
        ran = stack.directory / "queued-run-ran"
        with raw_request(daemon, "POST", "/v1/guests/vm1/run", {"command": f"touch {ran}"}):
            eventually(lambda: client.guest("vm1")["waiting"] == 1, "the second run queued")
        eventually(lambda: client.guest("vm1")["waiting"] == 0, "the queued run dropped")
    finally:
        release.touch()
        holder.join(LONG)
    assert client.run("vm1", "echo after").stdout == b"after\n"
    assert not ran.exists()


def test_an_abandoned_wait_poll_ends(stack: Stack) -> None:
    daemon, _ = started(stack)
    with raw_request(daemon, "GET", "/v1/guests/nobody?wait=600"):
        eventually(lambda: "waiting up to 600 s for guest 'nobody'" in daemon.log(), "the poll")
    eventually(
        lambda: "GET /v1/guests/nobody: the client went away" in daemon.log(),
        "the poll ended when its client left",
    )


def test_the_drain_does_not_wait_for_a_run_nobody_wants(stack: Stack) -> None:
    daemon, client = started(stack)
    with raw_request(daemon, "POST", "/v1/guests/vm1/run", {"command": "sleep 30"}):
        eventually(lambda: client.guest("vm1")["running"], "the command running")
    eventually(lambda: free(client), "the run cancelled")
    daemon.send()
    assert daemon.proc.wait(LONG) == 0
    assert "waiting for" not in daemon.log()

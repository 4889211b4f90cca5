"""The streaming exec of the control API, end to end: real ``serve`` and agent processes,
WebSocket and plain HTTP clients over the real control socket. Output as it comes, stdin
and its end, terminals and their size, signals, deadlines, the errors, a client that goes
away or never reads or sends too much, the drain on SIGTERM; each time, nothing is left
running in the guest."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.agent_process import STARTS_WITHIN, live_members
from tests.daemon_process import (
    LONG,
    Daemon,
    Stack,
    eventually,
    short_directory,
    stack,
    wait_for_guest,
)
from vsock_async.serve.exec_stream import FRAME_HEADER

__all__ = ["stack"]

MAX_COMMAND = 4096
MAX_MESSAGE = 2 * MAX_COMMAND + 64 * 1024
"""The daemon's largest WebSocket message with ``--max-command 4K``."""


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with short_directory() as directory:
        processes = Stack(directory)
        try:
            served = processes.daemon("--max-command", "4K", "--probe-interval", "none")
            processes.agent(served.guest_address)
            wait_for_guest(served.client(), "vm1")
            yield served
        finally:
            processes.close()


def _session(daemon: Daemon) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=daemon.control_socket))


@contextlib.asynccontextmanager
async def websocket(
    daemon: Daemon, *, method: str = "GET", guest: str = "vm1"
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with (
        _session(daemon) as session,
        session.ws_connect(f"http://localhost/v1/guests/{guest}/exec", method=method) as ws,
    ):
        yield ws


@dataclass
class Outcome:
    stdout: bytes = b""
    stderr: bytes = b""
    controls: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None

    @property
    def last(self) -> dict[str, Any]:
        return self.controls[-1]


async def collect(ws: aiohttp.ClientWebSocketResponse, outcome: Outcome | None = None) -> Outcome:
    """Read ``ws`` to its end, its close included."""
    outcome = outcome or Outcome()
    while (message := await ws.receive()).type is not aiohttp.WSMsgType.CLOSE:
        if message.type is aiohttp.WSMsgType.BINARY:
            channel, data = message.data[0], message.data[1:]
            if channel == 1:
                outcome.stdout += data
            else:
                assert channel == 2
                outcome.stderr += data
        else:
            assert message.type is aiohttp.WSMsgType.TEXT
            outcome.controls.append(json.loads(message.data))
    outcome.close_code, outcome.close_reason = message.data, message.extra
    return outcome


async def start(ws: aiohttp.ClientWebSocketResponse, request: dict[str, Any]) -> int:
    """Send ``request``; the pid of the process once it runs."""
    await ws.send_str(json.dumps(request))
    started = await ws.receive_json()
    assert started["type"] == "started"
    pid = started["pid"]
    assert isinstance(pid, int)
    return pid


async def read_until(ws: aiohttp.ClientWebSocketResponse, wanted: bytes) -> bytes:
    """Stdout (channel 1) until it holds ``wanted``."""
    seen = b""
    while wanted not in seen:
        message = await asyncio.wait_for(ws.receive(), LONG)
        assert message.type is aiohttp.WSMsgType.BINARY, message
        assert message.data[0] == 1
        seen += message.data[1:]
    return seen


async def gone(pid: int) -> None:
    """Wait until process group ``pid`` has no live member in the guest."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LONG
    while live_members(pid):
        if loop.time() > deadline:
            pytest.fail(f"process group {pid} still running in the guest")
        await asyncio.sleep(0.02)


def gate(daemon: Daemon, name: str) -> tuple[str, Path]:
    """A shell loop that waits until the returned file exists."""
    marker = daemon.directory / name
    return f"while [ ! -e {marker} ]; do sleep 0.01; done", marker


# -- WebSocket -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stdin_stdout_stderr_and_the_exit_code(daemon: Daemon) -> None:
    async with websocket(daemon) as ws:
        pid = await start(ws, {"command": ["sh", "-c", "cat; echo err >&2; exit 3"], "stdin": True})
        await ws.send_bytes(b"\x00hello ")
        await ws.send_bytes(b"\x00" + bytes(range(256)))
        await ws.send_str('{"type": "eof"}')
        outcome = await collect(ws)
    assert outcome.stdout == b"hello " + bytes(range(256))
    assert outcome.stderr == b"err\n"
    assert outcome.last["type"] == "exit"
    assert (outcome.last["exit_code"], outcome.last["exit_signal"]) == (3, None)
    assert outcome.last["timed_out"] is False and outcome.last["output_incomplete"] is False
    assert outcome.close_code == 1000
    await gone(pid)


@pytest.mark.asyncio
async def test_stderr_merged_into_stdout_keeps_the_order_written(daemon: Daemon) -> None:
    script = "echo a; echo b >&2; echo c; exit 7"
    async with websocket(daemon) as ws:
        pid = await start(ws, {"command": ["sh", "-c", script], "stderr": "stdout"})
        outcome = await collect(ws)
    assert (outcome.stdout, outcome.stderr) == (b"a\nb\nc\n", b"")
    assert outcome.last["exit_code"] == 7
    await gone(pid)


@pytest.mark.asyncio
async def test_a_post_upgrade_works_as_a_get_does(daemon: Daemon) -> None:
    async with websocket(daemon, method="POST") as ws:
        await start(ws, {"command": "echo via post", "env": {"A": "1"}, "cwd": "/"})
        outcome = await collect(ws)
    assert (outcome.stdout, outcome.last["exit_code"]) == (b"via post\n", 0)


@pytest.mark.asyncio
async def test_output_arrives_before_the_process_ends(daemon: Daemon) -> None:
    wait, marker = gate(daemon, "stream-gate")
    async with websocket(daemon) as ws:
        await start(ws, {"command": f"echo first; {wait}; echo second"})
        assert await read_until(ws, b"first\n") == b"first\n"
        assert (
            not marker.exists()
        )  # the process is still waiting: the output came as it was written
        marker.touch()
        outcome = await collect(ws)
    assert outcome.stdout == b"second\n"
    assert outcome.last["exit_code"] == 0


@pytest.mark.asyncio
async def test_a_tty_has_its_size_and_follows_resizes(daemon: Daemon) -> None:
    script = "tty; stty size; read line; stty size"
    async with websocket(daemon) as ws:
        await start(
            ws,
            {"command": ["sh", "-c", script], "tty": {"rows": 24, "cols": 80}, "stdin": True},
        )
        seen = await read_until(ws, b"24 80")
        assert b"/dev/pts/" in seen
        await ws.send_str(json.dumps({"type": "resize", "rows": 50, "cols": 132}))
        await ws.send_bytes(b"\x00go\n")
        outcome = await collect(ws)
    assert b"50 132" in outcome.stdout
    assert outcome.stderr == b""  # a terminal merges stderr into stdout
    assert outcome.last["exit_code"] == 0


@pytest.mark.asyncio
@pytest.mark.parametrize(("given", "number"), [("INT", 2), (15, 15), ("SIGKILL", 9)])
async def test_a_signal_reaches_the_process(daemon: Daemon, given: object, number: int) -> None:
    async with websocket(daemon) as ws:
        pid = await start(ws, {"command": ["sleep", "30"]})
        await ws.send_str(json.dumps({"type": "signal", "signal": given}))
        outcome = await collect(ws)
    assert (outcome.last["exit_code"], outcome.last["exit_signal"]) == (128 + number, number)
    await gone(pid)


@pytest.mark.asyncio
async def test_the_timeout_stops_the_process(daemon: Daemon) -> None:
    async with websocket(daemon) as ws:
        pid = await start(ws, {"command": ["sleep", "30"], "timeout": STARTS_WITHIN})
        outcome = await collect(ws)
    assert outcome.last["timed_out"] is True
    assert outcome.last["exit_signal"] == signal.SIGTERM
    await gone(pid)


@pytest.mark.asyncio
async def test_no_time_at_all_never_starts_it(daemon: Daemon) -> None:
    marker = daemon.directory / "never-started"
    async with websocket(daemon) as ws:
        await ws.send_str(json.dumps({"command": f"touch {marker}", "timeout": 0}))
        outcome = await collect(ws)
    assert outcome.last["error"]["code"] == "command_timeout"
    assert outcome.close_code == 1011
    assert not marker.exists()


@pytest.mark.asyncio
async def test_the_timeout_covers_the_wait_for_a_free_stream(stack: Stack) -> None:
    """With every stream the agent allows busy, an exec waits for one within its timeout only:
    then it ends as an exec given no time does, on both forms, and nothing ever runs."""
    daemon = stack.daemon("--probe-interval", "none")
    stack.agent(daemon.guest_address, "--max-streams", "1")
    wait_for_guest(daemon.client(), "vm1")
    wait, release = gate(daemon, "free-stream")
    marker = daemon.directory / "never-started"
    request = {"command": f"touch {marker}", "timeout": 0.05}
    async with websocket(daemon) as holder:
        held = await start(holder, {"command": wait})
        async with websocket(daemon) as ws:
            await ws.send_str(json.dumps(request))
            outcome = await asyncio.wait_for(collect(ws), LONG)
        assert outcome.controls == [outcome.last]
        assert (outcome.last["status"], outcome.last["error"]["code"]) == (504, "command_timeout")
        assert "waited for a free stream" in outcome.last["error"]["message"]
        assert outcome.close_code == 1011
        async with (
            _session(daemon) as session,
            session.post("http://localhost/v1/guests/vm1/exec", json=request) as response,
        ):
            assert response.status == 504
            body = await asyncio.wait_for(response.json(), LONG)
        assert body["error"]["code"] == "command_timeout"
        assert body["timed_out"] is True and body["exit_code"] is None
        assert daemon.client().guest("vm1")["running"] == 1  # the holder alone: none was leaked
        release.touch()
        assert (await collect(holder)).last["exit_code"] == 0
    await gone(held)
    async with websocket(daemon) as ws:  # the stream is free again, for an exec given time
        await start(ws, {"command": "echo next", "timeout": LONG})
        assert (await collect(ws)).stdout == b"next\n"
    assert not marker.exists()


@pytest.mark.asyncio
async def test_a_program_that_cannot_start(daemon: Daemon) -> None:
    async with websocket(daemon) as ws:
        await ws.send_str(json.dumps({"command": ["/no/such/program"]}))
        outcome = await collect(ws)
    assert outcome.last["type"] == "error"
    assert outcome.last["error"]["code"] == "spawn_failed"
    assert "/no/such/program" in outcome.last["error"]["message"]
    assert outcome.last["errno"] == "ENOENT"
    assert outcome.close_code == 1008


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("first", "says"),
    [
        (b"\x00binary", "the first message must be the exec request"),
        ("{not json", "not valid JSON"),
        ('{"command": "true", "shell": "bash"}', "unknown field(s) shell"),
        ('{"command": "true", "tty": {"rows": 0, "cols": 1}}', "terminal rows"),
        ('{"command": "true", "stderr": "null"}', "stderr must be"),
    ],
)
async def test_a_bad_request_message_is_answered_and_closed(
    daemon: Daemon, first: str | bytes, says: str
) -> None:
    async with websocket(daemon) as ws:
        await (ws.send_bytes(first) if isinstance(first, bytes) else ws.send_str(first))
        outcome = await collect(ws)
    assert outcome.controls == [outcome.last]
    assert outcome.last["error"]["code"] == "bad_request"
    assert says in outcome.last["error"]["message"]
    assert outcome.close_code == 1008


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("request_extra", "message", "says"),
    [
        ({"stdin": True}, b"\x01data", "on channel 0 (stdin), not 1"),
        ({}, b"\x00data", "stdin was not asked for"),
        ({}, '{"type": "eof"}', "stdin was not asked for"),
        ({}, '{"type": "resize", "rows": 5, "cols": 5}', "needs a process started with a tty"),
        ({}, '{"type": "signal", "signal": "NOPE"}', "a signal is"),
        ({}, '{"type": "detach"}', "unknown message type"),
    ],
)
async def test_a_bad_message_ends_the_exec_and_stops_the_process(
    daemon: Daemon, request_extra: dict[str, Any], message: str | bytes, says: str
) -> None:
    async with websocket(daemon) as ws:
        pid = await start(ws, {"command": ["sleep", "30"], **request_extra})
        await (ws.send_bytes(message) if isinstance(message, bytes) else ws.send_str(message))
        outcome = await collect(ws)
    assert outcome.last["error"]["code"] == "bad_request"
    assert says in outcome.last["error"]["message"]
    assert outcome.close_code == 1008
    await gone(pid)


@pytest.mark.asyncio
async def test_a_client_that_closes_stops_its_process(daemon: Daemon) -> None:
    async with websocket(daemon) as ws:
        pid = await start(ws, {"command": "sleep 30 & sleep 30; wait"})
        eventually(lambda: len(live_members(pid)) >= 3, "the shell and both sleeps running")
    await gone(pid)
    eventually(lambda: "the client went away" in daemon.log(), "the daemon logging it")


async def too_big(ws: aiohttp.ClientWebSocketResponse, message: str | bytes) -> Outcome:
    """Send ``message``, over the daemon's limit, whole (the daemon reads it all, dropping it);
    what came back until the close, whose reason is the last control."""
    await (ws.send_str(message) if isinstance(message, str) else ws.send_bytes(message))
    outcome = Outcome()
    while (received := await ws.receive()).type is not aiohttp.WSMsgType.CLOSE:
        assert received.type is aiohttp.WSMsgType.TEXT, received
        outcome.controls.append(json.loads(received.data))
    outcome.controls.append({"reason": received.extra})
    outcome.close_code = received.data
    return outcome


def assert_too_big(outcome: Outcome, size: int) -> None:
    error, close = outcome.controls[-2:]
    assert (error["status"], error["error"]["code"]) == (413, "body_too_large")
    assert f"a message of {size} bytes or more, over the limit of {MAX_MESSAGE}" in str(error)
    assert outcome.close_code == 1009
    assert close["reason"] == f"message too big: the limit is {MAX_MESSAGE} bytes"


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [MAX_MESSAGE + 1, 40 * MAX_MESSAGE])
async def test_an_oversized_message_closes_with_1009_and_stops_the_process(
    daemon: Daemon, size: int
) -> None:
    async with websocket(daemon) as ws:
        pid = await start(ws, {"command": ["cat"], "stdin": True})
        outcome = await too_big(ws, b"\x00" + b"x" * (size - 1))
    assert outcome.controls[:-2] == []  # no stdout: cat never got the message
    assert_too_big(outcome, size)
    await gone(pid)


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [MAX_MESSAGE + 1, 40 * MAX_MESSAGE])
async def test_an_oversized_request_closes_with_1009_and_others_carry_on(
    daemon: Daemon, size: int
) -> None:
    """The first message too big: the client sends it whole, reads the error and the 1009
    close; an exec running meanwhile goes on and ends as usual, and nothing was started."""
    marker = daemon.directory / "oversized-request"
    request = json.dumps({"command": f"touch {marker}", "env": {"PAD": ""}})
    padded = request.replace('"PAD": ""', f'"PAD": "{"x" * (size - len(request))}"')
    assert len(padded) == size
    async with websocket(daemon) as other:
        await start(other, {"command": ["cat"], "stdin": True})
        async with websocket(daemon) as ws:
            outcome = await too_big(ws, padded)
        assert_too_big(outcome, size)
        await other.send_bytes(b"\x00still here")
        await other.send_str('{"type": "eof"}')
        after = await collect(other)
    assert (after.stdout, after.last["exit_code"], after.close_code) == (b"still here", 0, 1000)
    assert not marker.exists()
    assert daemon.client().health()["status"] == "ok"
    log = daemon.log()
    assert f"over the limit of {MAX_MESSAGE} bytes; closing with 1009" in log


def _process_counts(daemon: Daemon) -> tuple[int, int, int]:
    """Processes started, running and exited (all kinds), from the metrics."""
    values: dict[str, float] = {}
    for line in daemon.client().metrics().splitlines():
        if line.startswith("vsock_async_processes_"):
            name, value = line.rsplit(" ", 1)
            values[name] = values.get(name, 0) + float(value)
    exited = sum(v for k, v in values.items() if k.startswith("vsock_async_processes_exited"))
    started = values["vsock_async_processes_started_total"]
    return int(started), int(values["vsock_async_processes_running"]), int(exited)


@pytest.mark.asyncio
async def test_clients_that_close_while_output_floods_leave_no_process_counted(
    daemon: Daemon,
) -> None:
    # The process floods; the client reads none of it, then closes: the daemon is writing
    # when the close comes, and the connection drops while it stops the process.
    for _ in range(6):
        async with websocket(daemon) as ws:
            pid = await start(ws, {"command": ["cat", "/dev/zero"], "timeout": None})
            await asyncio.sleep(0.2)
        await gone(pid)
    eventually(lambda: _process_counts(daemon)[1] == 0, "no exec process counted as running")
    started, _, exited = _process_counts(daemon)
    assert exited == started


# -- raw WebSocket clients: abrupt, never reading -----------------------------------------------


class RawWebSocket:
    """A WebSocket client over a bare socket, for what a library would not do."""

    def __init__(self, daemon: Daemon, *, receive_buffer: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(LONG)
        self.sock.connect(daemon.control_socket)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                "GET /v1/guests/vm1/exec HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101 "), head

    def send(self, payload: bytes, opcode: int = 0x1) -> None:
        """One final frame, masked with a zero key (so the payload goes as it is)."""
        n = len(payload)
        if n < 126:
            header = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
        self.sock.sendall(header + b"\0\0\0\0" + payload)

    def abort(self) -> None:
        """Reset the connection: no close frame, no FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def progress_script(path: Path, total: int) -> list[str]:
    """argv of a process writing ``total`` bytes to stdout, counting them into ``path``."""
    code = (
        "import os\n"
        "written, chunk = 0, b'x' * 65536\n"
        f"while written < {total}:\n"
        "    written += os.write(1, chunk)\n"
        f"    open({str(path)!r} + '.tmp', 'w').write(f'{{os.getpid()}} {{written}}')\n"
        f"    os.replace({str(path)!r} + '.tmp', {str(path)!r})\n"
    )
    return [sys.executable, "-c", code]


def test_an_abruptly_reset_client_stops_its_process(daemon: Daemon) -> None:
    pid_file = daemon.directory / "abrupt-pid"
    client = RawWebSocket(daemon)
    client.send(
        json.dumps(
            {"command": f"echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; sleep 30"}
        ).encode()
    )
    eventually(pid_file.exists, "the process started")
    pid = int(pid_file.read_text())
    assert live_members(pid)
    client.abort()
    eventually(lambda: not live_members(pid), "the process group stopped")


def test_a_client_that_never_reads_holds_back_the_process_in_bounded_memory(
    daemon: Daemon,
) -> None:
    progress = daemon.directory / "never-reads-progress"
    total = 256 << 20
    client = RawWebSocket(daemon, receive_buffer=4096)
    client.send(json.dumps({"command": progress_script(progress, total)}).encode())
    eventually(progress.exists, "the process writing")
    # The writer stops making progress: it blocks on its pipe, as nobody takes its output.
    last, unchanged = b"", 0
    while unchanged < 25:
        now = progress.read_bytes()
        unchanged = unchanged + 1 if now == last else 0
        last = now
        time.sleep(0.02)
    pid, written = (int(n) for n in last.split())
    assert written < 16 << 20  # credit, pipes and socket buffers: not the 256 MiB it has
    assert _rss(daemon.proc.pid) < 200 << 20
    assert live_members(pid)
    client.abort()
    eventually(lambda: not live_members(pid), "the writer stopped")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- plain HTTP ------------------------------------------------------------------------------


async def read_frame(response: aiohttp.ClientResponse) -> tuple[int, bytes]:
    header = await response.content.readexactly(FRAME_HEADER.size)
    channel, length = FRAME_HEADER.unpack(header)
    return channel, await response.content.readexactly(length)


@pytest.mark.asyncio
async def test_the_http_stream_carries_output_as_it_comes(daemon: Daemon) -> None:
    wait, marker = gate(daemon, "http-gate")
    command = f"echo out; echo err >&2; {wait}; echo late; exit 4"
    async with (
        _session(daemon) as session,
        session.post("http://localhost/v1/guests/vm1/exec", json={"command": command}) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/vnd.vsock-async.exec-stream"
        channel, started = await read_frame(response)
        assert channel == 3 and json.loads(started)["type"] == "started"
        pid = json.loads(started)["pid"]
        early = {await read_frame(response), await read_frame(response)}
        assert early == {(1, b"out\n"), (2, b"err\n")}
        assert not marker.exists()
        marker.touch()
        assert await read_frame(response) == (1, b"late\n")
        channel, last = await read_frame(response)
        assert channel == 3
        assert json.loads(last)["exit_code"] == 4
        assert await response.content.read() == b""
    await gone(pid)


@pytest.mark.asyncio
async def test_the_http_stream_merges_stderr_into_stdout_when_asked(daemon: Daemon) -> None:
    body = {"command": "echo a; echo b >&2; echo c; exit 7", "stderr": "stdout"}
    async with (
        _session(daemon) as session,
        session.post("http://localhost/v1/guests/vm1/exec", json=body) as response,
    ):
        assert response.status == 200
        frames = []
        while chunk := await response.content.read(FRAME_HEADER.size):
            channel, length = FRAME_HEADER.unpack(chunk)
            frames.append((channel, await response.content.readexactly(length)))
    output = b"".join(data for channel, data in frames if channel != 3)
    assert {channel for channel, _ in frames} == {1, 3}
    assert output == b"a\nb\nc\n"
    assert json.loads(frames[-1][1])["exit_code"] == 7


@pytest.mark.asyncio
async def test_an_http_client_that_leaves_stops_its_process(daemon: Daemon) -> None:
    async with (
        _session(daemon) as session,
        session.post(
            "http://localhost/v1/guests/vm1/exec", json={"command": "sleep 30"}
        ) as response,
    ):
        _, started = await read_frame(response)
        pid = json.loads(started)["pid"]
        assert live_members(pid)
    await gone(pid)


def test_an_http_client_that_leaves_mid_output_is_no_daemon_error(stack: Stack) -> None:
    daemon = stack.daemon("--probe-interval", "none")
    stack.agent(daemon.guest_address)
    wait_for_guest(daemon.client(), "vm1")
    body = json.dumps({"command": ["cat", "/dev/zero"], "timeout": None}).encode()
    for _ in range(5):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(daemon.control_socket)
            sock.sendall(
                b"POST /v1/guests/vm1/exec HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            for _ in range(20):  # the output flowing: the daemon writing when we close
                assert sock.recv(65536)
    eventually(lambda: daemon.log().count("the client went away") == 5, "five hang-ups logged")
    assert "ERROR" not in daemon.log()
    assert "Traceback" not in daemon.log()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"command": "cat", "stdin": True}, "stdin and tty need the WebSocket"),
        ({"command": "tty", "tty": {"rows": 5, "cols": 5}}, "stdin and tty need the WebSocket"),
        ({"command": ""}, "command must be"),
        ({"argv": ["ls"]}, "unknown field(s) argv"),
    ],
)
async def test_the_http_stream_refuses_what_it_cannot_do(
    daemon: Daemon, body: dict[str, Any], says: str
) -> None:
    async with (
        _session(daemon) as session,
        session.post("http://localhost/v1/guests/vm1/exec", json=body) as response,
    ):
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["code"] == "bad_request"
    assert says in error["message"]


@pytest.mark.asyncio
async def test_get_without_an_upgrade_and_an_unknown_guest(daemon: Daemon) -> None:
    async with _session(daemon) as session:
        async with session.get("http://localhost/v1/guests/vm1/exec") as response:
            assert response.status == 400
            assert "must upgrade to a WebSocket" in (await response.json())["error"]["message"]
        async with session.post("http://localhost/v1/guests/vm9/exec", json={}) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "guest_not_found"
    async with websocket(daemon, guest="vm9") as ws:
        outcome = await collect(ws)
    assert outcome.last["error"]["code"] == "guest_not_found"
    assert outcome.close_code == 1008


# -- a v1 guest, metrics, the drain ------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_v1_guest_answers_unsupported_and_run_still_works(stack: Stack) -> None:
    daemon = stack.daemon("--probe-interval", "none", "--protocol", "v1")
    stack.agent(daemon.guest_address)
    client = daemon.client()
    wait_for_guest(client, "vm1")
    async with (
        _session(daemon) as session,
        session.post("http://localhost/v1/guests/vm1/exec", json={"command": "true"}) as response,
    ):
        assert response.status == 409
        error = (await response.json())["error"]
    assert error["code"] == "unsupported"
    assert "speaks only protocol v1" in error["message"]
    async with websocket(daemon) as ws:
        outcome = await collect(ws)
    assert outcome.last["error"] == error
    assert outcome.close_code == 1008
    async with websocket(daemon) as ws:  # a request too big is read to its end all the same
        outcome = await too_big(ws, "x" * 40 * MAX_MESSAGE)
    assert outcome.controls[0]["error"] == error
    assert outcome.close_code == 1008
    assert client.run("vm1", "echo still").stdout == b"still\n"


@pytest.mark.asyncio
async def test_metrics_count_processes_and_bytes(stack: Stack) -> None:
    daemon = stack.daemon("--probe-interval", "none")
    stack.agent(daemon.guest_address)
    client = daemon.client()
    wait_for_guest(client, "vm1")
    async with websocket(daemon) as ws:
        await start(ws, {"command": ["cat"], "stdin": True})
        await ws.send_bytes(b"\x00" + b"12345")
        await read_until(ws, b"12345")
        assert "vsock_async_processes_running 1" in client.metrics().splitlines()
        await ws.send_str('{"type": "eof"}')
        await collect(ws)
    for request in ({"command": "echo e >&2; exit 1"}, {"command": "kill -TERM $$"}):
        async with websocket(daemon) as ws:
            await start(ws, request)
            await collect(ws)
    async with websocket(daemon) as ws:
        await start(ws, {"command": ["sleep", "30"], "timeout": STARTS_WITHIN})
        await collect(ws)
    lines = client.metrics().splitlines()
    for expected in [
        "vsock_async_processes_started_total 4",
        "vsock_async_processes_running 0",
        'vsock_async_processes_exited_total{how="code"} 2',
        'vsock_async_processes_exited_total{how="signal"} 1',
        'vsock_async_processes_exited_total{how="timed_out"} 1',
        'vsock_async_processes_exited_total{how="lost"} 0',
        'vsock_async_processes_exited_total{how="shutdown"} 0',
        'vsock_async_exec_bytes_total{stream="stdin"} 5',
        'vsock_async_exec_bytes_total{stream="stdout"} 5',
        'vsock_async_exec_bytes_total{stream="stderr"} 2',
    ]:
        assert expected in lines


async def drain_during_exec(stack: Stack, grace: str, script: str) -> tuple[Daemon, int, Outcome]:
    """Start ``script`` by exec, SIGTERM serve once it printed ``ready``; serve stopped, the
    process group and what the client got."""
    daemon = stack.daemon("--probe-interval", "none", "--grace", grace)
    stack.agent(daemon.guest_address)
    wait_for_guest(daemon.client(), "vm1")
    async with websocket(daemon) as ws:
        pid = await start(ws, {"command": ["sh", "-c", f"{script}; echo ready; {LOOP}"]})
        await read_until(ws, b"ready\n")
        daemon.send(signal.SIGTERM)
        outcome = await collect(ws)
    assert daemon.proc.wait(LONG) == 0, daemon.log()
    return daemon, pid, outcome


LOOP = "while :; do sleep 0.01; done"


@pytest.mark.asyncio
async def test_the_drain_sends_sigterm_to_exec_processes(stack: Stack) -> None:
    daemon, pid, outcome = await drain_during_exec(
        stack, str(LONG), "trap 'echo got TERM; exit 7' TERM"
    )
    assert b"got TERM\n" in outcome.stdout
    assert outcome.last["exit_code"] == 7
    assert "sent SIGTERM to 1 exec process(es)" in daemon.log()
    await gone(pid)


@pytest.mark.asyncio
async def test_the_drain_kills_exec_processes_left_at_the_end_of_the_grace(
    stack: Stack,
) -> None:
    """Both forms of exec still running when the grace ends: each stream ends in 503
    ``shutting_down`` saying the daemon ended it, the WebSocket closing with 1001 (going away,
    not 1011: no error of the daemon's), and the log says so; no guest is blamed, and each
    process is counted ``how="shutdown"``, not ``lost``. (The daemon exits once it counted
    them, its control API closed: its log, written with the value counted, tells it.)"""
    daemon = stack.daemon("--probe-interval", "none", "--grace", "0.05")
    stack.agent(daemon.guest_address)
    wait_for_guest(daemon.client(), "vm1")
    command = ["sh", "-c", f"trap '' TERM; echo ready; {LOOP}"]
    async with (
        websocket(daemon) as ws,
        _session(daemon) as session,
        session.post("http://localhost/v1/guests/vm1/exec", json={"command": command}) as http,
    ):
        pid = await start(ws, {"command": command})
        await read_until(ws, b"ready\n")
        _, started = await read_frame(http)
        assert await read_frame(http) == (1, b"ready\n")
        daemon.send(signal.SIGTERM)
        outcome = await collect(ws)
        channel, last = await read_frame(http)
        assert await http.content.read() == b""
    assert daemon.proc.wait(LONG) == 0, daemon.log()
    assert channel == 3
    for error in (outcome.last, json.loads(last)):
        assert (error["type"], error["status"]) == ("error", 503), error
        assert error["error"]["code"] == "shutting_down"
        assert "the daemon ended the exec of 'sh -c " in error["error"]["message"]
        assert "at the end of the shutdown drain (--grace 0.05 s)" in error["error"]["message"]
    assert (outcome.close_code, outcome.close_reason) == (1001, "shutting_down")
    log = daemon.log()
    assert "sent SIGTERM to 2 exec process(es)" in log
    assert "sent SIGKILL to 2 exec process(es) still running" in log
    assert log.count("was still running at the end of the shutdown drain") == 2
    assert "guest_failed" not in log and "went away" not in log
    http_pid = json.loads(started)["pid"]
    for ended in (pid, http_pid):
        assert f"in guest 'vm1' (pid {ended}): shutdown\n" in log
    assert "): lost\n" not in log
    await gone(pid)
    await gone(http_pid)


@pytest.mark.asyncio
async def test_during_the_drain_execs_are_told_the_daemon_is_going_away(stack: Stack) -> None:
    """A request sent on a WebSocket opened before the drain, and a process the drain ends on
    a second signal: each stream ends in ``shutting_down`` and closes with 1001."""
    daemon = stack.daemon("--probe-interval", "none", "--grace", str(LONG))
    stack.agent(daemon.guest_address)
    wait_for_guest(daemon.client(), "vm1")
    async with websocket(daemon) as running, websocket(daemon) as late:
        pid = await start(running, {"command": ["sh", "-c", f"trap '' TERM; echo ready; {LOOP}"]})
        await read_until(running, b"ready\n")
        daemon.send(signal.SIGTERM)
        eventually(lambda: "waiting for 1 running command" in daemon.log(), "the drain begun")
        await late.send_str(json.dumps({"command": "true"}))
        refused = await collect(late)
        daemon.send(signal.SIGTERM)
        ended = await collect(running)
    assert daemon.proc.wait(LONG) == 0, daemon.log()
    assert refused.last["error"] == {
        "code": "shutting_down",
        "message": "the daemon is shutting down",
    }
    assert "on a second signal" in ended.last["error"]["message"]
    for outcome in (refused, ended):
        assert (outcome.last["status"], outcome.last["error"]["code"]) == (503, "shutting_down")
        assert (outcome.close_code, outcome.close_reason) == (1001, "shutting_down")
    assert f"in guest 'vm1' (pid {pid}): shutdown\n" in daemon.log()
    await gone(pid)


def test_an_exec_whose_request_never_came_does_not_hold_the_drain(stack: Stack) -> None:
    daemon = stack.daemon("--probe-interval", "none", "--grace", str(LONG))
    stack.agent(daemon.guest_address)
    wait_for_guest(daemon.client(), "vm1")
    client = RawWebSocket(daemon)  # upgraded, and nothing sent: no process to wait for
    daemon.send(signal.SIGTERM)
    assert daemon.proc.wait(LONG) == 0
    assert "waiting for" not in daemon.log()
    client.abort()

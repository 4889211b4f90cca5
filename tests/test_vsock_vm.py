"""Real AF_VSOCK, run inside the tier's QEMU guest (see docs/testing.md), never on the host.

The guest has no vsock device: vsock_loopback is its only transport, so connections to CID 1
(local) and CID 2 (host) both stay inside it, and the kernel reports every peer as CID 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

import vsock_async
from vsock_async import (
    AcceptTimeout,
    CommandResult,
    CommandTimeout,
    ConnectFailed,
    ConnectionClosed,
    ConnectTimeout,
    GuestChannel,
)

from .agent_process import agent_process, eventually
from .vm.plugin import in_vm

pytestmark = pytest.mark.vm

VMADDR_CID_LOCAL = 1
VMADDR_CID_HOST = 2
# Below 1024, where the kernel never auto-binds: a client could otherwise be given this very
# port and connect to itself (EPROTO).
UNUSED_PORT = 1000


@pytest.fixture(autouse=True)
def _guest_only() -> None:
    """Belt and braces: the plugin never runs these on a host, and they refuse to if it did."""
    if not in_vm() or os.environ.get("VSOCK_ASYNC_FORBID_VSOCK_CONNECT") == "1":
        pytest.skip("AF_VSOCK connect is allowed only inside the VM tier's guest")


def vsock_socket() -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.settimeout(5)
    return sock


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening socket on any CID and a kernel-chosen port."""
    with vsock_socket() as sock:
        sock.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
        sock.listen()
        yield sock


@pytest.mark.parametrize("cid", [VMADDR_CID_HOST, VMADDR_CID_LOCAL], ids=["host", "local"])
def test_connect_reaches_listener_and_peer_is_local_cid(listener: socket.socket, cid: int) -> None:
    port = listener.getsockname()[1]
    with vsock_socket() as client:
        client.connect((cid, port))
        accepted, peer = listener.accept()
        with accepted:
            client.sendall(b"ping")
            assert accepted.recv(4) == b"ping"
            accepted.sendall(b"pong")
            assert client.recv(4) == b"pong"
            assert accepted.getpeername() == peer
            assert peer[1] == client.getsockname()[1]
    assert peer[0] == VMADDR_CID_LOCAL


def test_bind_host_cid_works_with_vhost_vsock_loaded() -> None:
    with vsock_socket() as sock:
        sock.bind((VMADDR_CID_HOST, socket.VMADDR_PORT_ANY))
        assert sock.getsockname()[0] == VMADDR_CID_HOST


def test_connect_where_nothing_listens_is_reset() -> None:
    with vsock_socket() as client, pytest.raises(ConnectionResetError) as caught:
        client.connect((VMADDR_CID_HOST, UNUSED_PORT))
    assert caught.value.errno == errno.ECONNRESET


def test_connect_to_cid_without_transport_is_enodev() -> None:
    with vsock_socket() as client, pytest.raises(OSError) as caught:
        client.connect((3, UNUSED_PORT))
    assert caught.value.errno == errno.ENODEV


# -- the library and the agent over the real kernel path ----------------------------------

# Deadlines for things that only miss them when broken: the guest is emulated and slow.
LONG = 30.0
SHORT = 0.2
# The shared agent dials port 1024 as a real guest's agent does; every other test has a port
# of its own, so the shared agent never reaches a server meant for another peer.
SHARED_PORT = 1024
HOST_DIALS_PORT = 1025
KILLED_AGENT_PORT = 1026
REFUSED_AGENT_PORT = 1027
SILENT_PEER_PORT = 1028
NO_PEER_PORT = 1029

in_module_loop = pytest.mark.asyncio(loop_scope="module")


def any_cid(port: int) -> str:
    return f"vsock://any:{port}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_agent(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """One agent process for the tests that only need an agent to dial in: each test's server
    on port 1024 gets a fresh connection, as the agent dials again whenever one closes.
    Starting an agent takes seconds under emulation."""
    tmp_path = tmp_path_factory.mktemp("shared-agent")
    dials = f"vsock://host:{SHARED_PORT}"
    async with agent_process("--connect", dials, tmp_path=tmp_path) as agent:
        yield agent


async def connect_when_listening(address: str) -> GuestChannel:
    """connect() once the agent process has its listener up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LONG
    while True:
        try:
            return await vsock_async.connect(address, timeout=LONG)
        except ConnectFailed:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


@in_module_loop
@pytest.mark.usefixtures("shared_agent")
async def test_agent_dials_in_probe_commands_and_kernel_peer() -> None:
    async with await vsock_async.listen(any_cid(SHARED_PORT)) as server:
        guest = await server.accept(timeout=LONG)
        await guest.probe(timeout=LONG)
        result = await guest.run("echo out; echo err >&2; exit 3", timeout=LONG)
        uname = await guest.run(["uname", "-s"], timeout=LONG, check=True)
        assert server.guest(VMADDR_CID_LOCAL).channels == [guest]
    assert result == CommandResult(b"out\n", b"err\n", 3, timed_out=False)
    assert uname.stdout == b"Linux\n"
    assert guest.peer[0] == VMADDR_CID_LOCAL
    assert guest.key == VMADDR_CID_LOCAL
    assert guest.peer[1] > 1023  # an auto-bound port: the kernel never picks a reserved one


@in_module_loop
@pytest.mark.usefixtures("shared_agent")
async def test_large_output_arrives_whole_and_in_order(tmp_path: Path) -> None:
    # Far beyond the kernel's vsock buffers, so flow control works on both sides. Each 4 KiB
    # block starts with its index, so a lost, repeated or reordered block shows; the output
    # comes from a file because generating it with shell tools is very slow under emulation.
    async with await vsock_async.listen(any_cid(SHARED_PORT)) as server:
        filler = random.Random(6).randbytes(4096 - 8)
        expected = b"".join(index.to_bytes(8, "big") + filler for index in range(4096))
        source = tmp_path / "output"
        source.write_bytes(expected)
        guest = await server.accept(timeout=LONG)
        result = await guest.run(["cat", str(source)], timeout=LONG)
    assert result.exit_code == 0
    assert result.stderr == b""
    assert len(result.stdout) == len(expected) == 16 * 1024 * 1024
    assert result.stdout == expected


@in_module_loop
@pytest.mark.usefixtures("shared_agent")
async def test_v1_command_timeout_closes_the_channel_and_the_agent_dials_again() -> None:
    async with await vsock_async.listen(any_cid(SHARED_PORT), protocol="v1") as server:
        first = await server.accept(timeout=LONG)
        with pytest.raises(CommandTimeout) as caught:
            await first.run("sleep 60", timeout=1.0)
        assert caught.value.result == CommandResult(b"", b"", None, timed_out=True)
        assert first.closed
        second = await server.accept(timeout=LONG)
        await second.probe(timeout=LONG)
    assert second.id != first.id
    assert second.key == first.key == VMADDR_CID_LOCAL


@in_module_loop
@pytest.mark.usefixtures("shared_agent")
async def test_allowlist_admits_cid_1() -> None:
    listening = vsock_async.listen(any_cid(SHARED_PORT), allowed_cids={VMADDR_CID_LOCAL})
    async with listening as server:
        guest = await server.accept(timeout=LONG)
        await guest.probe(timeout=LONG)
    assert guest.peer[0] == VMADDR_CID_LOCAL


@pytest.mark.asyncio
async def test_allowlist_refuses_other_cids(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dials = f"vsock://host:{REFUSED_AGENT_PORT}"
    async with await vsock_async.listen(any_cid(REFUSED_AGENT_PORT), allowed_cids={3}) as server:
        async with agent_process("--connect", dials, tmp_path=tmp_path):
            await eventually(
                lambda: "refused a connection from CID 1" in caplog.text,
                "the server refused the agent's connection",
            )
        with pytest.raises(AcceptTimeout):
            await server.accept(timeout=SHORT)
        assert server.channels == []
        assert server.guests == []


@pytest.mark.asyncio
async def test_guest_closing_mid_exchange_is_connection_closed(tmp_path: Path) -> None:
    started = tmp_path / "started"
    dials = f"vsock://host:{KILLED_AGENT_PORT}"
    async with (
        await vsock_async.listen(any_cid(KILLED_AGENT_PORT)) as server,
        agent_process("--connect", dials, tmp_path=tmp_path) as agent,
    ):
        guest = await server.accept(timeout=LONG)
        call = asyncio.create_task(guest.run(f"touch {started}; sleep 60", timeout=LONG))
        await eventually(started.exists, "the agent started the command")
        agent.kill()
        with pytest.raises(ConnectionClosed):
            await call
        assert guest.closed


@pytest.mark.asyncio
async def test_host_dials_an_agent_that_listens(tmp_path: Path) -> None:
    async with (
        agent_process("--listen", any_cid(HOST_DIALS_PORT), tmp_path=tmp_path),
        await connect_when_listening(f"vsock://local:{HOST_DIALS_PORT}") as guest,
    ):
        await guest.probe(timeout=LONG)
        result = await guest.run("echo dialled", timeout=LONG)
    assert result == CommandResult(b"dialled\n", b"", 0)
    assert guest.peer == (VMADDR_CID_LOCAL, HOST_DIALS_PORT)


@pytest.mark.asyncio
async def test_silent_peer_times_out_and_its_channel_closes() -> None:
    loop = asyncio.get_running_loop()
    async with await vsock_async.listen(any_cid(SILENT_PEER_PORT), protocol="v1") as server:
        with vsock_socket() as silent:
            silent.setblocking(False)
            await loop.sock_connect(silent, (VMADDR_CID_HOST, SILENT_PEER_PORT))
            guest = await server.accept(timeout=LONG)
            assert guest.protocol == "v1"
            with pytest.raises(CommandTimeout) as caught:
                await guest.probe(timeout=SHORT)
            assert caught.value.result == CommandResult(b"", b"", None, timed_out=True)
            assert guest.closed
            with pytest.raises(ConnectionClosed):
                await guest.run("true", timeout=LONG)


@pytest.mark.asyncio
async def test_accept_times_out_on_a_real_listener() -> None:
    async with await vsock_async.listen(any_cid(NO_PEER_PORT)) as server:
        with pytest.raises(AcceptTimeout) as caught:
            await server.accept(timeout=SHORT)
    assert isinstance(caught.value, TimeoutError)


@pytest.mark.asyncio
async def test_connect_where_nothing_listens_is_a_clear_connect_failed() -> None:
    with pytest.raises(ConnectFailed, match="nothing listens") as caught:
        await vsock_async.connect(f"vsock://host:{UNUSED_PORT}", timeout=LONG)
    assert not isinstance(caught.value, ConnectTimeout)
    with pytest.raises(ConnectFailed, match="no such CID"):
        await vsock_async.connect(f"vsock://3:{UNUSED_PORT}", timeout=LONG)


@pytest.mark.asyncio
async def test_a_peer_silent_at_the_hello_is_dropped() -> None:
    loop = asyncio.get_running_loop()
    listening = vsock_async.listen(any_cid(SILENT_PEER_PORT), negotiate_timeout=SHORT)
    async with listening as server:
        with vsock_socket() as silent:
            silent.setblocking(False)
            await loop.sock_connect(silent, (VMADDR_CID_HOST, SILENT_PEER_PORT))
            hello = await loop.sock_recv(silent, 4096)
            assert b"vsock_async.hello" in hello
            with contextlib.suppress(ConnectionResetError):  # closed after negotiate_timeout
                assert await loop.sock_recv(silent, 4096) == b""
            with pytest.raises(AcceptTimeout):
                await server.accept(timeout=SHORT)
            assert server.channels == []


# -- protocol v2 over the real kernel path -------------------------------------------------


@in_module_loop
@pytest.mark.usefixtures("shared_agent")
async def test_v2_processes_stream_take_stdin_and_signals() -> None:
    async with await vsock_async.listen(any_cid(SHARED_PORT), protocol="v2") as server:
        guest = await server.accept(timeout=LONG)
        assert guest.protocol == "v2"
        proc = await guest.create_process(
            ["sh", "-c", "echo ready; read line; echo got $line; exec sleep 60"],
            stdin=vsock_async.PIPE,
        )
        assert proc.stdout is not None and proc.stdin is not None
        assert await proc.stdout.readline() == b"ready\n"
        assert proc.returncode is None
        proc.stdin.write(b"it\n")
        await proc.stdin.drain()
        assert await proc.stdout.readline() == b"got it\n"
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == -signal.SIGTERM and proc.exit_signal == signal.SIGTERM
        gz = await guest.create_process(["gzip", "-c"], stdin=vsock_async.PIPE)
        data = random.Random(7).randbytes(3 << 20)
        compressed, _ = await gz.communicate(data)
        back = await guest.create_process(["gzip", "-dc"], stdin=vsock_async.PIPE)
        assert (await back.communicate(compressed))[0] == data


TERMINAL_SIZE = (
    "import fcntl, os, struct, sys, termios\n"
    "def size():\n"
    "    rows, cols = struct.unpack('HHHH', fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(8)))[:2]\n"
    "    print(rows, cols, flush=True)\n"
    "print(os.ttyname(0), flush=True)\n"
    "size(); sys.stdin.readline(); size()\n"
)


@in_module_loop
@pytest.mark.usefixtures("shared_agent")
async def test_v2_terminal_and_resize() -> None:
    async with await vsock_async.listen(any_cid(SHARED_PORT)) as server:
        guest = await server.accept(timeout=LONG)
        proc = await guest.create_process(
            [sys.executable, "-c", TERMINAL_SIZE], pty=(24, 80), stdin=vsock_async.PIPE
        )
        assert proc.stdout is not None and proc.stdin is not None
        assert (await proc.stdout.readline()).startswith(b"/dev/pts/")
        assert await proc.stdout.readline() == b"24 80\r\n"
        await proc.resize(30, 100)
        proc.stdin.write(b"\n")
        rest = await proc.stdout.read()
        assert rest.endswith(b"30 100\r\n"), rest
        assert await proc.wait() == 0


@in_module_loop
@pytest.mark.usefixtures("shared_agent")
async def test_v2_runs_proceed_at_once_and_a_deadline_stops_only_its_process(
    tmp_path: Path,
) -> None:
    count = 8
    gate = tmp_path / "gate"
    gate.mkdir()
    script = (
        f"touch {gate}/$0; while [ $(ls {gate} | wc -l) -lt {count} ]; do sleep 0.05; done; echo $0"
    )
    async with await vsock_async.listen(any_cid(SHARED_PORT)) as server:
        guest = await server.accept(timeout=LONG)
        results = await asyncio.gather(
            *(guest.run(["sh", "-c", script, str(i)], timeout=LONG) for i in range(count))
        )
        assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(count)]
        with pytest.raises(CommandTimeout) as caught:
            await guest.run("echo before; exec sleep 60", timeout=1.0)
        assert caught.value.sent and caught.value.result.stdout == b"before\n"
        assert not guest.closed
        assert (await guest.run("echo after", timeout=LONG)).stdout == b"after\n"
        assert server.channels == [guest]


@in_module_loop
@pytest.mark.usefixtures("shared_agent")
async def test_v2_large_output_streams_in_order(tmp_path: Path) -> None:
    filler = random.Random(8).randbytes(4096 - 8)
    expected = b"".join(index.to_bytes(8, "big") + filler for index in range(4096))
    source = tmp_path / "output"
    source.write_bytes(expected)
    async with await vsock_async.listen(any_cid(SHARED_PORT)) as server:
        guest = await server.accept(timeout=LONG)
        proc = await guest.create_process(["cat", str(source)])
        assert proc.stdout is not None
        buffer = bytearray(64 * 1024)
        received = bytearray()
        while n := await proc.stdout.readinto(buffer):
            received += buffer[:n]
        assert await proc.wait() == 0
    assert received == expected


# -- files over v2 through the kernel's vsock path ------------------------------------------


@in_module_loop
@pytest.mark.usefixtures("shared_agent")
async def test_files_round_trip_byte_exact_and_errors_typed(tmp_path: Path) -> None:
    sizes = {"empty": 0, "small": 100, "one-chunk": 64 * 1024, "many-chunks": 3 * 1024 * 1024 + 7}
    rng = random.Random(9)
    async with await vsock_async.listen(any_cid(SHARED_PORT)) as server:
        guest = await server.accept(timeout=LONG)
        assert guest.protocol == "v2"
        for name, size in sizes.items():
            data = rng.randbytes(size)
            target = tmp_path / "in" / name
            await guest.put_file(data, str(target), mode=0o640)
            assert target.read_bytes() == data
            back = tmp_path / "out" / name
            back.parent.mkdir(exist_ok=True)
            await guest.get_file(str(target), back)
            assert back.read_bytes() == data
            assert (await guest.stat(str(target))).size == size
        with pytest.raises(vsock_async.GuestFileError) as missing:
            await guest.get_file(str(tmp_path / "nope"), tmp_path / "out" / "nope")
        assert missing.value.errno_name == "ENOENT"
        assert not (tmp_path / "out" / "nope").exists()
        tree = tmp_path / "tree"
        (tree / "sub dir").mkdir(parents=True)
        (tree / "sub dir" / "f").write_bytes(b"leaf")
        (tree / "link").symlink_to("sub dir/f")
        await guest.put_tree(tree, str(tmp_path / "tree-in"))
        assert (tmp_path / "tree-in" / "sub dir" / "f").read_bytes() == b"leaf"
        assert os.readlink(tmp_path / "tree-in" / "link") == "sub dir/f"

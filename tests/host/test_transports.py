"""Transports: the hybrid-vsock handshake (pure, then against a Firecracker muxer double),
connect() for every address kind that runs here, hybrid-vsock listeners, socket files, and
the real agent in both directions."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

import vsock_async
from tests.agent_process import agent_process
from tests.fc_muxer import (
    DialingGuest,
    FirecrackerMuxer,
    GuestScript,
    ListeningGuest,
    serve_connection,
)
from vsock_async import (
    ConnectFailed,
    ConnectionClosed,
    ConnectTimeout,
    GuestEvent,
    HybridVsockAddress,
    ListenFailed,
    ProtocolError,
    UnixAddress,
    UnixSocketOptions,
    UsageError,
)
from vsock_async._sockets import bind_listener
from vsock_async.host.hybrid import connect_hybrid
from vsock_async.protocol.hybrid import MAX_REPLY, OkReplyParser, encode_connect

# -- the handshake codec, no I/O ------------------------------------------------------------


def test_encode_connect() -> None:
    assert encode_connect(52) == b"CONNECT 52\n"
    assert encode_connect(0xFFFF_FFFF) == b"CONNECT 4294967295\n"
    for bad in (-1, 1 << 32, True, "52"):
        with pytest.raises(UsageError):
            encode_connect(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reply", "port"), [(b"OK 1073741824\n", 1073741824), (b"ok 7\n", 7), (b"Ok 0\n", 0)]
)
def test_reply_parses_whole_and_byte_by_byte(reply: bytes, port: int) -> None:
    whole = OkReplyParser()
    whole.receive_data(reply)
    assert (whole.done, whole.host_port, whole.leftover) == (True, port, b"")
    bytewise = OkReplyParser()
    for i in range(len(reply)):
        assert not bytewise.done
        bytewise.receive_data(reply[i : i + 1])
    assert bytewise.host_port == port


@given(port=st.integers(0, 0xFFFF_FFFF), tail=st.binary(max_size=40), data=st.data())
def test_reading_bytes_wanted_never_passes_the_newline(
    port: int, tail: bytes, data: st.DataObject
) -> None:
    stream = b"OK %d\n" % port + tail
    parser = OkReplyParser()
    offset = 0
    while not parser.done:
        wanted = parser.bytes_wanted
        assert wanted > 0
        n = data.draw(st.integers(1, wanted))
        parser.receive_data(stream[offset : offset + n])
        offset += n
    assert parser.host_port == port
    assert parser.bytes_wanted == 0
    assert stream[offset:] == tail, "not one byte of the guest's stream was consumed"


@given(port=st.integers(0, 0xFFFF_FFFF), tail=st.binary(max_size=40), cut=st.integers(0, 60))
def test_surplus_bytes_come_back_as_leftover(port: int, tail: bytes, cut: int) -> None:
    stream = b"OK %d\n" % port + tail
    parser = OkReplyParser()
    parser.receive_data(stream[:cut])
    parser.receive_data(stream[cut:])
    assert (parser.host_port, parser.leftover) == (port, tail)


@pytest.mark.parametrize(
    "reply",
    [
        b"NO 1\n",
        b"OK\n",
        b"OK \n",
        b"OK x\n",
        b"OK -1\n",
        b"OK 4294967296\n",
        b"OK 000000000001\n",
        b"OKAY 1\n",
        b"HTTP/1.1 400 Bad Request\r\n",
    ],
)
def test_a_reply_that_is_not_ok_port_is_a_protocol_error(reply: bytes) -> None:
    parser = OkReplyParser()
    with pytest.raises(ProtocolError, match="instead of 'OK <port>"):
        for i in range(len(reply)):
            parser.receive_data(reply[i : i + 1])
    assert not parser.done


def test_an_endless_reply_is_refused_at_its_bound() -> None:
    parser = OkReplyParser()
    with pytest.raises(ProtocolError):
        parser.receive_data(b"OK " + b"1" * (MAX_REPLY + 100))


def test_eof_before_any_byte_is_a_refusal_and_mid_reply_a_protocol_error() -> None:
    refused = OkReplyParser()
    refused.receive_eof()
    assert refused.closed and not refused.done
    cut = OkReplyParser()
    cut.receive_data(b"OK 12")
    with pytest.raises(ProtocolError, match="middle of its reply"):
        cut.receive_eof()
    assert not cut.closed


# -- host-initiated hybrid vsock against the muxer double ---------------------------------


@pytest_asyncio.fixture
async def muxer(tmp_path: Path) -> AsyncIterator[FirecrackerMuxer]:
    guest_dir = tmp_path / "guest"
    guest_dir.mkdir()
    mux = FirecrackerMuxer(str(tmp_path / "v.sock"), str(guest_dir))
    await mux.start()
    yield mux
    await mux.aclose()


@pytest_asyncio.fixture
async def guest52(muxer: FirecrackerMuxer) -> AsyncIterator[ListeningGuest]:
    guest = ListeningGuest(muxer.guest_port_path(52), GuestScript("vm"))
    await guest.start()
    yield guest
    await guest.aclose()


@pytest.mark.asyncio
async def test_connect_hvsock_runs_commands_through_the_muxer(
    muxer: FirecrackerMuxer, guest52: ListeningGuest
) -> None:
    async with vsock_async.connect(f"hvsock:{muxer.uds_path}:52", timeout=2) as channel:
        await channel.probe(timeout=2)
        result = await channel.run("uname", timeout=2)
        assert (result.stdout, result.exit_code) == (b"vm:uname", 0)
        assert channel.key == f"hvsock:{muxer.uds_path}:52"
    assert muxer.handshakes == [b"CONNECT 52\n"]
    assert guest52.script.commands == [b":", b"uname"]


@pytest.mark.asyncio
async def test_the_muxer_double_takes_connect_in_any_case(
    muxer: FirecrackerMuxer, guest52: ListeningGuest
) -> None:
    reader, writer = await asyncio.open_unix_connection(muxer.uds_path)
    writer.write(b"connect 52\n")
    assert (await reader.readline()).startswith(b"OK ")
    writer.close()


@pytest.mark.asyncio
async def test_the_handshake_reads_exactly_through_the_newline(tmp_path: Path) -> None:
    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"OK 1073741824\nguest stream starts here")
        await writer.drain()
        await reader.read()

    server = await asyncio.start_unix_server(vmm, str(tmp_path / "v.sock"))
    try:
        sock = await connect_hybrid(HybridVsockAddress(str(tmp_path / "v.sock"), 52), 2)
        with sock:
            loop = asyncio.get_running_loop()
            rest = b""
            while len(rest) < len(b"guest stream starts here"):
                rest += await loop.sock_recv(sock, 100)
            assert rest == b"guest stream starts here"
    finally:
        server.close()


@pytest.mark.asyncio
async def test_connect_retries_until_the_guest_listens_never_replaying(
    muxer: FirecrackerMuxer,
) -> None:
    connecting = asyncio.ensure_future(
        vsock_async.connect(f"hvsock:{muxer.uds_path}:52", timeout=5)
    )
    for _ in range(2000):
        if muxer.refused >= 2:
            break
        await asyncio.sleep(0.001)
    assert not connecting.done()
    guest = ListeningGuest(muxer.guest_port_path(52))
    await guest.start()
    try:
        channel = await connecting
        async with channel:
            assert (await channel.run("once", timeout=2)).stdout == b"guest:once"
        assert muxer.refused >= 2
        assert muxer.accepted == muxer.refused + 1, "each attempt is a new connection"
        assert set(muxer.handshakes) == {b"CONNECT 52\n"}
        assert guest.script.commands == [b"once"]
        assert guest.connections == 1
    finally:
        await guest.aclose()


@pytest.mark.asyncio
async def test_refused_until_the_deadline_is_a_connect_timeout_that_says_why(
    muxer: FirecrackerMuxer,
) -> None:
    with pytest.raises(ConnectTimeout, match="nothing listens on vsock port 52") as info:
        await vsock_async.connect(f"hvsock:{muxer.uds_path}:52", timeout=0.05)
    assert isinstance(info.value, ConnectFailed), "a ConnectTimeout is a ConnectFailed too"
    assert muxer.refused >= 1


@pytest.mark.asyncio
async def test_a_silent_vmm_is_a_connect_timeout(tmp_path: Path) -> None:
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(tmp_path / "v.sock"))
    silent.listen()
    with silent, pytest.raises(ConnectTimeout, match="did not answer CONNECT 52"):
        await vsock_async.connect(f"hvsock:{tmp_path}/v.sock:52", timeout=0.02)


@pytest.mark.asyncio
async def test_a_garbled_reply_fails_at_once_without_retrying(tmp_path: Path) -> None:
    attempts = 0

    async def vmm(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        await reader.readline()
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        writer.close()

    server = await asyncio.start_unix_server(vmm, str(tmp_path / "v.sock"))
    try:
        with pytest.raises(ConnectFailed, match="instead of 'OK <port>"):
            await vsock_async.connect(f"hvsock:{tmp_path}/v.sock:52", timeout=5)
        assert attempts == 1
    finally:
        server.close()


@pytest.mark.asyncio
async def test_a_missing_vmm_socket_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConnectFailed, match="No such file"):
        await vsock_async.connect(f"hvsock:{tmp_path}/absent.sock:52", timeout=5)


@pytest.mark.asyncio
async def test_a_dropped_hvsock_connection_fails_its_calls_and_a_new_connect_serves(
    muxer: FirecrackerMuxer, guest52: ListeningGuest
) -> None:
    channel = await vsock_async.connect(f"hvsock:{muxer.uds_path}:52", timeout=2)
    in_flight = asyncio.ensure_future(channel.run("close", timeout=2))
    queued = asyncio.ensure_future(channel.run("queued", timeout=2))
    with pytest.raises(ConnectionClosed):
        await in_flight
    with pytest.raises(ConnectionClosed):
        await queued
    async with vsock_async.connect(f"hvsock:{muxer.uds_path}:52", timeout=2) as again:
        assert (await again.run("x", timeout=2)).stdout == b"vm:x"
    assert guest52.script.commands == [b"close", b"x"]


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["unix", "tcp"])
async def test_connect_dials_a_listening_guest_directly(tmp_path: Path, kind: str) -> None:
    script = GuestScript("direct")

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await serve_connection(script, r, w)

    if kind == "unix":
        server = await asyncio.start_unix_server(handler, str(tmp_path / "g.sock"))
        address = f"unix:{tmp_path}/g.sock"
    else:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        address = f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with vsock_async.connect(address, timeout=2) as channel:
            assert (await channel.run("hi", timeout=2)).stdout == b"direct:hi"
    finally:
        server.close()


# -- guest-initiated hybrid vsock and socket files ------------------------------------------


@pytest.mark.asyncio
async def test_hvsock_listener_binds_uds_path_underscore_port(tmp_path: Path) -> None:
    async with vsock_async.listen(f"hvsock:{tmp_path}/v.sock:1024", label="vm1") as server:
        path = tmp_path / "v.sock_1024"
        assert stat.S_ISSOCK(path.stat().st_mode)
        guest = DialingGuest(str(path))
        await guest.dial()
        try:
            vm = await server.wait_for_guest("vm1", timeout=2)
            assert (await vm.run("a", timeout=2)).stdout == b"guest:a"
        finally:
            await guest.aclose()
    assert not path.exists(), "the socket file is removed on close"


@pytest.mark.asyncio
async def test_socket_files_are_0600_by_default(tmp_path: Path) -> None:
    async with vsock_async.listen(f"unix:{tmp_path}/g.sock"):
        assert stat.S_IMODE((tmp_path / "g.sock").stat().st_mode) == 0o600


@pytest.mark.asyncio
async def test_socket_file_mode_owner_and_group_can_be_set(tmp_path: Path) -> None:
    groups = [g for g in os.getgroups() if g != os.getgid()] or [os.getgid()]
    options = UnixSocketOptions(mode=0o660, owner=os.getuid(), group=groups[0])
    async with vsock_async.listen(f"hvsock:{tmp_path}/v.sock:5", unix_options=options):
        info = (tmp_path / "v.sock_5").stat()
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert (info.st_uid, info.st_gid) == (os.getuid(), groups[0])


@pytest.mark.asyncio
async def test_an_unknown_group_name_is_a_usage_error(tmp_path: Path) -> None:
    options = UnixSocketOptions(group="no-such-group-vsock-async")
    with pytest.raises(UsageError, match="unknown group"):
        await vsock_async.listen(f"unix:{tmp_path}/g.sock", unix_options=options)
    assert not (tmp_path / "g.sock").exists()


@pytest.mark.asyncio
async def test_a_stale_socket_file_from_a_crashed_run_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "v.sock_1024"
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(path))
    crashed.close()
    assert path.exists()
    async with vsock_async.listen(f"hvsock:{tmp_path}/v.sock:1024") as server:
        guest = DialingGuest(str(path))
        await guest.dial()
        try:
            assert (await server.accept(timeout=2)).key == f"hvsock:{tmp_path}/v.sock:1024"
        finally:
            await guest.aclose()


@pytest.mark.asyncio
async def test_a_live_listener_or_a_regular_file_is_never_replaced(tmp_path: Path) -> None:
    async with vsock_async.listen(f"unix:{tmp_path}/g.sock"):
        with pytest.raises(ListenFailed, match="live listener"):
            await vsock_async.listen(f"unix:{tmp_path}/g.sock")
        assert (tmp_path / "g.sock").exists()
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(ListenFailed, match="not a socket"):
        await vsock_async.listen(f"unix:{tmp_path}/file")
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.mark.asyncio
async def test_a_second_listen_on_a_live_path_plants_no_guest_in_the_live_server(
    tmp_path: Path,
) -> None:
    async with vsock_async.listen(f"unix:{tmp_path}/g.sock", label="a") as server:
        events: list[GuestEvent] = []
        server.subscribe(events.append)
        with pytest.raises(ListenFailed, match="live listener"):
            await vsock_async.listen(f"unix:{tmp_path}/g.sock")
        for _ in range(5):
            await asyncio.sleep(0.001)
        assert events == [], "the check came and went as a guest"
        assert server.channels == []
        assert server.guests == []


@pytest.mark.parametrize("name", ["g.sock", "with space.sock", " lead and trail .sock"])
def test_the_liveness_check_never_connects_to_a_live_listener(tmp_path: Path, name: str) -> None:
    path = str(tmp_path / name)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with live:
        live.bind(path)
        live.listen()
        live.setblocking(False)
        with pytest.raises(ListenFailed, match="live listener"):
            bind_listener(UnixAddress(path))
        with pytest.raises(BlockingIOError):
            live.accept()  # nobody dialled it
    # Closed, the same file is stale: replaced without a word.
    bind_listener(UnixAddress(path)).close()


def test_a_listener_bound_by_a_relative_path_elsewhere_is_still_seen_live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with live:
        live.bind("g.sock")  # /proc/net/unix shows the path as bound: relative
        live.listen()
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ListenFailed, match="live listener"):
            bind_listener(UnixAddress(str(tmp_path / "sub" / "g.sock")))


@pytest.mark.asyncio
async def test_close_leaves_a_socket_file_someone_else_has_put_there(tmp_path: Path) -> None:
    path = tmp_path / "g.sock"
    server = await vsock_async.listen(f"unix:{path}")
    path.unlink()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    with other:
        await server.aclose()
        assert path.exists()


# -- the real agent, both directions ----------------------------------------------------------


@pytest.mark.asyncio
async def test_real_agent_dials_a_hybrid_listener_with_two_connections(tmp_path: Path) -> None:
    listening = vsock_async.listen(f"hvsock:{tmp_path}/v.sock:1024", label="vm")
    dialing = agent_process(
        "--connect", f"unix:{tmp_path}/v.sock_1024", "--connections", "2", tmp_path=tmp_path
    )
    async with listening as server, dialing:
        guest = await server.wait_for_guest("vm", timeout=10)
        for _ in range(2000):
            if len(guest.channels) == 2:
                break
            await asyncio.sleep(0.005)
        assert len(guest.channels) == 2
        await guest.probe(timeout=5)
        # Each command waits for the other's file: they can only finish if they run at once.
        a, b = tmp_path / "a", tmp_path / "b"
        results = await asyncio.gather(
            guest.run(f"touch {a}; while [ ! -e {b} ]; do sleep 0.01; done; echo one", timeout=5),
            guest.run(f"touch {b}; while [ ! -e {a} ]; do sleep 0.01; done; echo two", timeout=5),
        )
        assert [r.stdout for r in results] == [b"one\n", b"two\n"]
        assert guest.waiting == 0


@pytest.mark.asyncio
async def test_real_agent_listens_behind_the_muxer(muxer: FirecrackerMuxer, tmp_path: Path) -> None:
    hvsock = f"hvsock:{muxer.uds_path}:52"
    listening = agent_process("--listen", f"unix:{muxer.guest_port_path(52)}", tmp_path=tmp_path)
    async with listening, vsock_async.connect(hvsock, timeout=10) as channel:
        await channel.probe(timeout=5)
        result = await channel.run(["printf", "%s", "a b"], timeout=5)
        assert (result.stdout, result.exit_code) == (b"a b", 0)
        assert (await channel.run("exit 42", timeout=5)).exit_code == 42
    assert set(muxer.handshakes) == {b"CONNECT 52\n"}

"""File operations through the host library against the real agent, over a Unix socket.

Every transfer is checked byte for byte by SHA-256 on the file system it
landed on; interrupted transfers are checked for what they left behind (the
target untouched, no temporary file but the documented leftover of a killed
agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import vsock_async
from tests.agent_process import LONG, Served, eventually, queued, served_agent
from vsock_async import (
    PIPE,
    ConnectionClosed,
    GuestChannel,
    GuestFileError,
    Limits,
    Unsupported,
    UsageError,
)
from vsock_async.host import files
from vsock_async.host.process import start_process
from vsock_async.host.session import SessionConnection
from vsock_async.protocol.v2 import AgentLimits, HelloAnswer

MiB = 1024 * 1024
TEMP = re.compile(r"\.vsock_async\.put\.[0-9a-f]{16}")


@dataclass
class Guest:
    """A v2 channel to a real agent, its connection, and the directory its files go to."""

    channel: GuestChannel
    agent: asyncio.subprocess.Process
    dir: Path
    log: Path

    @property
    def conn(self) -> SessionConnection:
        assert isinstance(self.channel.connection, SessionConnection)
        return self.channel.connection

    def path(self, *parts: str) -> str:
        return str(self.dir.joinpath(*parts))


@contextlib.asynccontextmanager
async def running(tmp_path: Path, *options: str) -> AsyncIterator[Guest]:
    """The agent dialling a server, and the v2 channel it made."""
    async with served_agent(tmp_path, "files.sock", *options) as served:
        assert served.guest.protocol == "v2"
        guest_dir = tmp_path / "guest"
        guest_dir.mkdir(exist_ok=True)
        yield Guest(served.guest, served.agent, guest_dir, tmp_path / "agent.log")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | bytes | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def leftovers(directory: str | Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(".vsock_async.")]


async def read_all(channel: GuestChannel, path: str) -> bytes:
    return b"".join([chunk async for chunk in channel.read_file(path)])


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


SIZES = [0, 1, 1000, MiB - 1, MiB, MiB + 1, 3 * MiB + 17]


# -- round trips --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_round_trips_are_byte_exact_for_every_size_and_source(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        for size in SIZES:
            data = os.urandom(size)
            local = tmp_path / f"local-{size}"
            local.write_bytes(data)
            sources: list[files.Source] = [data, local, chunks_of(data, 4096), bytearray(data)]
            for i, source in enumerate(sources):
                target = guest.path(f"f-{size}-{i}")
                await guest.channel.put_file(source, target)
                assert file_digest(target) == digest(data), (size, i)
            back = tmp_path / f"back-{size}"
            await guest.channel.get_file(guest.path(f"f-{size}-0"), back)
            assert file_digest(back) == digest(data)
            read = b"".join([c async for c in guest.channel.read_file(guest.path(f"f-{size}-1"))])
            assert read == data
        assert leftovers(guest.dir) == [] and leftovers(tmp_path) == []


@pytest.mark.asyncio
async def test_a_file_operation_in_progress_counts_as_running(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        Path(guest.path("f")).write_bytes(b"x" * MiB)
        assert guest.channel.running == 0
        reading = guest.channel.read_file(guest.path("f"), window=64 * 1024)
        async with contextlib.aclosing(reading):
            await anext(reading)
            assert guest.channel.running == 1
            process = await guest.channel.create_process("sleep 30")
            assert guest.channel.running == 2
            process.kill()
            await process.wait()
        await eventually(lambda: guest.channel.running == 0, "both streams closed")


@pytest.mark.asyncio
async def test_a_large_sparse_file_goes_both_ways(tmp_path: Path) -> None:
    source = tmp_path / "sparse"
    with open(source, "wb") as f:
        f.truncate(300 * MiB)
        f.seek(123 * MiB)
        f.write(b"in the middle")
        f.seek(300 * MiB - 4)
        f.write(b"tail")
    expected = file_digest(source)
    async with running(tmp_path) as guest:
        await guest.channel.put_file(source, guest.path("sparse"))
        assert file_digest(guest.path("sparse")) == expected
        await guest.channel.get_file(guest.path("sparse"), tmp_path / "again")
        assert file_digest(tmp_path / "again") == expected


@pytest.mark.asyncio
async def test_put_sets_mode_mtime_and_owner_and_get_keeps_them(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        target = guest.path("f")
        await guest.channel.put_file(b"x", target, mode=0o640, mtime=1_000_000_000.5)
        st = os.stat(target)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert st.st_mtime_ns == 1_000_000_000_500_000_000
        await guest.channel.get_file(target, tmp_path / "back")
        back = os.stat(tmp_path / "back")
        assert (stat.S_IMODE(back.st_mode), back.st_mtime_ns) == (0o640, st.st_mtime_ns)
        if os.geteuid() == 0:
            await guest.channel.put_file(b"y", target, mode=0o4755, uid=1234, gid=5678)
            st = os.stat(target)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o4755)
            await guest.channel.get_file(target, tmp_path / "setuid")
            assert stat.S_IMODE(os.stat(tmp_path / "setuid").st_mode) == 0o755  # no set-id here


@pytest.mark.asyncio
async def test_put_replaces_a_file_or_link_and_makes_parents_when_asked(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        await guest.channel.put_file(b"deep", guest.path("a", "b", "c"))
        assert Path(guest.path("a", "b", "c")).read_bytes() == b"deep"
        with pytest.raises(GuestFileError) as missing:
            await guest.channel.put_file(b"x", guest.path("no", "f"), make_parents=False)
        assert missing.value.errno_name == "ENOENT" and missing.value.path == guest.path("no", "f")
        await guest.channel.put_file(b"new", guest.path("a", "b", "c"))
        assert Path(guest.path("a", "b", "c")).read_bytes() == b"new"
        os.symlink(guest.path("a", "b", "c"), guest.path("link"))
        await guest.channel.put_file(b"replaces the link", guest.path("link"))
        assert not os.path.islink(guest.path("link"))
        assert Path(guest.path("a", "b", "c")).read_bytes() == b"new"  # not written through
        with pytest.raises(GuestFileError) as directory:
            await guest.channel.put_file(b"x", guest.path("a"))
        assert directory.value.errno_name == "EISDIR"
        assert leftovers(guest.dir) == [] and leftovers(guest.path("a")) == []


@pytest.mark.asyncio
async def test_get_errors_are_typed_and_leave_nothing_locally(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        os.mkfifo(guest.path("fifo"))
        os.mkdir(guest.path("dir"))
        for name, errno_name in (("nope", "ENOENT"), ("dir", "EISDIR"), ("fifo", "EINVAL")):
            with pytest.raises(GuestFileError) as caught:
                await guest.channel.get_file(guest.path(name), tmp_path / "local")
            assert caught.value.errno_name == errno_name
            assert caught.value.errno == getattr(__import__("errno"), errno_name)
            assert caught.value.path == guest.path(name)
            with pytest.raises(GuestFileError):
                async for _ in guest.channel.read_file(guest.path(name)):
                    pass
        assert not (tmp_path / "local").exists() and leftovers(tmp_path) == []


@pytest.mark.asyncio
async def test_relative_and_malformed_paths_are_usage_errors_sent_nowhere(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        sent = guest.conn.bytes_sent
        for call in (
            guest.channel.put_file(b"x", "relative/path"),
            guest.channel.stat("nope"),
            guest.channel.listdir(b"dir"),
            guest.channel.remove("/with\0nul"),
            guest.channel.mkdir("", parents=True),
            guest.channel.put_file(b"x", "/f", mode=0o10000),
            guest.channel.put_file(42, "/f"),  # type: ignore[arg-type]
            guest.channel.get_file("/f", tmp_path / "x", window=0),
        ):
            with pytest.raises(UsageError):
                await call
        with pytest.raises(UsageError):
            guest.channel.read_file("f")
        assert guest.conn.bytes_sent == sent


@pytest.mark.asyncio
async def test_an_agent_without_files_is_refused_locally() -> None:
    old = HelloAnswer(2, AgentLimits(), frozenset({"exec", "signal"}), "vsock_async/0.1.9")
    channel = GuestChannel(SessionConnection(old, limits=Limits(), max_frame=MiB))
    with pytest.raises(Unsupported, match="'files' capability"):
        await channel.stat("/")
    with pytest.raises(Unsupported, match="'files' capability"):
        await channel.put_file(b"x", "/f")
    with pytest.raises(Unsupported, match="'files' capability"):
        async for _ in channel.read_file("/f"):
            pass


@pytest.mark.asyncio
async def test_a_v1_channel_and_a_v1_guest_refuse_files(tmp_path: Path) -> None:
    async with served_agent(tmp_path, "v1.sock", protocol="v1") as served:
        guest = served.server.guest(served.guest.key)
        for owner in (served.guest, guest):
            with pytest.raises(Unsupported, match="v1"):
                await owner.put_file(b"x", str(tmp_path / "f"))
            with pytest.raises(Unsupported, match="v1"):
                owner.read_file(str(tmp_path / "f"))
        assert (await served.guest.run("echo still fine")).stdout == b"still fine\n"
    assert not (tmp_path / "f").exists()


@pytest.mark.asyncio
async def test_a_guest_spreads_file_operations_over_its_v2_connections(tmp_path: Path) -> None:
    async with served_agent(tmp_path, "two.sock", "--connections", "2") as served:
        guest = served.server.guest(served.guest.key)
        await eventually(lambda: len(guest.channels) == 2, "both connections are up")
        target = tmp_path / "guest-api"
        await guest.mkdir(str(target))
        await asyncio.gather(
            *(guest.put_file(bytes([i]) * 1000, str(target / str(i))) for i in range(20))
        )
        assert sorted(e.name for e in await guest.listdir(str(target))) == sorted(
            map(str, range(20))
        )
        assert (await guest.stat(str(target / "7"))).size == 1000
        assert b"".join([c async for c in guest.read_file(str(target / "3"))]) == b"\x03" * 1000
        await guest.get_file(str(target / "4"), tmp_path / "four")
        await guest.put_tree(tmp_path / "guest-api", str(tmp_path / "copy"))
        await guest.get_tree(str(tmp_path / "copy"), tmp_path / "copy-back")
        assert (tmp_path / "copy-back" / "19").read_bytes() == bytes([19]) * 1000
        await guest.remove(str(target), recursive=True)
        assert not target.exists() and (tmp_path / "four").read_bytes() == b"\x04" * 1000


# -- through the Guest: file operations wait in one queue with runs and processes ----------


@contextlib.asynccontextmanager
async def one_stream(tmp_path: Path) -> AsyncIterator[Served]:
    """An agent that runs one stream at a time: a second call through the guest waits."""
    async with served_agent(tmp_path, "one.sock", "--max-streams", "1") as served:
        yield served


async def gated(gate: asyncio.Event) -> AsyncIterator[bytes]:
    """A put's source that keeps its stream until ``gate`` is set."""
    yield b"held"
    await gate.wait()


def streams(served: Served) -> int:
    """The streams open on the served connection: processes' and file operations'."""
    assert isinstance(served.guest.connection, SessionConnection)
    return served.guest.connection.streams + served.guest.connection.files


OBSERVERS = ("stat", "read", "get")  # file operations that report what the log holds


@pytest.mark.asyncio
@pytest.mark.parametrize("holder", ["put_file", "process", "run"])
async def test_file_operations_runs_and_processes_wait_in_one_fifo(
    tmp_path: Path, holder: str
) -> None:
    """With the one stream taken (by a file operation, a process or a run), file operations,
    runs and processes are served in the order they came: runs, processes and the put write
    the log, the other file operations report what it held when they ran."""
    names = ["run1", "stat2", "process3", "put4", "read5", "run6", "get7", "process8"]
    log = tmp_path / "order"

    def logged(name: str) -> bytes:
        """What the log holds when ``name`` runs, if every call before it ran in its turn."""
        before = names[: names.index(name)]
        return b"".join(f"{n}\n".encode() for n in before if not n.startswith(OBSERVERS))

    seen: dict[str, int | bytes] = {}

    async def call(name: str) -> None:
        if name.startswith("run"):
            assert (await guest.run(f"echo {name} >> {log}", timeout=LONG)).exit_code == 0
        elif name.startswith("process"):
            process = await guest.create_process(f"echo {name} >> {log}")
            assert await process.wait() == 0
        elif name.startswith("put"):
            await guest.put_file(logged(name) + f"{name}\n".encode(), str(log))
        elif name.startswith("stat"):
            seen[name] = (await guest.stat(str(log))).size
        elif name.startswith("read"):
            seen[name] = b"".join([chunk async for chunk in guest.read_file(str(log))])
        else:
            await guest.get_file(str(log), tmp_path / name)
            seen[name] = (tmp_path / name).read_bytes()

    async with one_stream(tmp_path) as served:
        guest = served.server.guests[0]
        holding: Awaitable[object]
        if holder == "put_file":
            gate = asyncio.Event()
            holding = asyncio.ensure_future(guest.put_file(gated(gate), str(tmp_path / "held")))
            release = gate.set
        elif holder == "process":
            process = await guest.create_process(["cat"], stdin=PIPE)
            assert process.stdin is not None
            holding, release = asyncio.ensure_future(process.wait()), process.stdin.write_eof
        else:
            gate_file = tmp_path / "gate"
            waiting = f"while [ ! -e {gate_file} ]; do sleep 0.01; done"
            holding = asyncio.ensure_future(guest.run(waiting, timeout=LONG))
            release = gate_file.touch
        await eventually(lambda: streams(served) == 1, f"the {holder} holds the stream")
        calls = []
        for name in names:
            calls.append(asyncio.ensure_future(call(name)))
            await queued(served, len(calls))
        release()
        async with asyncio.timeout(LONG):
            await asyncio.gather(*calls)
            await holding
        assert seen == {
            name: len(logged(name)) if name.startswith("stat") else logged(name)
            for name in names
            if name.startswith(OBSERVERS)
        }
        assert log.read_text().split() == [n for n in names if not n.startswith(OBSERVERS)]
        assert guest.waiting == 0 and streams(served) == 0


def files_open(guest: vsock_async.Guest) -> list[int]:
    """The file streams open on each connection of ``guest``, fewest first."""
    connections = [channel.connection for channel in guest.channels]
    assert all(isinstance(c, SessionConnection) for c in connections)
    return sorted(c.files for c in connections if isinstance(c, SessionConnection))


@pytest.mark.asyncio
async def test_file_operations_take_a_free_file_slot_on_any_connection_in_their_turn(
    tmp_path: Path,
) -> None:
    """A connection carries at most the agent's max_files file operations (16) however many
    streams it has free: the next ones go to the guest's other connection, and once every
    file slot is taken they wait, in the order they came, for one to come free on either
    connection. Runs and processes, which take no file slot, pass them meanwhile: at once
    while a stream is free, and when one comes free on a connection with no file slot free."""
    target = tmp_path / "guest"
    target.mkdir()
    opened: list[int] = []  # the puts whose stream is open, in the order they got it
    gates: list[asyncio.Event] = []

    async def held(index: int, gate: asyncio.Event) -> AsyncIterator[bytes]:
        opened.append(index)  # a put reads its source once its stream is open
        yield b"held"
        await gate.wait()

    def put() -> asyncio.Future[None]:
        index, gate = len(gates), asyncio.Event()
        gates.append(gate)
        return asyncio.ensure_future(guest.put_file(held(index, gate), str(target / str(index))))

    async def end(index: int) -> int:
        """Let put ``index`` end; the put that got its file slot."""
        count = len(opened)
        gates[index].set()
        await puts[index]
        await eventually(lambda: len(opened) > count, "a waiting put got the file slot")
        return opened[-1]

    slots = AgentLimits().max_files  # and one stream more per connection
    options = ("--connections", "2", "--max-streams", str(slots + 1))
    async with served_agent(tmp_path, "slots.sock", *options) as served:
        guest = served.server.guest(served.guest.key)
        await eventually(lambda: len(guest.channels) == 2, "both connections are up")
        puts = [put() for _ in range(2 * slots)]
        await eventually(lambda: len(opened) == 2 * slots, "every put got a file slot")
        assert files_open(guest) == [slots, slots] and guest.waiting == 0
        waiting = []
        for _ in range(3):
            waiting.append(put())
            await eventually(lambda: guest.waiting == len(waiting), "the put waits its turn")
        assert (await guest.run("echo passed", timeout=LONG)).stdout == b"passed\n"
        cats = [await guest.create_process(["cat"], stdin=PIPE) for _ in range(2)]
        last_run = asyncio.ensure_future(guest.run("echo passed again", timeout=LONG))
        await eventually(lambda: guest.waiting == 4, "the run waits for a stream")
        stdin = cats[0].stdin
        assert stdin is not None
        stdin.write_eof()  # its stream comes free on a connection with no file slot free
        assert (await last_run).stdout == b"passed again\n"
        assert guest.waiting == 3 and len(opened) == 2 * slots
        for turn, index in enumerate((0, 2 * slots - 1, 1)):  # the first and last went apart
            assert await end(index) == 2 * slots + turn, "the put that waited longest runs"
            assert files_open(guest) == [slots, slots] and guest.waiting == 2 - turn
        stdin = cats[1].stdin
        assert stdin is not None
        stdin.write_eof()
        assert [await cat.wait() for cat in cats] == [0, 0]
        for gate in gates:
            gate.set()
        async with asyncio.timeout(LONG):
            await asyncio.gather(*puts, *waiting)
        assert files_open(guest) == [0, 0]
    assert sorted(os.listdir(target), key=int) == [str(i) for i in range(2 * slots + 3)]
    assert all((target / name).read_bytes() == b"held" for name in os.listdir(target))


@pytest.mark.asyncio
async def test_file_operations_that_give_up_waiting_leave_the_queue_and_start_nothing(
    tmp_path: Path,
) -> None:
    target, local = tmp_path / "guest", tmp_path / "local"
    target.mkdir()
    (target / "source").write_bytes(b"data")
    local.mkdir()
    (local / "file").write_bytes(b"tree")

    async def read(path: Path) -> bytes:
        return b"".join([chunk async for chunk in guest.read_file(str(path))])

    def ended() -> int:
        """File operations the agent has carried out (it logs each once it has ended)."""
        return (tmp_path / "agent.log").read_text().count("file operation ended")

    async with one_stream(tmp_path) as served, asyncio.timeout(LONG):
        guest = served.server.guests[0]
        held = await guest.create_process(["cat"], stdin=PIPE)
        assert held.stdin is not None
        gave_up = [
            asyncio.ensure_future(guest.put_file(b"x", str(target / "put"))),
            asyncio.ensure_future(guest.mkdir(str(target / "dir"))),
            asyncio.ensure_future(guest.get_file(str(target / "source"), tmp_path / "got")),
            asyncio.ensure_future(read(target / "source")),
            asyncio.ensure_future(guest.put_tree(local, str(target / "tree"))),
        ]
        await queued(served, len(gave_up))
        assert guest.waiting == len(gave_up)  # all in the guest's queue
        for bad in (  # each fails at once, not in its turn (a wait would never end)
            guest.stat("relative"),
            guest.listdir(b"dir"),
            guest.remove("/with\0nul"),
            guest.put_file(b"x", str(target / "f"), mode=0o10000),
            guest.put_file(42, str(target / "f")),  # type: ignore[arg-type]
            guest.get_file(str(target / "source"), tmp_path / "x", window=0),
            guest.mkdir(str(target / "d"), uid=-1),
            guest.symlink("", str(target / "link")),
            guest.set_attributes(str(target / "source")),
            guest.put_tree(local, "relative"),
            guest.get_tree(str(target), tmp_path / "t", window=0),
        ):
            with pytest.raises(UsageError):
                await bad
        with pytest.raises(UsageError):
            guest.read_file("relative")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await guest.stat(str(target))
        assert guest.waiting == len(gave_up)
        for call in gave_up:
            call.cancel()
        for call in gave_up:
            with pytest.raises(asyncio.CancelledError):
                await call
        assert guest.waiting == 0 and served.guest.queued == 0
        last = asyncio.ensure_future(guest.put_file(b"last", str(target / "last")))
        await queued(served, 1)
        held.stdin.write_eof()
        await last
        assert await held.wait() == 0
        await eventually(lambda: ended() > 0, "the agent logged the last put")
    assert ended() == 1  # the agent saw no other file operation
    assert sorted(os.listdir(target)) == ["last", "source"]  # nothing that gave up ever ran
    assert not (tmp_path / "got").exists() and leftovers(tmp_path) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("abandon", ["aclose", "del"])
async def test_a_read_left_mid_way_gives_its_stream_to_the_next_call(
    tmp_path: Path, abandon: str
) -> None:
    """A read holds its stream from its first chunk until it is closed, or dropped and
    collected; then the calls waiting behind it run, in their turn."""
    big = tmp_path / "big"
    big.write_bytes(os.urandom(4 * MiB))
    async with one_stream(tmp_path) as served:
        guest = served.server.guests[0]
        reading = guest.read_file(str(big), window=64 * 1024)
        assert await anext(reading)
        next_run = asyncio.ensure_future(guest.run("echo next", timeout=LONG))
        next_stat = asyncio.ensure_future(guest.stat(str(big)))
        await queued(served, 2)
        assert guest.waiting == 2  # in the guest's queue, behind the read
        if abandon == "aclose":
            await reading.aclose()
        else:
            del reading
            gc.collect()
        async with asyncio.timeout(LONG):
            ran, info = await asyncio.gather(next_run, next_stat)
        assert ran.stdout == b"next\n" and info.size == 4 * MiB
        await eventually(
            lambda: "outcome=closed" in (tmp_path / "agent.log").read_text(), "the get stopped"
        )
        assert guest.waiting == 0 and streams(served) == 0


@pytest.mark.asyncio
async def test_a_v1_guest_refuses_every_file_operation_at_once(tmp_path: Path) -> None:
    """Its one connection busy, a v1 guest still refuses file operations at once, not in
    their turn."""
    gate = tmp_path / "gate"
    async with served_agent(tmp_path, "v1.sock", protocol="v1") as served:
        guest = served.server.guest(served.guest.key)
        waiting = f"while [ ! -e {gate} ]; do sleep 0.01; done"
        holding = asyncio.ensure_future(guest.run(waiting, timeout=LONG))
        await eventually(lambda: guest.busy, "the run holds the connection")
        path = str(tmp_path / "f")
        async with asyncio.timeout(LONG):
            for call in (
                guest.put_file(b"x", path),
                guest.get_file(path, tmp_path / "got"),
                guest.stat(path),
                guest.listdir(path),
                guest.remove(path),
                guest.mkdir(path),
                guest.symlink("target", path),
                guest.set_attributes(path, mode=0o600),
                guest.put_tree(tmp_path, path),
                guest.get_tree(path, tmp_path / "tree"),
            ):
                with pytest.raises(Unsupported, match=r"only protocol v1.*file operations"):
                    await call
            with pytest.raises(Unsupported, match=r"only protocol v1.*file operations"):
                guest.read_file(path)
            assert guest.waiting == 0
            gate.touch()
            assert (await holding).exit_code == 0
    assert not (tmp_path / "f").exists()


# -- metadata ------------------------------------------------------------------------------


ODD_NAMES = ["with space", "new\nline", "tab\there", "ünïcödé", "-dash", ".hidden"]
RAW_NAME = b"not-utf8-\xff\xfe"


@pytest.mark.asyncio
async def test_stat_and_listdir_describe_every_kind_and_odd_names(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        top = Path(guest.path("top"))
        top.mkdir(mode=0o750)
        for name in ODD_NAMES:
            (top / name).write_bytes(name.encode())
        with open(os.path.join(os.fsencode(top), RAW_NAME), "wb") as f:
            f.write(b"raw")
        os.symlink("../elsewhere", top / "dangling")
        os.mkfifo(top / "fifo")
        os.mkdir(top / "sub")
        entries = {e.name: e for e in await guest.channel.listdir(str(top))}
        assert set(entries) == {*ODD_NAMES, os.fsdecode(RAW_NAME), "dangling", "fifo", "sub"}
        assert entries["new\nline"].kind == "file" and entries["new\nline"].size == 8
        assert entries[os.fsdecode(RAW_NAME)].size == 3
        assert (entries["dangling"].kind, entries["dangling"].target) == ("symlink", "../elsewhere")
        assert entries["fifo"].kind == "fifo" and entries["sub"].kind == "dir"
        info = await guest.channel.stat(str(top))
        st = os.stat(top)
        assert (info.name, info.kind, info.mode, info.uid, info.mtime_ns) == (
            "top",
            "dir",
            0o750,
            st.st_uid,
            st.st_mtime_ns,
        )
        os.symlink("top", guest.path("link"))
        assert (await guest.channel.stat(guest.path("link"))).kind == "dir"
        link = await guest.channel.stat(guest.path("link"), follow_symlinks=False)
        assert (link.kind, link.target) == ("symlink", "top")
        with pytest.raises(GuestFileError) as caught:
            await guest.channel.listdir(str(top / "with space"))
        assert caught.value.errno_name == "ENOTDIR"
        assert await guest.channel.listdir(str(top / "sub")) == []


@pytest.mark.asyncio
async def test_a_directory_of_many_entries_is_listed_within_credit(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        big = Path(guest.path("big"))
        big.mkdir()
        names = {f"entry-{i:05d}-" + "x" * 100 for i in range(5000)}  # ~1 MB of listing
        for name in names:
            (big / name).touch()
        assert {e.name for e in await guest.channel.listdir(str(big))} == names


@pytest.mark.asyncio
async def test_remove_and_mkdir(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        await guest.channel.mkdir(guest.path("d"), mode=0o711)
        assert stat.S_IMODE(os.stat(guest.path("d")).st_mode) == 0o711
        with pytest.raises(GuestFileError) as exists:
            await guest.channel.mkdir(guest.path("d"))
        assert exists.value.errno_name == "EEXIST"
        await guest.channel.mkdir(guest.path("d"), parents=True)  # as mkdir -p
        await guest.channel.mkdir(guest.path("d", "e", "f"), parents=True)
        Path(guest.path("d", "e", "f", "file")).write_bytes(b"x")
        with pytest.raises(GuestFileError) as not_empty:
            await guest.channel.remove(guest.path("d"))
        assert not_empty.value.errno_name == "ENOTEMPTY"
        keep = Path(guest.path("keep"))
        keep.mkdir()
        (keep / "precious").write_bytes(b"!")
        os.symlink(keep, guest.path("d", "link-to-keep"))
        await guest.channel.remove(guest.path("d"), recursive=True)
        assert not os.path.exists(guest.path("d"))
        assert (keep / "precious").read_bytes() == b"!"  # a link is removed, not followed
        await guest.channel.remove(str(keep / "precious"))
        await guest.channel.remove(str(keep))
        with pytest.raises(GuestFileError) as gone:
            await guest.channel.remove(str(keep))
        assert gone.value.errno_name == "ENOENT"


# -- trees ----------------------------------------------------------------------------------


def make_tree(root: Path, outside: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    for name in ODD_NAMES:
        (root / name).write_bytes(os.urandom(100))
    (root / "sub" / "deeper" / "big").write_bytes(os.urandom(2 * MiB + 5))
    (root / "empty").write_bytes(b"")
    with open(os.path.join(os.fsencode(root / "sub"), RAW_NAME), "wb") as f:
        f.write(b"raw name")
    os.chmod(root / "sub" / "deeper" / "big", 0o600)
    os.symlink("deeper/big", root / "sub" / "relative-link")
    os.symlink(str(outside), root / "escape")  # to a directory outside the tree
    os.symlink("nowhere", root / "dangling")


def snapshot(root: Path, *, top: bool = False) -> dict[bytes, tuple[str, ...]]:
    """Relative path -> (kind or mode, content digest or link target, mtime), never following
    links; with ``top``, ``root`` itself as ``.`` too. Modes and mtimes are exact."""
    found: dict[bytes, tuple[str, ...]] = {}
    base = os.fsencode(root)
    if top:
        st = os.stat(base)
        found[b"."] = ("dir", oct(stat.S_IMODE(st.st_mode)), str(st.st_mtime_ns))
    for directory, dirs, names in os.walk(base):
        for name in dirs + names:
            full = os.path.join(directory, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.fsdecode(os.readlink(full)))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", oct(stat.S_IMODE(st.st_mode)), str(st.st_mtime_ns))
            else:
                mode = oct(stat.S_IMODE(st.st_mode))
                found[rel] = (mode, file_digest(full), str(st.st_mtime_ns))
    return found


def modes_tree(tmp_path: Path) -> Path:
    """``local``: a tree whose directories are read-only (0555, 0500), private (0700) and
    odd (0751), with files of several modes, every mtime set apart."""
    root = tmp_path / "local"
    (root / "ro" / "inner").mkdir(parents=True)
    (root / "private" / "odd").mkdir(parents=True)
    (root / "ro" / "inner" / "deep").write_bytes(b"deep")
    (root / "ro" / "f").write_bytes(b"in a read-only directory")
    (root / "private" / "x").write_bytes(os.urandom(MiB + 3))
    (root / "private" / "odd" / "run").write_bytes(b"#!/bin/sh\n")
    os.symlink("../ro/f", root / "private" / "link")
    for name, mode in (("ro/f", 0o444), ("private/x", 0o600), ("private/odd/run", 0o751)):
        os.chmod(root / name, mode)
    paths = sorted(
        (Path(d) / n for d, ds, ns in os.walk(root) for n in ds + ns if n != "link"),
        key=lambda p: -len(p.parts),
    )
    for i, path in enumerate([*paths, root]):  # deepest first: a child's mtime is not its parent's
        os.utime(path, ns=(0, 1_500_000_000_123_456_789 + i * 1_000_000_007))
    for name, mode in (("ro/inner", 0o500), ("ro", 0o555), ("private/odd", 0o751)):
        os.chmod(root / name, mode)
    os.chmod(root / "private", 0o700)
    os.chmod(root, 0o750)
    return root


def make_writable(root: Path) -> None:
    """Let pytest remove a tree with read-only directories."""
    for directory, _, _ in os.walk(root):
        os.chmod(directory, 0o700)


@pytest.mark.asyncio
async def test_trees_keep_modes_and_mtimes_exactly_both_ways(tmp_path: Path) -> None:
    local = modes_tree(tmp_path)
    expected = snapshot(local, top=True)
    try:
        async with running(tmp_path) as guest:
            await guest.channel.put_tree(local, guest.path("tree"))
            assert snapshot(Path(guest.path("tree")), top=True) == expected
            await guest.channel.get_tree(guest.path("tree"), tmp_path / "back")
            assert snapshot(tmp_path / "back", top=True) == expected
            # An existing top directory keeps its own mode; what is under it is copied.
            for existing in (Path(guest.path("there")), tmp_path / "there"):
                existing.mkdir()
                os.chmod(existing, 0o711)
            await guest.channel.put_tree(local, guest.path("there"))
            await guest.channel.get_tree(guest.path("tree"), tmp_path / "there")
            for existing in (Path(guest.path("there")), tmp_path / "there"):
                copy = snapshot(existing, top=True)
                assert copy.pop(b".")[:2] == ("dir", "0o711")
                assert copy == {k: v for k, v in expected.items() if k != b"."}
    finally:
        for tree in (local, tmp_path / "back", tmp_path / "there", tmp_path / "guest"):
            make_writable(tree)


@pytest.mark.skipif(os.geteuid() != 0, reason="starts the agent as another user")
@pytest.mark.asyncio
async def test_an_agent_not_root_fills_read_only_directories_before_closing_them(
    tmp_path: Path,
) -> None:
    """Without root's override, a 0555 directory can be filled only before it gets its mode."""
    local = modes_tree(tmp_path)
    expected = snapshot(local, top=True)
    async with unprivileged(tmp_path) as guest:
        await guest.channel.put_tree(local, str(guest.dir / "tree"))
        assert snapshot(guest.dir / "tree", top=True) == expected
        await guest.channel.get_tree(str(guest.dir / "tree"), tmp_path / "back")
        assert snapshot(tmp_path / "back", top=True) == expected


@pytest.mark.asyncio
async def test_trees_go_both_ways_with_links_as_links_and_odd_names(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not to be copied")
    local = tmp_path / "local"
    local.mkdir()
    make_tree(local, outside)
    async with running(tmp_path) as guest:
        await guest.channel.put_tree(local, guest.path("tree"))
        assert snapshot(Path(guest.path("tree"))) == snapshot(local)
        assert os.readlink(guest.path("tree", "escape")) == str(outside)
        await guest.channel.get_tree(guest.path("tree"), tmp_path / "back")
        assert snapshot(tmp_path / "back") == snapshot(local)
        assert os.listdir(outside) == ["secret"]  # nothing was written through the link
        # Into an existing tree: files and links replaced, the rest kept.
        (tmp_path / "back" / "extra").write_bytes(b"stays")
        await guest.channel.get_tree(guest.path("tree"), tmp_path / "back")
        assert (tmp_path / "back" / "extra").read_bytes() == b"stays"
        with pytest.raises(GuestFileError) as not_dir:
            await guest.channel.get_tree(guest.path("tree", "empty"), tmp_path / "x")
        assert not_dir.value.errno_name == "ENOTDIR"
        assert leftovers(tmp_path / "back") == [] and leftovers(guest.path("tree")) == []


# -- sharing the connection -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_transfers_and_processes_share_one_connection(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        blobs = [os.urandom(MiB + i) for i in range(6)]
        process = await start_process(guest.conn, ["cat"], stdin=-1)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"meanwhile\n")
        await asyncio.gather(
            *(guest.channel.put_file(b, guest.path(f"p{i}")) for i, b in enumerate(blobs)),
            *(guest.channel.stat(str(guest.dir)) for _ in range(40)),  # above max_files
        )
        assert await process.stdout.readline() == b"meanwhile\n"
        reads = await asyncio.gather(
            *(guest.channel.get_file(guest.path(f"p{i}"), tmp_path / f"g{i}") for i in range(6))
        )
        assert reads == [None] * 6
        for i, blob in enumerate(blobs):
            assert (tmp_path / f"g{i}").read_bytes() == blob
        process.stdin.write_eof()
        assert await process.wait() == 0
        assert guest.conn.streams == guest.conn.files == 0


# -- interruptions ----------------------------------------------------------------------------


async def endless(first: bytes, started: asyncio.Event) -> AsyncIterator[bytes]:
    """Yields ``first``, then waits forever (a source that stalls mid-file)."""
    yield first
    started.set()
    await asyncio.Event().wait()
    yield b"never"


async def stalled_put(guest: Guest, target: str) -> asyncio.Task[None]:
    """A put that has sent 2 MiB and waits for more; returns once the agent holds its temp file."""
    started = asyncio.Event()
    task = asyncio.create_task(
        guest.channel.put_file(endless(os.urandom(2 * MiB), started), target)
    )
    await asyncio.wait_for(started.wait(), LONG)
    directory = os.path.dirname(target)
    await eventually(lambda: len(leftovers(directory)) == 1, "the agent made its temp file")
    return task


@pytest.mark.asyncio
async def test_a_cancelled_put_leaves_no_target_and_no_temp(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        Path(guest.path("kept")).write_bytes(b"old")
        task = await stalled_put(guest, guest.path("kept"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: leftovers(guest.dir) == [], "the agent removed its temp file")
        assert Path(guest.path("kept")).read_bytes() == b"old"
        await eventually(lambda: guest.conn.files == 0, "the stream ended")
        await guest.channel.put_file(b"the connection is fine", guest.path("after"))
        assert "outcome=closed" in guest.log.read_text()


@pytest.mark.asyncio
async def test_a_dropped_connection_mid_put_leaves_no_target_and_no_temp(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        task = await stalled_put(guest, guest.path("target"))
        guest.channel.abort("reset mid-file")
        with pytest.raises(ConnectionClosed):
            await task
        await eventually(lambda: leftovers(guest.dir) == [], "the agent removed its temp file")
        assert not os.path.exists(guest.path("target"))


@pytest.mark.asyncio
async def test_an_agent_stopped_mid_put_removes_its_temp(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        task = await stalled_put(guest, guest.path("target"))
        guest.agent.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            await task
        assert await asyncio.wait_for(guest.agent.wait(), LONG) == 0
        assert leftovers(guest.dir) == [] and not os.path.exists(guest.path("target"))


@pytest.mark.asyncio
async def test_an_agent_killed_mid_put_leaves_only_its_documented_temp(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        Path(guest.path("target")).write_bytes(b"old")
        task = await stalled_put(guest, guest.path("target"))
        guest.agent.kill()
        with pytest.raises(ConnectionClosed):
            await task
        (left,) = leftovers(guest.dir)
        assert TEMP.fullmatch(left)
        assert stat.S_IMODE(os.stat(guest.path(left)).st_mode) == 0o600
        assert Path(guest.path("target")).read_bytes() == b"old"


def sparse(path: str, size: int = 16 * 1024**3) -> None:
    """A file far too large to cross before the test kills its agent, that takes no space."""
    with open(path, "wb") as f:
        f.truncate(size)


def all_leftovers(root: Path) -> list[str]:
    return [
        os.path.join(d, n)
        for d, ds, ns in os.walk(root)
        for n in ds + ns
        if n.startswith(".vsock_async.")
    ]


@pytest.mark.asyncio
async def test_an_agent_killed_mid_get_leaves_the_target_as_it_was_and_no_temp(
    tmp_path: Path,
) -> None:
    down = tmp_path / "down"
    down.mkdir()
    async with running(tmp_path) as guest:
        sparse(guest.path("huge"))
        (down / "kept").write_bytes(b"old")
        task = asyncio.create_task(
            guest.channel.get_file(guest.path("huge"), down / "kept", window=64 * 1024)
        )
        await eventually(lambda: leftovers(down) != [], "the download started")
        guest.agent.kill()
        with pytest.raises(ConnectionClosed):
            await task
        assert task.done()
    assert os.listdir(down) == ["kept"] and (down / "kept").read_bytes() == b"old"


@pytest.mark.asyncio
async def test_an_agent_killed_mid_get_tree_leaves_no_partial_file_and_no_temp(
    tmp_path: Path,
) -> None:
    back = tmp_path / "back"
    async with running(tmp_path) as guest:
        Path(guest.path("tree", "sub")).mkdir(parents=True)
        Path(guest.path("tree", "a")).write_bytes(b"small")
        sparse(guest.path("tree", "sub", "huge"))
        task = asyncio.create_task(
            guest.channel.get_tree(guest.path("tree"), back, window=64 * 1024)
        )
        await eventually(lambda: all_leftovers(back) != [], "the big file's download started")
        guest.agent.kill()
        with pytest.raises(ConnectionClosed):
            await task
    assert all_leftovers(back) == []
    assert not (back / "sub" / "huge").exists()


@pytest.mark.asyncio
async def test_leaving_a_read_early_stops_the_transfer(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        Path(guest.path("big")).write_bytes(os.urandom(20 * MiB))
        async for chunk in guest.channel.read_file(guest.path("big"), window=64 * 1024):
            assert chunk
            break
        await eventually(lambda: guest.conn.files == 0, "the stream ended")
        await eventually(lambda: "op=get" in guest.log.read_text(), "the agent logged the get")
        assert "outcome=closed" in guest.log.read_text()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path / "local")
        cancelled = asyncio.create_task(
            guest.channel.get_file(guest.path("big"), tmp_path / "local", window=64 * 1024)
        )
        await eventually(lambda: leftovers(tmp_path) != [], "the download started")
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert leftovers(tmp_path) == [] and not (tmp_path / "local").exists()


# -- what the guest refuses -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_files_root_confines_every_operation(tmp_path: Path) -> None:
    jail = tmp_path / "guest" / "jail"
    outside = tmp_path / "guest" / "outside"
    (jail / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (jail / "sub" / "f").write_bytes(b"inside")
    os.symlink(outside, jail / "out-dir")
    os.symlink(outside / "secret", jail / "out-file")
    os.symlink(jail / "sub", jail / "in-dir")  # absolute, but it stays inside
    os.symlink("../jail/sub/f", jail / "in-file")
    async with running(tmp_path, "--files-root", str(jail)) as guest:
        channel = guest.channel
        await channel.put_file(b"ok", str(jail / "new" / "file"))
        assert await read_all(channel, str(jail / "in-dir" / "f")) == b"inside"
        assert await read_all(channel, str(jail / "in-file")) == b"inside"
        assert (await channel.stat(str(jail / "out-file"), follow_symlinks=False)).kind == (
            "symlink"
        )
        refused = [
            channel.put_file(b"x", str(outside / "x")),
            channel.put_file(b"x", str(jail / ".." / "outside" / "x")),
            channel.put_file(b"x", str(jail / "out-dir" / "x")),
            channel.put_file(b"x", str(jail / "out-dir" / "a" / "b")),
            channel.get_file(str(jail / "out-file"), tmp_path / "stolen"),
            channel.get_file(str(jail / "out-dir" / "secret"), tmp_path / "stolen"),
            channel.stat(str(jail / "out-file")),
            channel.listdir(str(jail / "out-dir")),
            channel.listdir("/"),
            channel.mkdir(str(outside / "a" / "b"), parents=True),
            channel.remove(str(outside / "secret")),
            files.symlink(guest.conn, "anywhere", str(outside / "link")),
        ]
        for call in refused:
            with pytest.raises(GuestFileError) as caught:
                await call
            assert caught.value.errno_name == "EACCES"
            assert "files root" in str(caught.value)
        assert sorted(os.listdir(outside)) == ["secret"]
        assert not (tmp_path / "stolen").exists()
        with pytest.raises(GuestFileError) as root:
            await channel.remove(str(jail), recursive=True)
        assert root.value.errno_name == "EBUSY"
        await channel.remove(str(jail / "out-dir"), recursive=True)  # the link, not /outside
        assert (outside / "secret").exists() and not os.path.lexists(jail / "out-dir")


async def held(first: bytes, started: asyncio.Event, go_on: asyncio.Event) -> AsyncIterator[bytes]:
    """Yields ``first``, then waits for ``go_on`` before its last chunk."""
    yield first
    started.set()
    await go_on.wait()
    yield b"the end"


@pytest.mark.asyncio
async def test_a_directory_moved_out_of_the_root_mid_put_is_never_written(tmp_path: Path) -> None:
    """A guest process renames the target's directory out of the files root while the put
    streams: the agent's descriptor follows it, and the put must fail, not land outside."""
    jail = tmp_path / "guest" / "jail"
    outside = tmp_path / "guest" / "outside"
    (jail / "d").mkdir(parents=True)
    outside.mkdir()
    async with running(tmp_path, "--files-root", str(jail)) as guest:
        started, go_on = asyncio.Event(), asyncio.Event()
        put = asyncio.create_task(
            guest.channel.put_file(held(b"x" * 1000, started, go_on), str(jail / "d" / "f"))
        )
        await asyncio.wait_for(started.wait(), LONG)
        await eventually(lambda: len(leftovers(jail / "d")) == 1, "the agent made its temp file")
        os.rename(jail / "d", outside / "d")
        go_on.set()
        with pytest.raises(GuestFileError) as caught:
            await put
        assert caught.value.errno_name == "EACCES"
        assert "moved outside the agent's files root" in str(caught.value)
        await eventually(lambda: leftovers(outside / "d") == [], "the agent removed its temp file")
        assert os.listdir(outside / "d") == []
        # A link planted where the directory was: refused before anything is written.
        os.symlink(outside / "d", jail / "d")
        with pytest.raises(GuestFileError) as planted:
            await guest.channel.put_file(b"x", str(jail / "d" / "f"))
        assert planted.value.errno_name == "EACCES" and "files root" in str(planted.value)
        assert os.listdir(outside / "d") == []
        await guest.channel.put_file(b"fine", str(jail / "e" / "f"))  # the connection goes on
        assert (jail / "e" / "f").read_bytes() == b"fine"


def a_python_for(uid: int) -> str | None:
    """An interpreter that user ``uid`` can run (ours may sit in a directory closed to it)."""
    for python in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if python is None:
            continue
        with contextlib.suppress(OSError):
            ran = subprocess.run([python, "-c", "pass"], user=uid, capture_output=True)
            if ran.returncode == 0:
                return python
    return None


@contextlib.asynccontextmanager
async def unprivileged(tmp_path: Path) -> AsyncIterator[Guest]:
    """The agent as ``nobody`` (when the tests run as root) listening, and a v2 connection to it."""
    nobody = 65534
    python = a_python_for(nobody)
    if python is None:
        pytest.skip("no Python interpreter that user nobody can run")
    home = Path(tempfile.mkdtemp(prefix="vsa-nobody-"))  # tmp_path's parents are closed to it
    os.chown(home, nobody, nobody)
    socket_path = home / "agent.sock"
    log = open(tmp_path / "agent.log", "ab")  # noqa: SIM115 - closed below
    agent = await asyncio.create_subprocess_exec(
        python,
        "-m",
        "vsock_async",
        "agent",
        "--listen",
        f"unix:{socket_path}",
        stdout=log,
        stderr=log,
        cwd=home,
        env={**os.environ, "PYTHONPATH": str(Path(vsock_async.__file__).parents[1])},
        user=nobody,
        group=nobody,
        extra_groups=[],
    )
    try:
        # Its log says so after listen(); the socket file appears at bind(), before it.
        await eventually(
            lambda: b"agent listening" in (tmp_path / "agent.log").read_bytes(), "the agent listens"
        )
        async with vsock_async.connect(f"unix:{socket_path}", timeout=LONG) as channel:
            assert channel.protocol == "v2"
            yield Guest(channel, agent, home, tmp_path / "agent.log")
    finally:
        if agent.returncode is None:
            agent.kill()
        await agent.wait()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.asyncio
async def test_set_attributes_sets_exactly_what_it_is_given(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        f, d = Path(guest.path("f")), Path(guest.path("d"))
        f.write_bytes(b"x")
        os.chmod(f, 0o600)
        d.mkdir(mode=0o755)
        before = os.stat(f).st_mtime_ns
        await guest.channel.set_attributes(str(f), mode=0o4751)
        st = os.stat(f)
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o4751, before)  # mode alone
        await guest.channel.set_attributes(str(d), mtime=1_234_567_890.5)
        st = os.stat(d)
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o755, 1_234_567_890_500_000_000)
        await guest.channel.set_attributes(str(d), mode=0o500, mtime=0)
        st = os.stat(d)
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o500, 0)
        os.symlink(f, guest.path("link"))
        with pytest.raises(GuestFileError) as link:
            await guest.channel.set_attributes(guest.path("link"), mode=0o777)
        assert link.value.errno_name in ("ELOOP", "EINVAL")
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o4751  # not followed
        with pytest.raises(GuestFileError) as missing:
            await guest.channel.set_attributes(guest.path("nothing"), mode=0o644)
        assert (missing.value.errno_name, missing.value.path) == ("ENOENT", guest.path("nothing"))
        for bad in (
            {},
            {"mode": 0o10000},
            {"mode": True},
            {"mtime": float("nan")},
            {"mtime": float("inf")},
            {"mtime": -1.0},
            {"mtime": "0"},
        ):
            with pytest.raises(UsageError):
                await guest.channel.set_attributes(str(f), **bad)
        with pytest.raises(UsageError):
            await guest.channel.set_attributes("relative/f", mode=0o644)
        with pytest.raises(UsageError):
            await guest.channel.put_file(b"x", str(f), mtime=float("nan"))
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o4751 and f.read_bytes() == b"x"
        # The connection is still good after every refusal.
        await guest.channel.set_attributes(str(f), mode=0o644)
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o644


@pytest.mark.skipif(os.geteuid() != 0, reason="owning files by another user needs root")
@pytest.mark.asyncio
async def test_mkdir_and_symlink_take_an_owner(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        await guest.channel.mkdir(guest.path("a", "b"), parents=True, uid=1234, gid=5678)
        assert os.stat(guest.path("a", "b"))[4:6] == (1234, 5678)
        assert os.stat(guest.path("a"))[4:6] == (0, 0)  # a parent made on the way: the agent's
        await guest.channel.symlink("/nowhere", guest.path("l"), uid=4321)
        assert os.lstat(guest.path("l"))[4:6] == (4321, 0)  # the link itself, as lchown


@pytest.mark.skipif(os.geteuid() != 0, reason="starts the agent as another user")
@pytest.mark.asyncio
async def test_permission_errors_come_back_typed(tmp_path: Path) -> None:
    async with unprivileged(tmp_path) as guest:
        locked = guest.dir / "locked"
        locked.mkdir(mode=0o555)
        os.chown(locked, 65534, 65534)
        (guest.dir / "unreadable").write_bytes(b"x")
        os.chmod(guest.dir / "unreadable", 0o000)
        os.chown(guest.dir / "unreadable", 0, 0)
        for call, name in (
            (guest.channel.put_file(b"x", str(locked / "f")), "locked/f"),
            (guest.channel.mkdir(str(locked / "d")), "locked/d"),
            (
                guest.channel.get_file(str(guest.dir / "unreadable"), tmp_path / "x"),
                "unreadable",
            ),
        ):
            with pytest.raises(GuestFileError) as caught:
                await call
            assert caught.value.errno_name == "EACCES", name
            assert caught.value.path == str(guest.dir / name)
        with pytest.raises(GuestFileError) as owner:
            await guest.channel.put_file(b"x", str(guest.dir / "f"), uid=0)
        assert (owner.value.code, owner.value.errno_name) == ("permission", "EPERM")
        assert "not run as root" in str(owner.value)
        with pytest.raises(GuestFileError) as dir_owner:
            await guest.channel.mkdir(str(guest.dir / "d"), gid=0)
        assert (dir_owner.value.code, dir_owner.value.errno_name) == ("permission", "EPERM")
        assert os.listdir(locked) == [] and not (guest.dir / "f").exists()
        assert not (guest.dir / "d").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="owning files by another user needs root")
@pytest.mark.asyncio
async def test_put_tree_gives_every_entry_it_makes_the_owner(tmp_path: Path) -> None:
    local = modes_tree(tmp_path)
    (local / "setuid").write_bytes(b"x")
    os.chmod(local / "setuid", 0o4755)  # chown clears set-id bits: the mode comes after
    expected = snapshot(local, top=True)
    async with running(tmp_path) as guest:
        copy = Path(guest.path("tree"))
        await guest.channel.put_tree(local, str(copy), uid=1234, gid=5678)
        assert snapshot(copy, top=True) == expected
        owners = {
            os.path.relpath(os.path.join(d, n), copy): os.lstat(os.path.join(d, n))[4:6]
            for d, ds, ns in os.walk(copy)
            for n in ds + ns
        }
        assert "private/link" in owners and "ro/inner/deep" in owners
        assert set(owners.values()) == {(1234, 5678)}, owners
        assert os.stat(copy)[4:6] == (1234, 5678)
        # Only gid: the uid is the agent's.
        await guest.channel.put_tree(local / "private", guest.path("gid-only"), gid=5678)
        assert os.lstat(guest.path("gid-only", "link"))[4:6] == (0, 5678)
        assert os.stat(guest.path("gid-only", "odd", "run"))[4:6] == (0, 5678)


@pytest.mark.asyncio
async def test_put_tree_with_an_owner_needs_a_root_agent_and_makes_nothing(
    tmp_path: Path,
) -> None:
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "f").write_bytes(b"x")
    agent = unprivileged(tmp_path) if os.geteuid() == 0 else running(tmp_path)
    async with agent as guest:
        for owner in ({"uid": 0}, {"gid": 0}):
            with pytest.raises(GuestFileError) as refused:
                await guest.channel.put_tree(local, str(guest.dir / "tree"), **owner)
            assert (refused.value.code, refused.value.errno_name) == ("permission", "EPERM")
            assert "not run as root" in str(refused.value)
            assert refused.value.path == str(guest.dir / "tree")
            assert not (guest.dir / "tree").exists()
        with pytest.raises(UsageError):
            await guest.channel.put_tree(local, str(guest.dir / "tree"), uid=-1)
        await guest.channel.put_tree(local, str(guest.dir / "tree"))
        assert (guest.dir / "tree" / "sub" / "f").read_bytes() == b"x"


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
@pytest.mark.asyncio
async def test_a_full_disk_fails_the_put_and_leaves_nothing(tmp_path: Path) -> None:
    async with running(tmp_path) as guest:
        with tiny_tmpfs(guest.dir / "small", "1m") as small:
            with pytest.raises(GuestFileError) as caught:
                await guest.channel.put_file(os.urandom(3 * MiB), str(small / "big"))
            assert caught.value.errno_name == "ENOSPC"
            assert os.listdir(small) == []
            await guest.channel.put_file(b"small enough", str(small / "f"))
            assert (small / "f").read_bytes() == b"small enough"

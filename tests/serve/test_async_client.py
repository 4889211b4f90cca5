"""The asyncio client of the control API against a real ``serve`` and agent: the calls it
shares with the blocking client, and processes streamed over the exec WebSocket with the
library's process API (streams, stdin and its end, signals, a terminal, flow control, errors),
each leaving nothing running in the guest."""

from __future__ import annotations

import asyncio
import errno
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.agent_process import STARTS_WITHIN, live_members
from tests.daemon_process import (
    LONG,
    Daemon,
    Stack,
    free_tcp_port,
    serve_with_agent,
    stack,
    wait_for_guest,
)
from vsock_async import DEVNULL, PIPE, STDOUT
from vsock_async.errors import ClosedLocally, ConnectFailed, StdinClosed, UsageError
from vsock_async.serve.control_client import AsyncControlClient, ControlError, RemoteProcess

__all__ = ["stack"]


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with serve_with_agent() as (served, _):
        yield served


def client_of(daemon: Daemon) -> AsyncControlClient:
    return AsyncControlClient(f"unix:{daemon.control_socket}", timeout=LONG)


async def gone(pid: int | None) -> None:
    assert pid is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LONG
    while live_members(pid):
        if loop.time() > deadline:
            pytest.fail(f"process group {pid} still running in the guest")
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_the_calls_it_shares_with_the_blocking_client(daemon: Daemon) -> None:
    async with client_of(daemon) as client:
        assert (await client.health())["status"] == "ok"
        (guest,) = await client.guests()
        assert guest["key"] == "vm1" and guest["protocol"] == "v2"
        assert (await client.guest("vm1", wait=1))["key"] == "vm1"
        outcome = await client.run("vm1", ["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (outcome.stdout, outcome.stderr, outcome.exit_code) == (b"out\n", b"err\n", 3)
        assert (await client.probe("vm1"))["ok"] is True
        assert "vsock_async_commands_total 1" in (await client.metrics()).splitlines()
        with pytest.raises(ControlError) as caught:
            await client.guest("vm9")
    assert (caught.value.status, caught.value.code) == (404, "guest_not_found")


@pytest.mark.asyncio
async def test_an_unreachable_daemon_is_connect_failed(tmp_path: Path) -> None:
    async with AsyncControlClient(f"unix:{tmp_path / 'none.sock'}") as client:
        with pytest.raises(ConnectFailed, match="is `vsock-async serve` running"):
            await client.guests()
        with pytest.raises(ConnectFailed, match="is `vsock-async serve` running"):
            await client.create_process("vm1", "true")


@pytest.mark.asyncio
async def test_a_process_with_stdin_stdout_stderr(daemon: Daemon) -> None:
    async with client_of(daemon) as client:
        proc = await client.create_process(
            "vm1", ["sh", "-c", "cat; echo done >&2; exit 5"], stdin=PIPE
        )
        assert isinstance(proc, RemoteProcess) and isinstance(proc.pid, int)
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(b"line one\n")
        await proc.stdin.drain()
        assert await proc.stdout.readline() == b"line one\n"
        proc.stdin.writelines([b"two", b"\n"])
        proc.stdin.write_eof()
        await proc.stdin.wait_closed()
        assert await proc.stdout.read() == b"two\n"
        assert await proc.stderr.read() == b"done\n"
        assert await proc.wait() == 5
        assert (proc.returncode, proc.exit_signal, proc.timed_out) == (5, None, False)
        with pytest.raises(UsageError, match="after write_eof"):
            proc.stdin.write(b"late")
        await proc.aclose()
    await gone(proc.pid)


@pytest.mark.asyncio
async def test_stderr_merged_into_stdout_in_the_order_written(daemon: Daemon) -> None:
    async with client_of(daemon) as client:
        proc = await client.create_process(
            "vm1", ["sh", "-c", "echo a; echo b >&2; echo c; exit 7"], stderr=STDOUT
        )
        assert proc.stderr is None
        assert await proc.communicate() == (b"a\nb\nc\n", None)
        assert proc.returncode == 7
        piped = await client.create_process("vm1", "echo out; echo err >&2", stderr=PIPE)
        assert await piped.communicate() == (b"out\n", b"err\n")
        with pytest.raises(UsageError, match="stderr must be PIPE or STDOUT"):
            await client.create_process("vm1", "true", stderr=DEVNULL)
        with pytest.raises(UsageError, match="a tty merges stderr"):
            await client.create_process("vm1", "true", stderr=PIPE, pty=(24, 80))


@pytest.mark.asyncio
async def test_large_input_and_output_flow_through_small_windows(daemon: Daemon) -> None:
    data = bytes(range(256)) * 16384  # 4 MiB
    async with client_of(daemon) as client:
        proc = await client.create_process("vm1", ["cat"], stdin=PIPE, limit=16384)
        assert proc.stdin is not None

        async def feed() -> None:
            assert proc.stdin is not None
            for start in range(0, len(data), 100_000):
                proc.stdin.write(data[start : start + 100_000])
                await proc.stdin.drain()
            proc.stdin.write_eof()

        feeding = asyncio.ensure_future(feed())
        received = await proc.stdout.read()
        await feeding
        assert received == data
        assert await proc.wait() == 0


@pytest.mark.asyncio
async def test_unread_output_holds_the_process_back(daemon: Daemon) -> None:
    progress = daemon.directory / "client-progress"
    total = 64 << 20
    code = (
        "import os\n"
        "written = 0\n"
        f"while written < {total}:\n"
        "    written += os.write(1, b'y' * 65536)\n"
        f"    open({str(progress)!r} + '.tmp', 'w').write(str(written))\n"
        f"    os.replace({str(progress)!r} + '.tmp', {str(progress)!r})\n"
    )
    async with client_of(daemon) as client:
        proc = await client.create_process("vm1", [sys.executable, "-c", code], limit=65536)
        loop = asyncio.get_running_loop()
        last, unchanged, deadline = "", 0, loop.time() + LONG
        while unchanged < 25:  # the writer stops: its pipe is full, nobody reads
            assert loop.time() < deadline, "the writer never stopped"
            now = progress.read_text() if progress.exists() else ""
            unchanged = unchanged + 1 if now and now == last else 0
            last = now
            await asyncio.sleep(0.02)
        assert int(last) < 16 << 20
        total_read = 0
        while chunk := await proc.stdout.read(1 << 20):
            total_read += len(chunk)
        assert total_read == total
        assert await proc.wait() == 0


@pytest.mark.asyncio
async def test_signals_and_the_exit_signal(daemon: Daemon) -> None:
    async with client_of(daemon) as client:
        proc = await client.create_process("vm1", ["sleep", "30"])
        proc.send_signal(signal.SIGINT)
        assert await proc.wait() == -signal.SIGINT
        assert proc.exit_signal == signal.SIGINT
        proc.terminate()  # once ended: nothing, as with subprocess
        proc = await client.create_process("vm1", ["sleep", "30"])
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL
        with pytest.raises(UsageError, match="a signal is"):
            proc.send_signal(0)


@pytest.mark.asyncio
async def test_a_terminal_and_its_size(daemon: Daemon) -> None:
    async with client_of(daemon) as client:
        proc = await client.create_process(
            "vm1", "stty size; read x; stty size; echo oops >&2", stdin=PIPE, pty=(24, 80)
        )
        assert proc.stderr is None and proc.stdin is not None
        assert await proc.stdout.readuntil(b"24 80") == b"24 80"
        await proc.resize(40, 100)
        proc.stdin.write(b"\n")
        rest = await proc.stdout.read()
        assert b"40 100" in rest and b"oops" in rest
        assert await proc.wait() == 0
        with pytest.raises(UsageError, match="terminal rows"):
            await proc.resize(0, 80)
        plain = await client.create_process("vm1", "true")
        with pytest.raises(UsageError, match="needs a process started with pty"):
            await plain.resize(10, 10)
        await plain.wait()


@pytest.mark.asyncio
async def test_the_timeout_and_stdin_after_the_exit(daemon: Daemon) -> None:
    async with client_of(daemon) as client:
        proc = await client.create_process("vm1", ["sleep", "30"], timeout=STARTS_WITHIN)
        assert await proc.wait() == -signal.SIGTERM
        assert proc.timed_out is True
        proc = await client.create_process("vm1", "exit 0", stdin=PIPE)
        assert await proc.wait() == 0
        assert proc.stdin is not None
        proc.stdin.write(b"nobody reads this")
        with pytest.raises(StdinClosed):
            await proc.stdin.drain()


@pytest.mark.asyncio
async def test_errors_come_with_the_daemons_codes(daemon: Daemon) -> None:
    async with client_of(daemon) as client:
        with pytest.raises(ControlError) as caught:
            await client.create_process("vm1", ["/no/such/program"])
        assert (caught.value.status, caught.value.code) == (422, "spawn_failed")
        assert caught.value.body["errno"] == errno.errorcode[errno.ENOENT]
        with pytest.raises(ControlError) as caught:
            await client.create_process("vm9", "true")
        assert caught.value.code == "guest_not_found"
        with pytest.raises(ControlError) as caught:  # over 2 x --max-command + 64 KiB
            await client.create_process("vm1", "true", env={"PAD": "x" * (3 << 20)})
        assert (caught.value.status, caught.value.code) == (413, "body_too_large")
        with pytest.raises(UsageError, match="command must be"):
            await client.create_process("vm1", [])
        with pytest.raises(UsageError, match="stdin must be PIPE or DEVNULL"):
            await client.create_process("vm1", "true", stdin=STDOUT)


@pytest.mark.asyncio
async def test_closing_the_process_stops_it_in_the_guest(daemon: Daemon) -> None:
    async with client_of(daemon) as client:
        async with await client.create_process("vm1", "sleep 30 & sleep 30; wait") as proc:
            assert live_members(proc.pid or 0)
        await gone(proc.pid)
        with pytest.raises(ClosedLocally, match="closed by this client"):
            await proc.wait()


@pytest.mark.asyncio
async def test_a_dropped_guest_fails_the_process_with_guest_failed(stack: Stack) -> None:
    daemon = stack.daemon("--probe-interval", "none")
    stack.agent(daemon.guest_address)
    wait_for_guest(daemon.client(), "vm1")
    async with client_of(daemon) as client:
        proc = await client.create_process("vm1", ["sleep", "30"])
        await client.drop("vm1")
        with pytest.raises(ControlError) as caught:
            await proc.wait()
        assert caught.value.code == "guest_failed"
        with pytest.raises(ControlError):
            await proc.stdout.read()
    await gone(proc.pid)


@pytest.mark.asyncio
async def test_a_v1_guest_is_unsupported_and_a_token_is_required_over_tcp(
    stack: Stack,
) -> None:
    token_file = stack.directory / "token"
    token_file.write_text("s3cret\n")
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    daemon = stack.daemon(
        "--probe-interval",
        "none",
        "--protocol",
        "v1",
        "--control",
        address,
        "--token-file",
        str(token_file),
        ready=False,
    )
    daemon.wait_ready(daemon.client(token="s3cret", address=address))
    stack.agent(daemon.guest_address)
    wait_for_guest(daemon.client(token="s3cret", address=address), "vm1")
    async with AsyncControlClient(address, token="wrong") as client:
        with pytest.raises(ControlError) as caught:
            await client.guests()
        assert caught.value.code == "unauthorized"
        with pytest.raises(ControlError) as caught:
            await client.create_process("vm1", "true")
        assert (caught.value.status, caught.value.code) == (401, "unauthorized")
    async with AsyncControlClient(address, token="s3cret") as client:
        with pytest.raises(ControlError) as caught:
            await client.create_process("vm1", "true")
        assert (caught.value.status, caught.value.code) == (409, "unsupported")
        assert (await client.run("vm1", "echo v1")).stdout == b"v1\n"


@pytest.mark.asyncio
async def test_files_go_both_ways_streamed(daemon: Daemon, tmp_path: Path) -> None:
    base = tmp_path / "async-files"
    data = bytes(range(256)) * 5000 + b"tail"

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    async with client_of(daemon) as client:
        placed = await client.put_file("vm1", str(base / "deep" / "f.bin"), pieces(), mode=0o600)
        assert placed["size"] == len(data)
        assert (base / "deep" / "f.bin").read_bytes() == data
        assert (base / "deep" / "f.bin").stat().st_mode & 0o777 == 0o600
        await client.put_file("vm1", str(base / "small"), b"small bytes")
        back = b"".join(
            [piece async for piece in client.read_file("vm1", str(base / "deep/f.bin"))]
        )
        assert back == data
        info = await client.stat_file("vm1", str(base / "small"))
        assert info["size"] == len(b"small bytes")
        await client.make_directory("vm1", str(base / "d1" / "d2"), parents=True)
        await client.make_symlink("vm1", "small", str(base / "link"))
        await client.set_attributes("vm1", str(base / "d1"), mode=0o701, mtime=1e9)
        st = (base / "d1").stat()
        assert (st.st_mode & 0o7777, st.st_mtime) == (0o701, 1e9)
        names = sorted(e["name"] for e in await client.list_files("vm1", str(base)))
        assert names == ["d1", "deep", "link", "small"]
        with pytest.raises(ControlError) as missing:
            async for _ in client.read_file("vm1", str(base / "nope")):
                pass
        assert (missing.value.status, missing.value.code) == (404, "file_not_found")
        await client.remove_file("vm1", str(base), recursive=True)
        assert not base.exists()


@pytest.mark.asyncio
async def test_communicate_as_the_library_process_does(daemon: Daemon) -> None:
    data = b"0123456789" * 300_000  # more than the windows both ways
    async with client_of(daemon) as client:
        proc = await client.create_process("vm1", ["sh", "-c", "cat; echo done >&2"], stdin=PIPE)
        assert await proc.communicate(data) == (data, b"done\n")
        assert proc.returncode == 0
        quiet = await client.create_process("vm1", ["true"])
        with pytest.raises(UsageError, match="stdin=PIPE"):
            await quiet.communicate(b"x")
        assert await quiet.communicate() == (b"", b"")

"""AF_VSOCK on this machine itself: create, bind, listen, time out. Never connect (the guard)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys

import pytest

import vsock_async
from vsock_async import AcceptTimeout, ConnectFailed, InvalidAddress, UsageError

HAS_VSOCK = hasattr(socket, "AF_VSOCK")


def _vsock_available() -> bool:
    if not HAS_VSOCK:
        return False
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


needs_vsock = pytest.mark.skipif(not _vsock_available(), reason="no AF_VSOCK in this kernel")


@needs_vsock
@pytest.mark.asyncio
async def test_listen_on_vsock_and_accept_times_out() -> None:
    port = random.randint(20_000, 60_000)
    async with await vsock_async.listen(f"vsock://any:{port}", allowed_cids={3}) as server:
        assert server.addresses == [vsock_async.VsockAddress(socket.VMADDR_CID_ANY, port)]
        sock = server.sockets[0]
        assert sock.family == socket.AF_VSOCK
        assert sock.getsockname()[1] == port
        with pytest.raises(AcceptTimeout) as info:
            await server.accept(timeout=0.2)
        assert isinstance(info.value, TimeoutError)
        assert f"vsock://any:{port}" in str(info.value)
        assert server.channels == []


@needs_vsock
@pytest.mark.asyncio
async def test_vsock_port_in_use_is_a_clear_error() -> None:
    port = random.randint(20_000, 60_000)
    async with vsock_async.listen(f"vsock://any:{port}"):
        with pytest.raises(vsock_async.ListenFailed, match="already in use"):
            await vsock_async.listen(f"vsock://any:{port}")


def test_the_suite_runs_with_the_guard_set() -> None:
    assert os.environ.get("VSOCK_ASYNC_FORBID_VSOCK_CONNECT") == "1"


@pytest.mark.asyncio
@pytest.mark.parametrize("address", ["vsock://host:1024", "vsock://local:1", "vsock://3:52"])
async def test_guard_refuses_every_vsock_connect(address: str) -> None:
    with pytest.raises(ConnectFailed, match="VSOCK_ASYNC_FORBID_VSOCK_CONNECT=1"):
        await vsock_async.connect(address, timeout=1)


def test_guard_reaches_child_processes() -> None:
    code = (
        "import asyncio, vsock_async\n"
        "async def main():\n"
        "    try:\n"
        "        await vsock_async.connect('vsock://host:1024', timeout=1)\n"
        "    except vsock_async.ConnectFailed as e:\n"
        "        print('refused:', e)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.startswith("refused:") and "FORBID" in out.stdout


@pytest.mark.asyncio
async def test_bad_addresses_fail_clearly() -> None:
    with pytest.raises(InvalidAddress, match="expected vsock://CID:PORT"):
        await vsock_async.listen("vsock:1024")
    with pytest.raises(InvalidAddress, match="neither a number nor one of any, local, host"):
        await vsock_async.listen("vsock://hots:1024")
    with pytest.raises(UsageError):
        await vsock_async.listen("tcp://127.0.0.1:99999")

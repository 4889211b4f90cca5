"""Who may reach the server's sockets. CID allowlists need real CIDs and live in the VM tier."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from vsock_async import ListenFailed, UsageError, listen


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["unix", "tcp", "hvsock"])
async def test_allowed_cids_is_refused_where_no_cid_is_reported(socket_dir: str, kind: str) -> None:
    """A CID allowlist on a listener that cannot see CIDs would admit everyone: refuse it."""
    address = {
        "unix": f"unix:{socket_dir}/g.sock",
        "tcp": "tcp://127.0.0.1:0",
        "hvsock": f"hvsock:{socket_dir}/v.sock:1024",
    }[kind]
    with pytest.raises(UsageError, match="allowed_cids"):
        await listen(address, allowed_cids={3})
    assert os.listdir(socket_dir) == []  # nothing was bound


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["unix", "hvsock"])
async def test_socket_files_are_owner_only(socket_dir: str, kind: str) -> None:
    old = os.umask(0)  # the mode must not depend on the umask, even a permissive one
    try:
        address = (
            f"unix:{socket_dir}/g.sock" if kind == "unix" else f"hvsock:{socket_dir}/v.sock:1024"
        )
        async with await listen(address) as server:
            path = server.sockets[0].getsockname()
            mode = os.stat(path).st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o600
    finally:
        os.umask(old)


@pytest.mark.asyncio
async def test_listening_never_clobbers_a_file_that_is_not_a_socket(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "precious")
    with open(path, "w") as f:
        f.write("data")
    with pytest.raises(ListenFailed, match="not a socket"):
        await listen(f"unix:{path}")
    with open(path) as f:
        assert f.read() == "data"


@pytest.mark.asyncio
async def test_listening_never_hijacks_a_live_listener(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "live.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        live.bind(path)
        live.listen()
        with pytest.raises(ListenFailed, match="in use"):
            await listen(f"unix:{path}")
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        live.close()

"""Real AF_VSOCK, run inside the tier's QEMU guest (see docs/testing.md), never on the host.

The guest has no vsock device: vsock_loopback is its only transport, so connections to CID 1
(local) and CID 2 (host) both stay inside it, and the kernel reports every peer as CID 1.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import pytest

from tests.vm.plugin import in_vm

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

"""Address parsing and formatting (pure)."""

from __future__ import annotations

import pytest

from vsock_async import (
    Address,
    HybridVsockAddress,
    InvalidAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)


@pytest.mark.parametrize(
    ("text", "parsed", "formatted"),
    [
        ("vsock://any:1024", VsockAddress(0xFFFFFFFF, 1024), "vsock://any:1024"),
        ("vsock://host:1024", VsockAddress(2, 1024), "vsock://host:1024"),
        ("vsock://local:5", VsockAddress(1, 5), "vsock://local:5"),
        ("vsock://hypervisor:5", VsockAddress(0, 5), "vsock://hypervisor:5"),
        ("vsock://42:52", VsockAddress(42, 52), "vsock://42:52"),
        ("vsock://2:1024", VsockAddress(2, 1024), "vsock://host:1024"),
        ("unix:/run/x.sock", UnixAddress("/run/x.sock"), "unix:/run/x.sock"),
        ("unix:rel/x.sock", UnixAddress("rel/x.sock"), "unix:rel/x.sock"),
        ("unix:///run/x.sock", UnixAddress("/run/x.sock"), "unix:/run/x.sock"),
        ("tcp://127.0.0.1:80", TcpAddress("127.0.0.1", 80), "tcp://127.0.0.1:80"),
        ("tcp://[::1]:80", TcpAddress("::1", 80), "tcp://[::1]:80"),
        ("tcp://localhost:0", TcpAddress("localhost", 0), "tcp://localhost:0"),
        ("hvsock:/srv/vm/v.sock:1024", HybridVsockAddress("/srv/vm/v.sock", 1024), None),
        ("hvsock:/a:b/v.sock:52", HybridVsockAddress("/a:b/v.sock", 52), None),
    ],
)
def test_parse_and_format(text: str, parsed: Address, formatted: str | None) -> None:
    assert parse_address(text) == parsed
    assert str(parsed) == (formatted or text)
    assert parse_address(str(parsed)) == parsed
    assert parse_address(parsed) is parsed


def test_hybrid_listen_path_follows_firecracker() -> None:
    assert HybridVsockAddress("/srv/vm/v.sock", 1024).listen_path == "/srv/vm/v.sock_1024"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is not an address"),
        ("vsock:1024", "is not an address"),
        ("http://x:1", "is not an address"),
        ("vsock://any", "missing ':PORT'"),
        ("vsock://any:http", "is not a number"),
        ("vsock://any:-1", "is not a number"),
        ("vsock://any:4294967296", "above 4294967295"),
        ("vsock://4294967296:1", "CID 4294967296 is above"),
        ("vsock://guest:1", "neither a number nor one of"),
        ("tcp://:80", "needs a host"),
        ("tcp://127.0.0.1:65536", "above 65535"),
        ("tcp://[::1:80", "unbalanced brackets"),
        ("tcp://::1]:80", "unbalanced brackets"),
        ("tcp://[[::1]]:80", "unbalanced brackets"),
        ("tcp://[]:80", "needs a host"),
        ("tcp://::1:80", r"IPv6 host in brackets, as in tcp://\[::1\]:80"),
        ("unix:", "needs a socket path"),
        ("unix:/a\0b", "NUL"),
        ("hvsock::52", "needs the VMM's socket path"),
        ("hvsock:/v.sock", "missing ':PORT'"),
    ],
)
def test_bad_addresses_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidAddress, match=message):
        parse_address(text)


def test_not_a_string() -> None:
    with pytest.raises(InvalidAddress, match="must be a string"):
        parse_address(1024)  # type: ignore[arg-type]
    assert isinstance(InvalidAddress("x"), ValueError)

"""Address strings, parsed and formatted; pure, no sockets.

=============================  =============================================================
``vsock://CID:PORT``           AF_VSOCK. CID is a number or ``any``, ``local`` (1), ``host`` (2)
                               or ``hypervisor`` (0). Listening on ``vsock://any:1024`` is
                               the usual host side; a guest dials ``vsock://host:1024``.
``hvsock:UDS_PATH:PORT``       Hybrid vsock of Firecracker and Cloud Hypervisor. Listening
                               binds ``UDS_PATH_PORT`` (where the VMM forwards a guest that
                               dials host port PORT); connecting dials ``UDS_PATH`` and sends
                               ``CONNECT PORT``.
``unix:PATH``                  A Unix stream socket (development, tests, hybrid setups).
``tcp://HOST:PORT``            TCP, for development; IPv6 hosts in brackets.
=============================  =============================================================
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from .errors import InvalidAddress

__all__ = [
    "DEFAULT_ADDRESS",
    "Address",
    "HybridVsockAddress",
    "TcpAddress",
    "UnixAddress",
    "VsockAddress",
    "parse_address",
]

VMADDR_CID_ANY = getattr(socket, "VMADDR_CID_ANY", 0xFFFF_FFFF)
VMADDR_CID_HOST = getattr(socket, "VMADDR_CID_HOST", 2)
VMADDR_CID_LOCAL = 1
VMADDR_CID_HYPERVISOR = 0
_U32_MAX = 0xFFFF_FFFF

_CID_NAMES = {
    "any": VMADDR_CID_ANY,
    "local": VMADDR_CID_LOCAL,
    "host": VMADDR_CID_HOST,
    "hypervisor": VMADDR_CID_HYPERVISOR,
}
_CID_TEXT = {v: k for k, v in _CID_NAMES.items()}

_FORMS = "vsock://CID:PORT, hvsock:UDS_PATH:PORT, unix:PATH or tcp://HOST:PORT"


@dataclass(frozen=True, slots=True)
class VsockAddress:
    """An AF_VSOCK address: context id and port."""

    cid: int
    port: int

    def __str__(self) -> str:
        return f"vsock://{_CID_TEXT.get(self.cid, self.cid)}:{self.port}"


@dataclass(frozen=True, slots=True)
class HybridVsockAddress:
    """A Firecracker / Cloud Hypervisor hybrid vsock: the VMM's Unix socket and a vsock port."""

    uds_path: str
    port: int

    @property
    def listen_path(self) -> str:
        """The Unix socket where the VMM forwards guest connections to host port ``port``."""
        return f"{self.uds_path}_{self.port}"

    def __str__(self) -> str:
        return f"hvsock:{self.uds_path}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """A Unix stream socket path."""

    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True, slots=True)
class TcpAddress:
    """A TCP host and port (for development)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


Address = VsockAddress | HybridVsockAddress | UnixAddress | TcpAddress

DEFAULT_ADDRESS = VsockAddress(VMADDR_CID_ANY, 1024)


def parse_address(address: str | Address) -> Address:
    """Parse an address string; an already parsed address is returned as it is."""
    if isinstance(address, VsockAddress | HybridVsockAddress | UnixAddress | TcpAddress):
        return address
    if not isinstance(address, str):
        raise InvalidAddress(f"an address must be a string like {_FORMS}, not {address!r}")
    text = address.strip()
    if text.startswith("vsock://"):
        cid_text, port = _split_port(text, text[len("vsock://") :], _U32_MAX)
        return VsockAddress(_parse_cid(text, cid_text), port)
    if text.startswith("hvsock:"):
        path, port = _split_port(text, text[len("hvsock:") :], _U32_MAX)
        if not path:
            raise InvalidAddress(f"{text!r}: hvsock: needs the VMM's socket path before :PORT")
        return HybridVsockAddress(path, port)
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise InvalidAddress(f"{text!r}: unix: needs a socket path, as in unix:/run/guest.sock")
        if "\0" in path:
            raise InvalidAddress(f"{text!r}: a socket path cannot hold a NUL byte")
        return UnixAddress(path)
    if text.startswith("tcp://"):
        host, port = _split_port(text, text[len("tcp://") :], 65535)
        return TcpAddress(_parse_host(text, host), port)
    raise InvalidAddress(f"{address!r} is not an address: expected {_FORMS}")


def _split_port(text: str, rest: str, max_port: int) -> tuple[str, int]:
    head, sep, port_text = rest.rpartition(":")
    if not sep:
        raise InvalidAddress(f"{text!r}: missing ':PORT' at the end")
    if not (port_text.isascii() and port_text.isdigit()):
        raise InvalidAddress(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > max_port:
        raise InvalidAddress(f"{text!r}: port {port} is above {max_port}")
    return head, port


def _parse_host(text: str, host: str) -> str:
    """The host of a tcp:// address: an IPv6 address goes in brackets, which are dropped."""
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if "[" in host or "]" in host:
        raise InvalidAddress(f"{text!r}: unbalanced brackets around the host")
    if not host:
        raise InvalidAddress(f"{text!r}: tcp:// needs a host, as in tcp://127.0.0.1:1024")
    if ":" in host and not bracketed:
        raise InvalidAddress(f"{text!r}: put an IPv6 host in brackets, as in tcp://[::1]:80")
    return host


def _parse_cid(text: str, cid_text: str) -> int:
    if cid_text in _CID_NAMES:
        return _CID_NAMES[cid_text]
    if not (cid_text.isascii() and cid_text.isdigit()):
        names = ", ".join(_CID_NAMES)
        raise InvalidAddress(f"{text!r}: CID {cid_text!r} is neither a number nor one of {names}")
    cid = int(cid_text)
    if cid > _U32_MAX:
        raise InvalidAddress(f"{text!r}: CID {cid} is above {_U32_MAX}")
    return cid

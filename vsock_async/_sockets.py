"""Socket set-up for every address kind: listening sockets and outgoing connections.

Everything that creates a socket goes through here, so the
``VSOCK_ASYNC_FORBID_VSOCK_CONNECT`` guard and the error messages live in
one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import socket
import stat
from dataclasses import dataclass

from .addresses import Address, HybridVsockAddress, TcpAddress, UnixAddress, VsockAddress
from .errors import ConnectFailed, ListenFailed, UsageError

FORBID_VSOCK_CONNECT_ENV = "VSOCK_ASYNC_FORBID_VSOCK_CONNECT"

_AF_VSOCK_MISSING = (
    "AF_VSOCK is not available: load the kernel module "
    "(on a host: `modprobe vhost_vsock`; in a guest: `modprobe vmw_vsock_virtio_transport`)"
)


@dataclass(frozen=True, slots=True)
class UnixSocketOptions:
    """Permissions given to a Unix socket file this library creates.

    The default 0600 lets only the owner connect. Firecracker's jailer runs
    the VMM as another user inside a chroot: give that user's group and
    ``mode=0o660``, or make it the owner.
    """

    mode: int = 0o600
    owner: int | str | None = None
    group: int | str | None = None


def vsock_connect_forbidden() -> bool:
    """True when the safety guard forbids every AF_VSOCK connect of this process."""
    return os.environ.get(FORBID_VSOCK_CONNECT_ENV, "") not in ("", "0")


def _vsock_socket(error: type[ConnectFailed] | type[ListenFailed]) -> socket.socket:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise error(_AF_VSOCK_MISSING)
    try:
        return socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        if exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            raise error(_AF_VSOCK_MISSING) from None
        raise error(f"cannot create an AF_VSOCK socket: {exc.strerror or exc}") from exc


class SocketFile:
    """A Unix socket file this process bound, removed on close only while it is still ours.

    A successor may have replaced the file since (a restart racing this one's
    exit): its inode tells them apart, so we never unlink someone else's socket.
    """

    __slots__ = ("_inode", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self._inode = os.stat(path).st_ino

    def remove(self) -> None:
        """Unlink the file if it is still the one we bound."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


def listen_path(address: UnixAddress | HybridVsockAddress) -> str:
    """The filesystem path a listener on ``address`` binds."""
    return address.path if isinstance(address, UnixAddress) else address.listen_path


def bind_listener(
    address: Address,
    *,
    backlog: int = 128,
    unix: UnixSocketOptions | None = None,
) -> socket.socket:
    """A bound, listening, non-blocking socket for ``address``; clear ListenFailed otherwise."""
    if isinstance(address, VsockAddress):
        sock = _vsock_socket(ListenFailed)
        target: tuple[int, int] | tuple[str, int] | str = (address.cid, address.port)
    elif isinstance(address, TcpAddress):
        infos = _resolve(address, ListenFailed)
        family, _, _, _, target = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    else:
        path = listen_path(address)
        _remove_stale_socket(path, address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = path
    try:
        try:
            sock.bind(target)
        except OSError as exc:
            raise ListenFailed(_bind_error(address, exc)) from None
        if isinstance(target, str):
            _apply_unix_options(target, unix or UnixSocketOptions(), address)
        # listen() comes after chmod/chown: no connection can arrive while the mode is wider.
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if isinstance(target, str):
            with contextlib.suppress(OSError):
                os.unlink(target)
        raise
    return sock


def stop_polling_accepts(sock: socket.socket) -> None:
    """Make the running loop stop accepting on ``sock`` (left open): call before Server.close().

    asyncio accepts in a reader callback and attaches each new transport to its Server
    in a task one loop iteration later; a Server.close() in between fails that task and
    strands the accepted socket, open and unread, so its peer hangs (CPython gh-109564).
    Remove the reader, let one loop iteration pass, and only then close the Server.
    """
    if sock.fileno() >= 0:
        asyncio.get_running_loop().remove_reader(sock.fileno())


def _bind_error(address: Address, exc: OSError) -> str:
    reason = {
        errno.EADDRINUSE: "address already in use",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EADDRNOTAVAIL: "address not available on this machine",
        errno.ENOENT: "directory does not exist",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    if isinstance(address, VsockAddress) and exc.errno == errno.EADDRNOTAVAIL:
        reason += " (bind vsock://any:PORT, or load vhost_vsock to bind the host CID)"
    return f"cannot listen on {address}: {reason}"


def _remove_stale_socket(path: str, address: Address) -> None:
    """Unlink a socket file left by a crashed run; refuse to touch a live or non-socket file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenFailed(f"cannot listen on {address}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenFailed(f"cannot listen on {address}: {path} exists and is not a socket")
    live = _listening_on(path, st)
    if live is None:
        live = _answers_connect(path, address)
    if live:
        raise ListenFailed(f"cannot listen on {address}: address already in use (a live listener)")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


_PROC_NET_UNIX = "/proc/net/unix"
_SO_ACCEPTCON = 0x10000  # the Flags column of a listening socket
# "%pK: %08X %08X %08X %04X %02X %5lu", then " PATH" for a bound socket (net/unix/af_unix.c)
_PROC_NET_UNIX_LINE = re.compile(
    rb"[0-9A-Fa-f]+: [0-9A-F]{8} [0-9A-F]{8} ([0-9A-F]{8}) [0-9A-F]{4} [0-9A-F]{2} +[0-9]+"
    rb"(?: (.*))?"
)


def _listening_on(path: str, st: os.stat_result) -> bool | None:
    """Whether a listening socket is bound to the file ``st`` at ``path``, per /proc/net/unix.

    Unlike a connect(), reading the table is invisible to the listener: a live
    CommandServer never sees the check as a guest. None when the table cannot
    tell: no /proc, a path holding a newline, or a listener bound by a relative
    path with our file's name (relative to a directory we cannot know). The
    table covers this network namespace only.
    """
    wanted = os.fsencode(path)
    if b"\n" in wanted:
        return None
    try:
        with open(_PROC_NET_UNIX, "rb") as table:
            lines = table.read().split(b"\n")[1:]
    except OSError:
        return None
    name = os.path.basename(wanted)
    unsure = False
    for line in lines:
        entry = _PROC_NET_UNIX_LINE.fullmatch(line)
        if entry is None or not int(entry[1], 16) & _SO_ACCEPTCON:
            continue
        bound = entry[2]
        if bound is None or os.path.basename(bound) != name:
            continue
        if not os.path.isabs(bound):
            unsure = True
            continue
        try:
            other = os.lstat(bound)
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return None if unsure else False


def _answers_connect(path: str, address: Address) -> bool:
    """Whether something accepts connections at ``path``: the check of last resort.

    A live CommandServer takes it for a guest that connects and leaves at once.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return False
    except OSError as exc:
        raise ListenFailed(f"cannot listen on {address}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    return True


def _apply_unix_options(path: str, options: UnixSocketOptions, address: Address) -> None:
    try:
        if options.owner is not None or options.group is not None:
            uid = _user_id(options.owner) if options.owner is not None else -1
            gid = _group_id(options.group) if options.group is not None else -1
            os.chown(path, uid, gid)
        os.chmod(path, options.mode)
    except OSError as exc:
        raise ListenFailed(
            f"cannot set owner/mode of {path} for {address}: {exc.strerror or exc}"
        ) from None


def _user_id(owner: int | str) -> int:
    if isinstance(owner, int):
        return owner
    import pwd

    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise UsageError(f"unknown user {owner!r} for the socket owner") from None


def _group_id(group: int | str) -> int:
    if isinstance(group, int):
        return group
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise UsageError(f"unknown group {group!r} for the socket group") from None


def _resolve(
    address: TcpAddress, error: type[ConnectFailed] | type[ListenFailed]
) -> list[tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[str, int]]]:
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV
        )
    except socket.gaierror as exc:
        raise error(f"cannot resolve {address}: {exc.strerror}") from None
    return [(f, t, p, c, (str(a[0]), int(a[1]))) for f, t, p, c, a in infos]


async def connect_socket(address: Address) -> socket.socket:
    """A connected non-blocking socket to ``address`` (no deadline here: the caller sets one).

    For ``hvsock:`` this is the raw connection to the VMM's socket, before
    the ``CONNECT`` handshake.
    """
    loop = asyncio.get_running_loop()
    if isinstance(address, VsockAddress):
        if vsock_connect_forbidden():
            raise ConnectFailed(
                f"refusing to connect to {address}: AF_VSOCK connects are forbidden in this"
                f" process ({FORBID_VSOCK_CONNECT_ENV}=1)"
            )
        sock = _vsock_socket(ConnectFailed)
        target: object = (address.cid, address.port)
    else:
        if isinstance(address, TcpAddress):
            family, _, _, _, target = _resolve(address, ConnectFailed)[0]
        else:
            family = socket.AF_UNIX
            target = address.path if isinstance(address, UnixAddress) else address.uds_path
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # EMFILE, ENOBUFS: a ConnectFailed that callers retry and log
            raise ConnectFailed(f"cannot connect to {address}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, target)  # type: ignore[arg-type]
    except OSError as exc:
        sock.close()
        raise ConnectFailed(
            f"cannot connect to {address}: {_connect_reason(address, exc)}"
        ) from exc
    except BaseException:
        sock.close()
        raise
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _connect_reason(address: Address, exc: OSError) -> str:
    if isinstance(address, VsockAddress) and exc.errno == errno.ECONNRESET:
        return "connection reset (nothing listens on that vsock port)"
    if isinstance(address, VsockAddress) and exc.errno == errno.ENODEV:
        return "no such CID (no VM with that context id, or no vsock transport)"
    return exc.strerror or str(exc)

"""Files in the guest over a protocol v2 connection: put, get, read, stat, listdir, remove,
mkdir, symlink, and whole trees.

Each operation is a stream of its own (docs/protocol.md, "File streams"), so
transfers and processes share one connection. Bytes move within the stream's
credit through the reader and writer a process's output and stdin use
(:class:`~.process.ProcessReader`, :class:`~.process.ProcessWriter`): a
transfer holds a few MiB at most, never a whole file. Both sides compute the
SHA-256 of the bytes as they stream. A put is renamed into place in the guest
only once the agent's digest matches the host's; a get is renamed into place
on the host only once the host's matches the agent's (a mismatch there means
the guest is broken: :class:`ProtocolError`, the connection closed).

Guest paths are absolute (``str``, ``bytes`` or ``os.PathLike``); a relative
one is a :class:`UsageError`. A failure in the guest is a
:class:`GuestFileError` carrying the errno name and the path; a local
failure is the ``OSError`` the host's own system raised.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import math
import os
import stat as stat_module
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypedDict, Unpack

from .._digest import BackgroundDigest
from ..errors import GuestFileError, ProtocolError, UsageError, VsockAsyncError
from ..protocol.v1_host import copy_error
from ..protocol.v2 import Channel
from . import local
from .process import ProcessReader, ProcessWriter, _wire_string

if TYPE_CHECKING:
    from .session import SessionConnection

__all__ = [
    "DEFAULT_WINDOW",
    "FileInfo",
    "FileStream",
    "PutOptions",
    "get_file",
    "get_tree",
    "listdir",
    "mkdir",
    "put_file",
    "put_tree",
    "read_file",
    "remove",
    "set_attributes",
    "stat",
    "symlink",
]

logger = logging.getLogger("vsock_async")

DEFAULT_WINDOW: Final = 4 * 1024 * 1024
"""Bytes of a get the host holds unread: the credit it grants the agent. Four times the
largest frame, so the agent keeps sending while the host writes what came."""
_CHUNK: Final = 1024 * 1024  # bytes read from a local file at a time, and bytes slices
_LISTING_WINDOW: Final = 256 * 1024  # also the longest listing line accepted
_MAX_PATH: Final = 4096
_MODE_MAX: Final = 0o7777
_ID_MAX: Final = 0xFFFF_FFFE
_KINDS: Final = frozenset({"file", "dir", "symlink", "fifo", "socket", "char", "block", "other"})

_Owner = tuple[int | None, int | None]  # uid, gid: None leaves the agent's
GuestPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]
LocalPath = str | bytes | os.PathLike[str] | os.PathLike[bytes]
Source = (
    str
    | os.PathLike[str]
    | os.PathLike[bytes]
    | bytes
    | bytearray
    | memoryview
    | AsyncIterable[bytes | bytearray | memoryview]
)
"""What :func:`put_file` writes: a local path, or the bytes themselves (``bytes`` are content,
not a path), or an async iterable of bytes."""


class PutOptions(TypedDict, total=False):
    """The keyword arguments of ``put_file()``: see :meth:`GuestChannel.put_file`."""

    mode: int
    uid: int | None
    gid: int | None
    mtime: float | None
    make_parents: bool


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What :func:`stat` and :func:`listdir` say about a file in the guest."""

    name: str
    """Its last path component (bytes that are not UTF-8 decoded as ``os.fsdecode`` does)."""
    kind: str
    """``file``, ``dir``, ``symlink``, ``fifo``, ``socket``, ``char``, ``block`` or ``other``."""
    size: int
    mode: int
    """Permission bits, 0 to 0o7777."""
    uid: int
    gid: int
    mtime_ns: int
    target: str | None = None
    """Where a symbolic link points (``os.fsdecode`` of its bytes); None for other kinds."""

    @property
    def mtime(self) -> float:
        """The modification time in seconds since the epoch, as ``os.stat_result.st_mtime``."""
        return self.mtime_ns / 1e9


class FileStream:
    """One file operation's stream, as its connection sees it.

    Internal: the functions of this module create it and hand it to
    :meth:`SessionConnection.open_file`, which routes the stream's events here.
    """

    def __init__(
        self, connection: SessionConnection, path: bytes, *, window: int = 0, upload: bool = False
    ) -> None:
        self._connection = connection
        self.stream = 0
        self.path = path
        self.reader = ProcessReader(window, self._grant) if window else None
        self.writer = ProcessWriter(self) if upload else None
        self._done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        return f"<FileStream stream={self.stream} path={self.path!r}>"

    async def result(self) -> dict[str, Any]:
        """The RESULT object, once it arrives; :class:`GuestFileError` if the operation failed."""
        return await asyncio.shield(self._done)

    async def next_chunk(
        self, chunks: AsyncGenerator[bytes | bytearray | memoryview, None]
    ) -> bytes | bytearray | memoryview | None:
        """The next chunk of a put's source (None at its end), or the error that ended the
        stream meanwhile: a source that stalls never hides a lost connection."""
        step = asyncio.ensure_future(anext(chunks, None))
        try:
            await asyncio.wait((step, self._done), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await step
        if step.done() and not step.cancelled():
            return step.result()
        await self.result()  # raises: the stream failed (it cannot succeed before COMMIT)
        raise AssertionError("a put ended before its COMMIT")

    def give_up(self) -> None:
        """Send CLOSE if the operation has not ended: the agent stops and leaves nothing behind."""
        if not self._done.done():
            if self.reader is not None:
                self.reader._discard()
            if self.stream:
                self._connection.send_close(self.stream)

    # -- what the writer of a put calls ---------------------------------------------------

    def _send_stdin(self, data: bytes, end: bool) -> int:
        return self._connection.send_stdin(self.stream, data, end)

    def _stdin_credit(self) -> int:
        return self._connection.stdin_credit(self.stream)

    def _grant(self, n: int) -> None:
        if not self._done.done():
            self._connection.grant(self.stream, Channel.STDOUT, n)

    # -- driven by the connection ---------------------------------------------------------

    def _on_output(self, channel: Channel, data: bytes | memoryview, end: bool) -> None:
        if self.reader is not None:
            self.reader._feed(data, end)

    def _on_stdin_credit(self) -> None:
        if self.writer is not None:
            self.writer._flush()

    def _on_result(self, result: dict[str, Any]) -> None:
        self._done.set_result(result)

    def _on_error(self, code: str, message: str, errno: str | None) -> None:
        self._fail(GuestFileError(code, message, os.fsdecode(self.path), errno))

    def _on_connection_lost(self, error: VsockAsyncError) -> None:
        self._fail(error)

    def _fail(self, error: VsockAsyncError) -> None:
        if self.writer is not None:
            self.writer._ended(error)
        if self.reader is not None:
            self.reader._fail(error)
        if not self._done.done():
            self._done.set_exception(copy_error(error))
            self._done.exception()  # retrieved: nobody may ever await it


# -- arguments --------------------------------------------------------------------------------


def _guest_path(path: GuestPath) -> bytes:
    """An absolute guest path as bytes; :class:`UsageError` otherwise."""
    try:
        raw = os.fsencode(path)
    except (TypeError, UnicodeEncodeError):
        raise UsageError(f"a guest path is str, bytes or os.PathLike, not {path!r}") from None
    if not raw.startswith(b"/"):
        raise UsageError(f"guest paths are absolute: {path!r} does not start with '/'")
    if b"\0" in raw:
        raise UsageError(f"guest path {path!r} holds a NUL byte")
    if len(raw) > _MAX_PATH:
        raise UsageError(f"a guest path is at most {_MAX_PATH} bytes, not {len(raw)}")
    return raw


def _window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or not 0 < window < 2**31:
        raise UsageError(f"window must be a number of bytes in 1..{2**31 - 1}, not {window!r}")
    return window


def _join(directory: bytes, name: bytes) -> bytes:
    return directory.rstrip(b"/") + b"/" + name


def _number(value: object, what: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise UsageError(f"{what} must be an int in 0..{high}, not {value!r}")
    return value


def _mtime_ns(mtime: float | None) -> int | None:
    """``mtime`` (seconds since the epoch, or None) in nanoseconds, as the wire carries it."""
    if mtime is None:
        return None
    if isinstance(mtime, bool) or not isinstance(mtime, int | float) or not math.isfinite(mtime):
        raise UsageError(f"mtime is seconds since the epoch (a finite number), not {mtime!r}")
    seconds = math.floor(mtime)  # whole seconds apart: mtime * 1e9 would round them off
    return _number(seconds * 10**9 + round((mtime - seconds) * 1e9), "mtime (ns)", 2**63 - 1)


def _owner(uid: int | None, gid: int | None) -> dict[str, int]:
    """The ``uid``/``gid`` fields of a request, those given (checked)."""
    owner = {}
    if uid is not None:
        owner["uid"] = _number(uid, "uid", _ID_MAX)
    if gid is not None:
        owner["gid"] = _number(gid, "gid", _ID_MAX)
    return owner


def _put_request(
    path: bytes,
    mode: int,
    uid: int | None,
    gid: int | None,
    mtime_ns: int | None,
    make_parents: bool,
) -> dict[str, Any]:
    request: dict[str, Any] = {
        "op": "put",
        "path": _wire_string(path, "path"),
        "mode": _number(mode, "mode", _MODE_MAX),
        "make_parents": bool(make_parents),
    }
    request.update(_owner(uid, gid))
    if mtime_ns is not None:
        request["mtime_ns"] = _number(mtime_ns, "mtime", 2**63 - 1)
    return request


# -- what the guest sends ---------------------------------------------------------------------


def _peer_error(connection: SessionConnection, message: str) -> ProtocolError:
    """A guest that sent nonsense: the connection closes with the error, which is returned."""
    error = ProtocolError(message)
    connection.abort(error)
    return error


def _wire_bytes(value: object) -> bytes | None:
    """A byte string from the guest (a JSON string, or ``{"b64": ...}``), or None if it is not."""
    if isinstance(value, str):
        try:
            return value.encode()
        except UnicodeEncodeError:
            return None
    if isinstance(value, dict) and isinstance(value.get("b64"), str):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


_INFO_NUMBERS: Final = (
    ("size", 0, 2**63 - 1),
    ("mode", 0, _MODE_MAX),
    ("uid", 0, 2**32 - 1),
    ("gid", 0, 2**32 - 1),
    ("mtime_ns", -(2**63), 2**63 - 1),
)


def _peer_ints(
    connection: SessionConnection, obj: dict[str, Any], ranges: tuple[tuple[str, int, int], ...]
) -> dict[str, int]:
    """The integer fields ``ranges`` names, each in its range; :class:`ProtocolError` if not."""
    found = {}
    for key, low, high in ranges:
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _peer_error(
                connection, f"the guest sent {key} {value!r}, not an integer in {low}..{high}"
            )
        found[key] = value
    return found


def _info(connection: SessionConnection, obj: dict[str, Any], name: bytes) -> FileInfo:
    """A :class:`FileInfo` from the guest's stat object; :class:`ProtocolError` if malformed."""
    kind, target = obj.get("kind"), obj.get("target")
    link = None if target is None else _wire_bytes(target)
    if not isinstance(kind, str) or kind not in _KINDS or (target is not None and link is None):
        raise _peer_error(connection, f"the guest sent a malformed file description: {obj!r:.200}")
    return FileInfo(
        name=os.fsdecode(name),
        kind=kind,
        target=None if link is None else os.fsdecode(link),
        **_peer_ints(connection, obj, _INFO_NUMBERS),
    )


def _check_transfer(
    connection: SessionConnection, answer: dict[str, Any], size: int, digest: str, path: bytes
) -> None:
    """The guest's count and SHA-256 of a transfer must be the host's."""
    if answer.get("size") != size or answer.get("sha256") != digest:
        raise _peer_error(
            connection,
            f"the guest's size and SHA-256 of {path!r} ({answer.get('size')!r},"
            f" {answer.get('sha256')!r}) are not those of the {size} bytes that crossed"
            f" ({digest})",
        )


async def _simple(connection: SessionConnection, path: bytes, request: dict[str, Any]) -> Any:
    """One operation with no data, to its RESULT."""
    connection.require("files", "work with files")
    transfer = FileStream(connection, path)
    await connection.open_file(transfer, request, 0)
    try:
        return await transfer.result()
    except asyncio.CancelledError:
        transfer.give_up()
        raise


# -- metadata ---------------------------------------------------------------------------------


async def stat(
    connection: SessionConnection, guest_path: GuestPath, *, follow_symlinks: bool = True
) -> FileInfo:
    """What the guest knows of ``guest_path``; with ``follow_symlinks=False``, of a link itself."""
    path = _guest_path(guest_path)
    request = {
        "op": "stat",
        "path": _wire_string(path, "path"),
        "follow_symlinks": bool(follow_symlinks),
    }
    answer = await _simple(connection, path, request)
    return _info(connection, answer, path.rstrip(b"/").rpartition(b"/")[2] or b"/")


async def listdir(connection: SessionConnection, guest_path: GuestPath) -> list[FileInfo]:
    """The entries of the guest directory ``guest_path`` (``.`` and ``..`` excluded), in the
    order the guest lists them; links are described, not followed."""
    path = _guest_path(guest_path)
    connection.require("files", "work with files")
    transfer = FileStream(connection, path, window=_LISTING_WINDOW)
    await connection.open_file(
        transfer, {"op": "listdir", "path": _wire_string(path, "path")}, _LISTING_WINDOW
    )
    assert transfer.reader is not None
    entries: list[FileInfo] = []
    try:
        while line := await transfer.reader.readline():
            entries.append(_entry(connection, line))
        answer = await transfer.result()
    except ValueError:  # a line longer than the window
        raise _peer_error(connection, "the guest sent a listing line too long to hold") from None
    finally:
        transfer.give_up()
    if answer.get("entries") != len(entries):
        raise _peer_error(connection, f"the guest listed {len(entries)} entries, not {answer!r}")
    return entries


def _entry(connection: SessionConnection, line: bytes) -> FileInfo:
    try:
        obj = json.loads(line)
    except ValueError:
        obj = None
    name = _wire_bytes(obj.get("name")) if isinstance(obj, dict) else None
    if (
        not isinstance(obj, dict)
        or not line.endswith(b"\n")
        or not name
        or name in (b".", b"..")
        or b"/" in name
        or b"\0" in name
    ):
        raise _peer_error(connection, f"the guest sent a malformed listing line: {line[:200]!r}")
    return _info(connection, obj, name)


async def remove(
    connection: SessionConnection, guest_path: GuestPath, *, recursive: bool = False
) -> None:
    """Remove a file, link or empty directory; ``recursive=True`` removes a whole tree.

    A link is removed, never followed.
    """
    path = _guest_path(guest_path)
    request = {"op": "remove", "path": _wire_string(path, "path"), "recursive": bool(recursive)}
    await _simple(connection, path, request)


async def mkdir(
    connection: SessionConnection,
    guest_path: GuestPath,
    *,
    parents: bool = False,
    mode: int = 0o755,
    uid: int | None = None,
    gid: int | None = None,
) -> None:
    """Make a directory with exactly ``mode`` (and ``uid``/``gid`` if given: a root agent
    only); ``parents=True`` also makes missing parents and accepts an existing directory
    (left as it is), as ``mkdir -p``."""
    request = mkdir_request(guest_path, parents=parents, mode=mode, uid=uid, gid=gid)
    await _simple(connection, *request)


def mkdir_request(
    guest_path: GuestPath, *, parents: bool, mode: int, uid: int | None, gid: int | None
) -> tuple[bytes, dict[str, Any]]:
    """The path and request of :func:`mkdir`'s arguments, checked (:class:`UsageError`)."""
    path = _guest_path(guest_path)
    return path, {
        "op": "mkdir",
        "path": _wire_string(path, "path"),
        "parents": bool(parents),
        "mode": _number(mode, "mode", _MODE_MAX),
        **_owner(uid, gid),
    }


async def symlink(
    connection: SessionConnection,
    target: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    guest_path: GuestPath,
    *,
    make_parents: bool = False,
    uid: int | None = None,
    gid: int | None = None,
) -> None:
    """Make ``guest_path`` a symbolic link to ``target`` (kept as it is), replacing a file or
    link already there; owned by ``uid``/``gid`` if given (a root agent only)."""
    request = symlink_request(target, guest_path, make_parents=make_parents, uid=uid, gid=gid)
    await _simple(connection, *request)


def symlink_request(
    target: LocalPath,
    guest_path: GuestPath,
    *,
    make_parents: bool,
    uid: int | None,
    gid: int | None,
) -> tuple[bytes, dict[str, Any]]:
    """The path and request of :func:`symlink`'s arguments, checked (:class:`UsageError`)."""
    path = _guest_path(guest_path)
    link = os.fsencode(target)
    if not link or b"\0" in link:
        raise UsageError(f"a link target is not empty and holds no NUL byte: {target!r}")
    return path, {
        "op": "symlink",
        "path": _wire_string(path, "path"),
        "target": _wire_string(link, "target"),
        "make_parents": bool(make_parents),
        **_owner(uid, gid),
    }


# -- into the guest ---------------------------------------------------------------------------


async def put_file(
    connection: SessionConnection,
    source: Source,
    guest_path: GuestPath,
    **options: Unpack[PutOptions],
) -> None:
    """Write ``source`` to ``guest_path`` in the guest, whole or not at all.

    ``source`` is a local path (``str``, ``os.PathLike``), the bytes themselves
    (``bytes``, ``bytearray``, ``memoryview``) or an async iterable of bytes.
    The file gets exactly ``mode``, ``uid``/``gid`` if given (a root agent
    only: :class:`GuestFileError` ``permission`` otherwise), and ``mtime``
    (seconds since the epoch) if given; ``make_parents`` makes missing
    directories. An existing file or link at ``guest_path`` is replaced; a
    cancel or failure leaves it untouched.
    """
    await _upload(connection, *put_file_request(source, guest_path, **options))


def put_file_request(
    source: Source,
    guest_path: GuestPath,
    *,
    mode: int = 0o644,
    uid: int | None = None,
    gid: int | None = None,
    mtime: float | None = None,
    make_parents: bool = True,
) -> tuple[bytes, dict[str, Any], AsyncGenerator[bytes | bytearray | memoryview, None]]:
    """The path, request and chunks of :func:`put_file`'s arguments (their defaults are
    these), checked (:class:`UsageError`); nothing is read before the chunks are."""
    path = _guest_path(guest_path)
    request = _put_request(path, mode, uid, gid, _mtime_ns(mtime), make_parents)
    return path, request, _chunks(source)


def _chunks(source: Source) -> AsyncGenerator[bytes | bytearray | memoryview, None]:
    """``source`` as chunks of at most 1 MiB (what an async iterable yields, as it is)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return _slices(memoryview(source).cast("B"))
    if isinstance(source, str | os.PathLike):
        return _local_file(os.fspath(source))
    if isinstance(source, AsyncIterable):
        return _checked(source)
    raise UsageError(
        "put_file() takes a local path (str or os.PathLike), bytes, or an async iterable of"
        f" bytes, not {type(source).__name__}"
    )


async def _slices(view: memoryview) -> AsyncGenerator[memoryview, None]:
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


async def _local_file(path: str | bytes) -> AsyncGenerator[bytes, None]:
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while chunk := await asyncio.to_thread(os.read, fd, _CHUNK):
            yield chunk
    finally:
        os.close(fd)


async def _from_fd(fd: int) -> AsyncGenerator[bytes, None]:
    while chunk := await asyncio.to_thread(os.read, fd, _CHUNK):
        yield chunk


async def _checked(
    source: AsyncIterable[bytes | bytearray | memoryview],
) -> AsyncGenerator[bytes | bytearray | memoryview, None]:
    async for chunk in source:
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise UsageError(f"put_file() got a {type(chunk).__name__} chunk, not bytes")
        yield chunk


async def _upload(
    connection: SessionConnection,
    path: bytes,
    request: dict[str, Any],
    chunks: AsyncGenerator[bytes | bytearray | memoryview, None],
) -> None:
    """Stream ``chunks`` as the put ``request``, then COMMIT their digest; wait for RESULT."""
    connection.require("files", "work with files")
    transfer = FileStream(connection, path, upload=True)
    writer = transfer.writer
    assert writer is not None
    async with contextlib.aclosing(chunks):
        await connection.open_file(transfer, request, 0)
        try:
            digest = BackgroundDigest()
            while (chunk := await transfer.next_chunk(chunks)) is not None:
                await digest.update(chunk)  # hashed while it is sent
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
            sha256 = await digest.hexdigest()
            connection.send_commit(transfer.stream, sha256)
            answer = await transfer.result()
        except BaseException:
            transfer.give_up()
            raise
    _check_transfer(connection, answer, digest.size, sha256, path)


async def put_tree(
    connection: SessionConnection,
    local_dir: LocalPath,
    guest_dir: GuestPath,
    *,
    uid: int | None = None,
    gid: int | None = None,
) -> None:
    """Copy the local directory ``local_dir`` to ``guest_dir``, made if missing.

    Files and directories keep their permission bits and mtime exactly, as
    tar and rsync do it: a directory is made with its owner's ``rwx`` added,
    filled, and given its own mode and mtime after its entries, deepest first
    (so a read-only one is filled too). ``guest_dir`` gets those of
    ``local_dir`` only if this call makes it; an existing one keeps its mode.
    Symbolic links are copied as links, their targets as they are: never
    followed, so nothing outside ``local_dir`` is read. Other kinds of file
    (FIFOs, sockets, devices) are skipped with a log line.

    ``uid``/``gid``, if given, own every file, directory and link the call
    makes (a link itself, as ``lchown``); that needs a root agent, and one
    that is not refuses the first request, before anything is made:
    :class:`GuestFileError` ``permission``, ``EPERM``.
    """
    root = put_tree_request(guest_dir, uid, gid)
    owner = (uid, gid)
    connection.require("files", "work with files")
    fd = await asyncio.to_thread(local.open_directory, local_dir)
    try:
        st = os.fstat(fd)
        try:
            await _make_directory(connection, root, st, owner, parents=False)
            made = True
        except GuestFileError as error:
            if error.errno_name not in ("EEXIST", "ENOENT"):
                raise
            await _make_directory(connection, root, st, owner, parents=True)
            made = error.errno_name == "ENOENT"
        await _put_directory(connection, fd, root, owner)
        if made:
            await _finish_directory(connection, root, st)
    finally:
        os.close(fd)


def put_tree_request(guest_dir: GuestPath, uid: int | None, gid: int | None) -> bytes:
    """The guest directory of :func:`put_tree`'s arguments, the owner checked too
    (:class:`UsageError`), before anything is sent."""
    root = _guest_path(guest_dir)
    _owner(uid, gid)
    return root


async def _put_directory(
    connection: SessionConnection, fd: int, guest: bytes, owner: _Owner
) -> None:
    for name, st, target in await asyncio.to_thread(local.entries, fd):
        child = _join(guest, name)
        if target is not None:
            await symlink(connection, target, child, uid=owner[0], gid=owner[1])
        elif stat_module.S_ISDIR(st.st_mode):
            await _make_directory(connection, child, st, owner, parents=True)
            sub = await asyncio.to_thread(local.subdirectory, fd, name, make=False)
            try:
                await _put_directory(connection, sub, child, owner)
            finally:
                os.close(sub)
            await _finish_directory(connection, child, st)
        elif stat_module.S_ISREG(st.st_mode):
            file = await asyncio.to_thread(local.open_file, fd, name)
            try:
                mode = stat_module.S_IMODE(st.st_mode)
                request = _put_request(child, mode, *owner, st.st_mtime_ns, False)
                await _upload(connection, child, request, _from_fd(file))
            finally:
                os.close(file)
        else:
            logger.warning("put_tree skips %r: not a file, directory or link", child)


async def _make_directory(
    connection: SessionConnection,
    path: bytes,
    st: os.stat_result,
    owner: _Owner,
    *,
    parents: bool,
) -> None:
    """A directory of a tree, to be filled: the mode of ``st`` and its owner's ``rwx``."""
    mode = stat_module.S_IMODE(st.st_mode) | 0o700
    await mkdir(connection, path, parents=parents, mode=mode, uid=owner[0], gid=owner[1])


async def _finish_directory(connection: SessionConnection, path: bytes, st: os.stat_result) -> None:
    """A filled directory of a tree gets the mode and mtime of ``st``, to the nanosecond."""
    await _setattr(connection, path, stat_module.S_IMODE(st.st_mode), st.st_mtime_ns)


async def set_attributes(
    connection: SessionConnection,
    guest_path: GuestPath,
    *,
    mode: int | None = None,
    mtime: float | None = None,
) -> None:
    """Set exactly ``mode`` (permission bits) and/or ``mtime`` (seconds since the epoch) of a
    guest file or directory, ``mode`` first; a link at ``guest_path`` is refused, never
    followed (:class:`GuestFileError` ``ELOOP`` or ``EINVAL``)."""
    await _setattr(connection, *set_attributes_request(guest_path, mode=mode, mtime=mtime))


def set_attributes_request(
    guest_path: GuestPath, *, mode: int | None, mtime: float | None
) -> tuple[bytes, int | None, int | None]:
    """The path, mode and mtime in ns of :func:`set_attributes`'s arguments, checked
    (:class:`UsageError`)."""
    path = _guest_path(guest_path)
    if mode is None and mtime is None:
        raise UsageError("set_attributes() sets mode, mtime or both: give at least one")
    return path, None if mode is None else _number(mode, "mode", _MODE_MAX), _mtime_ns(mtime)


async def _setattr(
    connection: SessionConnection, path: bytes, mode: int | None, mtime_ns: int | None
) -> None:
    request = {
        "op": "setattr",
        "path": _wire_string(path, "path"),
        "mode": mode,
        "mtime_ns": mtime_ns,
    }
    await _simple(connection, path, request)


# -- out of the guest -------------------------------------------------------------------------


def read_file(
    connection: SessionConnection, guest_path: GuestPath, *, window: int = DEFAULT_WINDOW
) -> AsyncGenerator[bytes, None]:
    """The bytes of the guest file ``guest_path``, as they arrive: ``async for chunk in ...``.

    At most ``window`` bytes are held unread. The iteration ends only after the
    guest's size and SHA-256 matched what arrived. Leaving the loop early (or
    ``aclose()``) stops the transfer in the guest.
    """
    return _get(connection, *get_request(guest_path, window))


def get_request(guest_path: GuestPath, window: int) -> tuple[bytes, int]:
    """The path and window of a get's arguments (:func:`read_file`, :func:`get_tree`),
    checked (:class:`UsageError`)."""
    return _guest_path(guest_path), _window(window)


@contextlib.asynccontextmanager
async def _getting(
    connection: SessionConnection, path: bytes, window: int
) -> AsyncIterator[tuple[FileStream, ProcessReader]]:
    """A get of ``path`` under way, and the reader of its bytes; stopped in the guest if
    left before its RESULT."""
    connection.require("files", "work with files")
    transfer = FileStream(connection, path, window=window)
    await connection.open_file(transfer, {"op": "get", "path": _wire_string(path, "path")}, window)
    assert transfer.reader is not None
    try:
        yield transfer, transfer.reader
    finally:
        transfer.give_up()


async def _get(
    connection: SessionConnection, path: bytes, window: int
) -> AsyncGenerator[bytes, None]:
    """The chunks of a get; the last comes only once its size and digest are checked."""
    async with _getting(connection, path, window) as (transfer, reader):
        digest = BackgroundDigest()
        while chunk := await reader.read(window):
            await digest.update(chunk)  # hashed while the caller uses it
            yield chunk
        answer = await transfer.result()
        sha256 = await digest.hexdigest()
    _check_transfer(connection, answer, digest.size, sha256, path)


async def get_file(
    connection: SessionConnection,
    guest_path: GuestPath,
    local_path: LocalPath,
    *,
    window: int = DEFAULT_WINDOW,
) -> None:
    """Copy the guest file ``guest_path`` to ``local_path``, whole or not at all.

    The bytes go to a temporary file next to ``local_path`` (``.vsock_async.get.``
    and 16 hex digits), with the guest file's permission bits (set-id and
    sticky bits dropped) and mtime, fsynced, renamed over it once the digests
    match, then the directory fsynced: durable once this returns. A failure,
    cancel or lost connection removes the temporary file.
    """
    path, window, directory, name = get_file_request(guest_path, local_path, window)
    fd = await asyncio.to_thread(local.open_directory, directory or b".")
    try:
        await _download(connection, path, fd, name, window)
    finally:
        os.close(fd)


def get_file_request(
    guest_path: GuestPath, local_path: LocalPath, window: int
) -> tuple[bytes, int, bytes, bytes]:
    """The path, window, local directory and local name of :func:`get_file`'s arguments,
    checked (:class:`UsageError`)."""
    path, window = get_request(guest_path, window)
    directory, name = os.path.split(os.fsencode(local_path))
    if not name:
        raise UsageError(f"local_path {local_path!r} names a directory, not a file")
    return path, window, directory, name


async def _download(
    connection: SessionConnection, path: bytes, dir_fd: int, name: bytes, window: int
) -> None:
    """The guest file ``path`` as ``name`` in the local directory ``dir_fd``.

    The bytes are copied out of the reader into one reused buffer and hashed and written
    from it in one trip to the thread pool per batch, while the next ones arrive."""
    fd, temp = await asyncio.to_thread(local.create_temp, dir_fd)
    done = False
    try:
        hasher = hashlib.sha256()
        size = 0
        async with _getting(connection, path, window) as (transfer, reader):
            with memoryview(bytearray(min(window, _CHUNK))) as buffer:
                while n := await reader.readinto(buffer):
                    await asyncio.to_thread(local.hash_and_write, hasher, fd, buffer[:n])
                    size += n
            result = await transfer.result()
        _check_transfer(connection, result, size, hasher.hexdigest(), path)
        kept = _peer_ints(connection, result, _KEPT)
        await asyncio.to_thread(local.install, fd, temp, dir_fd, name, **kept)
        done = True
    finally:
        os.close(fd)
        if not done:
            local.discard(dir_fd, temp)


_KEPT: Final = (("mode", 0, _MODE_MAX), ("mtime_ns", -(2**63), 2**63 - 1))


async def get_tree(
    connection: SessionConnection,
    guest_dir: GuestPath,
    local_dir: LocalPath,
    *,
    window: int = DEFAULT_WINDOW,
) -> None:
    """Copy the guest directory ``guest_dir`` into ``local_dir``, made if missing.

    Files and directories keep their permission bits (set-id and sticky bits
    dropped) and mtime: a directory is made 0700, filled, then given its mode
    and mtime, deepest first. ``local_dir`` gets those of ``guest_dir`` only
    if this call makes it; an existing one keeps its mode. Symbolic links are
    made as links, never followed: every local file is created through the
    descriptor of its directory with ``O_NOFOLLOW``, so a link (even one the
    guest listed in place of a directory) never leads a write out of
    ``local_dir``. Other kinds of file are skipped with a log line.
    """
    root, window = get_request(guest_dir, window)
    info = await stat(connection, root)
    if info.kind != "dir":
        raise GuestFileError("file_error", "not a directory", os.fsdecode(root), "ENOTDIR")
    made = await asyncio.to_thread(local.make_directory, os.fsencode(local_dir))
    fd = await asyncio.to_thread(local.open_directory, local_dir)
    try:
        await _get_directory(connection, root, fd, window)
        if made:
            await asyncio.to_thread(
                local.set_mode_and_mtime, fd, mode=info.mode, mtime_ns=info.mtime_ns
            )
    finally:
        os.close(fd)


async def _get_directory(connection: SessionConnection, guest: bytes, fd: int, window: int) -> None:
    for entry in await listdir(connection, guest):
        name = os.fsencode(entry.name)
        child = _join(guest, name)
        if entry.kind == "dir":
            sub = await asyncio.to_thread(local.subdirectory, fd, name, make=True)
            try:
                await _get_directory(connection, child, sub, window)
                await asyncio.to_thread(
                    local.set_mode_and_mtime, sub, mode=entry.mode, mtime_ns=entry.mtime_ns
                )
            finally:
                os.close(sub)
        elif entry.kind == "symlink":
            assert entry.target is not None
            await asyncio.to_thread(local.make_symlink, fd, name, os.fsencode(entry.target))
        elif entry.kind == "file":
            await _download(connection, child, fd, name, window)
        else:
            logger.warning("get_tree skips %r: a %s", child, entry.kind)

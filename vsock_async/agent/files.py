"""One file operation of a v2 file stream, from its FILE request to its RESULT or ERROR.

Standard library only. The request is checked field by field first
(:func:`parse_file_request`); every path is then resolved under the files
root (:mod:`.paths`). Disk work runs in the event loop's thread pool, one
step at a time per stream, so a slow disk never stalls the connection:

- **put** writes into a new temporary file in the target's directory,
  ``.vsock_async.put.<16 hex digits>`` (``O_EXCL``, mode 0600), hashing the
  bytes as they are written and returning their credit only once written.
  The bytes wait in one ring of ``file_window`` bytes (the credit the host
  never exceeds), written and hashed from there in one trip to the pool per
  batch: a put allocates nothing per chunk.
  After STDIN END and COMMIT, if the SHA-256 matches, it sets owner, mode and
  mtime, fsyncs, renames the file into place and fsyncs the directory. Any
  other end (a mismatch, an error, CLOSE, the connection lost) removes the
  temporary file: the target is replaced whole or not at all.
- **get** reads a regular file within the host's credit, hashing it, and
  ends with END and the size and SHA-256 of what was sent.
- **listdir** sends one JSON line per entry on STDOUT, within credit.
- **stat**, **remove**, **mkdir**, **symlink** and **setattr** answer at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from .paths import MAX_PATH, FilesRoot, Resolved
from .request import Refused, byte_string

__all__ = [
    "TEMP_PREFIX",
    "FileLink",
    "FileOperation",
    "FileSpec",
    "file_info",
    "parse_file_request",
]

TEMP_PREFIX: Final = b".vsock_async.put."
"""A put's temporary file is this and 16 lowercase hex digits, in the target's directory."""
_FILE_OPS: Final = frozenset(
    {"put", "get", "stat", "listdir", "remove", "mkdir", "symlink", "setattr"}
)
_FILE_MODE_MAX: Final = 0o7777
_FILE_ID_MAX: Final = 0xFFFF_FFFE  # (uid_t) -1 means "unchanged" to chown
_LISTING_BATCH: Final = 64 * 1024  # bytes of listing lines prepared per trip to the thread pool
_FILE_KINDS: Final = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
}
_FILE_STDOUT: Final = 1
_FileT = TypeVar("_FileT")


class FileLink(Protocol):
    """What a file operation needs from its connection."""

    def credit(self, channel: int) -> int:
        """Bytes the host will take on ``channel`` now (0 also while the connection is paused)."""

    def send_output(self, channel: int, data: bytes, end: bool) -> None:
        """Send bytes (at most :meth:`credit`); ``end``: the channel is closed after them."""

    def stdin_consumed(self, n: int) -> None:
        """``n`` bytes the host sent were written: return the credit."""

    def file_done(self, result: Mapping[str, Any]) -> None:
        """RESULT: the stream's last frame."""

    def file_failed(self, code: str, message: str, errno: str | None) -> None:
        """ERROR: the stream's last frame."""


@dataclass(frozen=True, slots=True)
class FileSpec:
    """One file operation, as the host asked for it (validated)."""

    op: str
    path: bytes
    mode: int | None = None
    """put (default 0644) and mkdir (default 0755): the permission bits, set exactly;
    setattr: the new ones, if not None."""
    uid: int | None = None
    gid: int | None = None
    """put, mkdir, symlink: the owner of what is made (None: the agent's)."""
    mtime_ns: int | None = None
    make_parents: bool = False
    """put, mkdir (``parents``), symlink: create missing directories on the way."""
    recursive: bool = False
    follow_symlinks: bool = True
    target: bytes | None = None
    """symlink: what the link points to."""


def parse_file_request(request: Mapping[str, Any], *, can_chown: bool) -> FileSpec:
    """The :class:`FileSpec` for a FILE payload, or :class:`Refused` saying what is wrong.

    Unknown fields are ignored (the protocol evolves by adding fields).
    """
    op = request.get("op")
    if op not in _FILE_OPS:
        raise Refused("unsupported", f"this agent knows no file operation {op!r}")
    path = _file_bytes(request.get("path"), "path")
    if not path.startswith(b"/"):
        raise Refused("bad_request", f"path must be absolute, not {path[:100]!r}")
    spec = FileSpec(op, path)
    if op == "put":
        uid, gid = _file_owner(request, can_chown)
        return FileSpec(
            op,
            path,
            mode=_file_mode(request, 0o644),
            uid=uid,
            gid=gid,
            mtime_ns=_file_number(request.get("mtime_ns"), "mtime_ns", 2**63 - 1),
            make_parents=_file_flag(request, "make_parents"),
        )
    if op == "stat":
        return FileSpec(op, path, follow_symlinks=_file_flag(request, "follow_symlinks", True))
    if op == "remove":
        return FileSpec(op, path, recursive=_file_flag(request, "recursive"))
    if op == "mkdir":
        uid, gid = _file_owner(request, can_chown)
        return FileSpec(
            op,
            path,
            mode=_file_mode(request, 0o755),
            uid=uid,
            gid=gid,
            make_parents=_file_flag(request, "parents"),
        )
    if op == "symlink":
        target = _file_bytes(request.get("target"), "target")
        if not target:
            raise Refused("bad_request", "a symbolic link's target must not be empty")
        uid, gid = _file_owner(request, can_chown)
        return FileSpec(
            op,
            path,
            uid=uid,
            gid=gid,
            target=target,
            make_parents=_file_flag(request, "make_parents"),
        )
    if op == "setattr":
        return FileSpec(
            op,
            path,
            mode=_file_number(request.get("mode"), "mode", _FILE_MODE_MAX),
            mtime_ns=_file_number(request.get("mtime_ns"), "mtime_ns", 2**63 - 1),
        )
    return spec


def _file_bytes(value: Any, what: str) -> bytes:
    """A byte string field (:func:`~.request.byte_string`) no longer than a path may be."""
    data = byte_string(value, what)
    if len(data) > MAX_PATH:
        raise Refused("bad_request", f"{what} is {len(data)} bytes, more than {MAX_PATH}")
    return data


def _file_number(value: Any, what: str, high: int) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise Refused("bad_request", f"{what} must be null or an integer in 0..{high}")
    return value


def _file_owner(request: Mapping[str, Any], can_chown: bool) -> tuple[int | None, int | None]:
    """``uid`` and ``gid`` (put, mkdir, symlink); ``permission`` unless the agent is root."""
    uid = _file_number(request.get("uid"), "uid", _FILE_ID_MAX)
    gid = _file_number(request.get("gid"), "gid", _FILE_ID_MAX)
    if (uid is not None or gid is not None) and not can_chown:
        raise Refused(
            "permission",
            "cannot set a file's owner (uid, gid): the agent does not run as root",
            "EPERM",
        )
    return uid, gid


def _file_mode(request: Mapping[str, Any], default: int) -> int:
    mode = _file_number(request.get("mode"), "mode", _FILE_MODE_MAX)
    return default if mode is None else int(mode)


def _file_flag(request: Mapping[str, Any], what: str, default: bool = False) -> bool:
    value = request.get(what, default)
    if not isinstance(value, bool):
        raise Refused("bad_request", f"{what} must be true or false, not {value!r}")
    return value


def _file_wire(data: bytes) -> str | dict[str, str]:
    """A byte string for JSON: text if it is UTF-8, else ``{"b64": ...}``."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(data).decode("ascii")}


def file_info(st: os.stat_result, target: bytes | None = None) -> dict[str, Any]:
    """The wire form of one ``lstat``/``stat`` result (docs/protocol.md, "stat")."""
    info: dict[str, Any] = {
        "kind": _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "other"),
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime_ns": st.st_mtime_ns,
    }
    if target is not None:
        info["target"] = _file_wire(target)
    return info


class _Aborted(Exception):
    """The host closed the stream, or the connection went: stop, leave nothing behind."""


class FileOperation:
    """One file stream; :meth:`run` carries it out and sends its last frame.

    The connection feeds it the host's frames: :meth:`write` (a put's bytes),
    :meth:`commit`, :meth:`credit_changed`, :meth:`close` (CLOSE) and
    :meth:`kill` (the connection is gone: nothing more is sent).
    """

    def __init__(
        self, spec: FileSpec, link: FileLink, root: FilesRoot, *, max_read: int, window: int
    ) -> None:
        self.spec = spec
        self._link = link
        self._root = root
        self._max_read = max_read
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._window = window  # a put's credit: the host never has more bytes on the way
        self._ring: bytearray | None = None  # a put's bytes not yet written, made on the first
        self._head = 0  # where the next bytes of a put go in the ring
        self._held = 0  # bytes in the ring not yet written
        self._end = False
        self._digest: str | None = None
        self._aborted: str | None = None  # "closed" (CLOSE) or "killed" (connection lost)
        self._committing = False

    # -- the host's frames ---------------------------------------------------------------

    def write(self, data: bytes | memoryview, end: bool) -> None:
        """Bytes of a put, copied into the ring (credit comes back as they are written);
        ``end``: the last ones. The session never passes more than the credit left."""
        if data:
            if self._ring is None:
                self._ring = bytearray(self._window)
            ring, at, n = self._ring, self._head, len(data)
            if self._held + n > len(ring):
                raise RuntimeError(f"{n} bytes of a put beyond the {len(ring)} bytes of credit")
            src = memoryview(data)
            first = min(n, len(ring) - at)
            ring[at : at + first] = src[:first]
            ring[: n - first] = src[first:]
            self._head = (at + n) % len(ring)
            self._held += n
        self._end = end
        self._changed.set()

    def commit(self, sha256: str) -> None:
        """COMMIT: the SHA-256 the host computed over every byte it sent."""
        self._digest = sha256
        self._changed.set()

    def credit_changed(self) -> None:
        """The host granted credit, or the connection was paused or resumed."""
        self._changed.set()

    def close(self) -> None:
        """CLOSE: give up and answer ERROR ``closed``, unless a put is already being committed."""
        if not self._committing:
            self._abort("closed")

    def kill(self) -> None:
        """The connection is gone: give up, send nothing."""
        self._abort("killed")

    def _abort(self, why: str) -> None:
        if self._aborted is None:
            self._aborted = why
            self._changed.set()

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> str:
        """Carry the operation out and send RESULT, or ERROR with why it failed; which, for the
        log (``done``, ``closed``, ``killed``, or the ERROR's code and errno)."""
        link = self._link
        operations = {
            "put": self._put,
            "get": self._get,
            "listdir": self._listdir,
            "stat": self._stat,
            "remove": self._remove,
            "mkdir": self._mkdir,
            "symlink": self._symlink,
            "setattr": self._setattr,
        }
        try:
            result = await operations[self.spec.op]()
        except _Aborted:
            if self._aborted == "closed":
                link.file_failed("closed", "the host closed the stream", None)
            return self._aborted or "killed"
        except Refused as refused:
            link.file_failed(refused.code, refused.message, refused.errno)
            return refused.code
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0)
            link.file_failed("file_error", self._message(exc), name)
            return f"file_error {name}"
        link.file_done(result)
        return "done"

    def _message(self, exc: OSError) -> str:
        """The OS's words, and the file they are about when it is not the one asked for."""
        message = exc.strerror or str(exc)
        if exc.filename is not None:
            about = os.fsencode(exc.filename)
            if about not in (self.spec.path, self.spec.path.rpartition(b"/")[2]):
                message += f" ({os.fsdecode(about)})"
        return message

    async def _io(self, function: Callable[..., _FileT], *args: Any) -> _FileT:
        """``function(*args)`` in the thread pool (blocking disk work)."""
        return await self._loop.run_in_executor(None, function, *args)

    async def _until(self, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()``; :class:`_Aborted` if the stream is given up first."""
        while True:
            if self._aborted is not None:
                raise _Aborted
            if ready():
                return
            self._changed.clear()
            await self._changed.wait()

    async def _resolve(self, *, follow: bool, make_parents: bool = False) -> Resolved:
        return await self._io(
            lambda: self._root.resolve(self.spec.path, follow=follow, make_parents=make_parents)
        )

    # -- the operations ----------------------------------------------------------------------

    async def _put(self) -> dict[str, Any]:
        spec = self.spec
        with await self._resolve(follow=False, make_parents=spec.make_parents) as where:
            fd, temp = await self._io(_create_temp, where)
            done = False
            try:
                hasher = hashlib.sha256()
                size = tail = 0
                while True:
                    await self._until(lambda: bool(self._held) or self._end)
                    if not self._held:
                        break
                    # What came meanwhile, in one trip to the pool; at most a quarter of the
                    # window, so that credit flows back while the rest is written.
                    assert self._ring is not None
                    n = min(self._held, len(self._ring) // 4 or 1)
                    with memoryview(self._ring) as ring:
                        pieces = [ring[tail : tail + n], ring[: max(0, tail + n - len(ring))]]
                        await self._io(_hash_and_write, hasher, fd, pieces)
                        for piece in pieces:
                            piece.release()
                    tail = (tail + n) % len(self._ring)
                    self._held -= n
                    size += n
                    self._link.stdin_consumed(n)  # credit back once written
                await self._until(lambda: self._digest is not None)
                sha256 = hasher.hexdigest()
                if sha256 != self._digest:
                    raise Refused(
                        "digest_mismatch",
                        f"the {size} bytes received have SHA-256 {sha256}, not"
                        f" {self._digest}: the file was not written",
                    )
                self._committing = True
                await self._io(_install, fd, temp, where, spec)
                done = True
            finally:
                os.close(fd)
                if not done:
                    with contextlib.suppress(OSError):
                        os.unlink(temp, dir_fd=where.dir_fd)
        return {"size": size, "sha256": sha256}

    async def _get(self) -> dict[str, Any]:
        with await self._resolve(follow=True) as where:
            fd = await self._io(_open_regular, where)
        try:
            opened = os.fstat(fd)
            hasher = hashlib.sha256()
            size = 0
            while True:
                if self._link.credit(_FILE_STDOUT) <= 0:
                    if await self._io(_at_end, fd):  # END needs no credit: do not wait for it
                        break
                    await self._until(lambda: self._link.credit(_FILE_STDOUT) > 0)
                size_now = min(self._max_read, self._link.credit(_FILE_STDOUT))
                data = await self._io(_read_and_hash, fd, size_now, hasher)
                if self._aborted is not None:
                    raise _Aborted
                if not data:
                    break
                size += len(data)
                self._link.send_output(_FILE_STDOUT, data, False)
            sha256 = hasher.hexdigest()
        finally:
            os.close(fd)
        self._link.send_output(_FILE_STDOUT, b"", True)
        return {
            "size": size,
            "sha256": sha256,
            "mode": stat.S_IMODE(opened.st_mode),
            "mtime_ns": opened.st_mtime_ns,
        }

    async def _listdir(self) -> dict[str, Any]:
        with await self._resolve(follow=True) as where:
            fd = await self._io(where.open, os.O_RDONLY | os.O_DIRECTORY)
        count = 0
        try:  # scandir reads a duplicate of fd, but its entries stat relative to fd itself
            with os.scandir(fd) as entries:
                lines = _listing(entries, fd)
                while True:
                    batch, n = await self._io(_next_batch, lines)
                    if not batch:
                        break
                    count += n
                    view = memoryview(batch)
                    while view:
                        await self._until(lambda: self._link.credit(_FILE_STDOUT) > 0)
                        size_now = min(len(view), self._link.credit(_FILE_STDOUT))
                        self._link.send_output(_FILE_STDOUT, view[:size_now].tobytes(), False)
                        view = view[size_now:]
        finally:
            os.close(fd)
        self._link.send_output(_FILE_STDOUT, b"", True)
        return {"entries": count}

    async def _stat(self) -> dict[str, Any]:
        with await self._resolve(follow=self.spec.follow_symlinks) as where:
            return await self._io(_stat_of, where)

    async def _remove(self) -> dict[str, Any]:
        with await self._resolve(follow=False) as where:
            if where.name is None or where.target == self._root.parts:
                raise OSError(errno.EBUSY, "cannot remove the files root or a path ending in ..")
            await self._io(_remove, where, self.spec.recursive)
        return {}

    async def _mkdir(self) -> dict[str, Any]:
        spec = self.spec
        with await self._resolve(follow=False, make_parents=spec.make_parents) as where:
            await self._io(_make_directory, where, spec)
        return {}

    async def _symlink(self) -> dict[str, Any]:
        spec = self.spec
        assert spec.target is not None
        with await self._resolve(follow=False, make_parents=spec.make_parents) as where:
            await self._io(_make_symlink, where, spec)
        return {}

    async def _setattr(self) -> dict[str, Any]:
        with await self._resolve(follow=False) as where:
            await self._io(_set_attributes, where, self.spec)
        return {}


# -- the blocking steps, run in the thread pool ----------------------------------------------


def _temp_name() -> bytes:
    return TEMP_PREFIX + secrets.token_hex(8).encode()


def _create_temp(where: Resolved) -> tuple[int, bytes]:
    """A new temporary file next to the target, mode 0600; the target must not be a directory."""
    where.confirm()
    if where.name is None:
        raise IsADirectoryError(errno.EISDIR, "is a directory")
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.stat(where.name, dir_fd=where.dir_fd, follow_symlinks=False).st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        temp = _temp_name()
        try:
            return os.open(temp, flags, 0o600, dir_fd=where.dir_fd), temp
        except FileExistsError:
            continue


def _owner_ids(spec: FileSpec) -> tuple[int, int]:
    """``uid`` and ``gid`` for chown: -1 leaves one unchanged."""
    return -1 if spec.uid is None else spec.uid, -1 if spec.gid is None else spec.gid


def _set_owner(fd: int, spec: FileSpec) -> None:
    """The owner ``spec`` asks for, if any (before the mode: chown clears set-id bits)."""
    if spec.uid is not None or spec.gid is not None:
        os.fchown(fd, *_owner_ids(spec))


def _read_and_hash(fd: int, n: int, hasher: Any) -> bytes:
    """Up to ``n`` bytes of ``fd``, hashed: one trip to the pool for both."""
    data = os.read(fd, n)
    hasher.update(data)
    return data


def _hash_and_write(hasher: Any, fd: int, pieces: list[memoryview]) -> None:
    """Hash ``pieces``, then write them whole (in the pool: both release the GIL)."""
    for piece in pieces:
        hasher.update(piece)
        while piece:
            piece = piece[os.write(fd, piece) :]


def _install(fd: int, temp: bytes, where: Resolved, spec: FileSpec) -> None:
    """Owner, then mode (chown clears set-id bits), mtime, fsync, rename, fsync the directory."""
    _set_owner(fd, spec)
    assert spec.mode is not None and where.name is not None
    os.fchmod(fd, spec.mode)
    if spec.mtime_ns is not None:
        os.utime(fd, ns=(time.time_ns(), spec.mtime_ns))
    os.fsync(fd)
    where.confirm()  # the directory may have been moved out of the root during the transfer
    os.rename(temp, where.name, src_dir_fd=where.dir_fd, dst_dir_fd=where.dir_fd)
    directory = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=where.dir_fd)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _open_regular(where: Resolved) -> int:
    """The file to get, open for reading; only a regular file (a FIFO would never end)."""
    where.confirm()
    fd = where.open(os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _at_end(fd: int) -> bool:
    return not os.pread(fd, 1, os.lseek(fd, 0, os.SEEK_CUR))


def _listing(entries: Iterator[os.DirEntry[str]], dir_fd: int) -> Iterator[bytes]:
    """One JSON line per entry: its name and :func:`file_info` (not following links)."""
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
            target = None
            if stat.S_ISLNK(st.st_mode):
                target = os.fsencode(os.readlink(entry.name, dir_fd=dir_fd))
        except FileNotFoundError:
            continue  # removed since it was listed
        info = {"name": _file_wire(os.fsencode(entry.name)), **file_info(st, target)}
        yield json.dumps(info, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _next_batch(lines: Iterator[bytes]) -> tuple[bytes, int]:
    """Up to about :data:`_LISTING_BATCH` bytes of lines, and how many lines."""
    batch: list[bytes] = []
    size = 0
    for line in lines:
        batch.append(line)
        size += len(line)
        if size >= _LISTING_BATCH:
            break
    return b"".join(batch), len(batch)


def _stat_of(where: Resolved) -> dict[str, Any]:
    where.confirm()
    name = where.name or b"."
    st = os.stat(name, dir_fd=where.dir_fd, follow_symlinks=False)
    target = os.readlink(name, dir_fd=where.dir_fd) if stat.S_ISLNK(st.st_mode) else None
    return file_info(st, target)


def _remove(where: Resolved, recursive: bool) -> None:
    where.confirm()
    assert where.name is not None
    st = os.stat(where.name, dir_fd=where.dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(where.name, dir_fd=where.dir_fd)
    elif recursive:
        shutil.rmtree(where.name, dir_fd=where.dir_fd)
    else:
        os.rmdir(where.name, dir_fd=where.dir_fd)


def _make_directory(where: Resolved, spec: FileSpec) -> None:
    where.confirm()
    assert spec.mode is not None
    if where.name is not None:
        try:
            os.mkdir(where.name, spec.mode, dir_fd=where.dir_fd)
        except FileExistsError:
            if not spec.make_parents:
                raise
        else:
            fd = where.open(os.O_RDONLY | os.O_DIRECTORY)
            try:
                _set_owner(fd, spec)
                os.fchmod(fd, spec.mode)  # exactly: mkdir's mode is cut by the umask
            finally:
                os.close(fd)
            return
    elif not spec.make_parents:
        raise FileExistsError(errno.EEXIST, "file exists")
    st = os.stat(where.name or b".", dir_fd=where.dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a directory")


def _make_symlink(where: Resolved, spec: FileSpec) -> None:
    """The link under a temporary name (its owner set there: ``lchown``), renamed over the
    target: it replaces what was there."""
    assert spec.target is not None
    where.confirm()
    if where.name is None:
        raise FileExistsError(errno.EEXIST, "file exists")
    temp = _temp_name()
    os.symlink(spec.target, temp, dir_fd=where.dir_fd)
    try:
        if spec.uid is not None or spec.gid is not None:
            os.chown(temp, *_owner_ids(spec), dir_fd=where.dir_fd, follow_symlinks=False)
        os.rename(temp, where.name, src_dir_fd=where.dir_fd, dst_dir_fd=where.dir_fd)
    except BaseException:
        os.unlink(temp, dir_fd=where.dir_fd)
        raise


def _set_attributes(where: Resolved, spec: FileSpec) -> None:
    """Mode, then mtime, of a regular file or directory, through a descriptor of it: a link
    in its place is refused, never followed (``EINVAL``, or ``ELOOP`` if swapped in meanwhile)."""
    where.confirm()
    st = os.stat(where.name or b".", dir_fd=where.dir_fd, follow_symlinks=False)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise OSError(errno.EINVAL, "not a regular file or directory")
    fd = where.open(os.O_RDONLY | os.O_NONBLOCK)
    try:
        if spec.mode is not None:
            os.fchmod(fd, spec.mode)
        if spec.mtime_ns is not None:
            os.utime(fd, ns=(time.time_ns(), spec.mtime_ns))
    finally:
        os.close(fd)

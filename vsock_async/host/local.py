"""The host's side of a file transfer: local files written whole or not at all, and trees
walked and made without following any link.

Blocking functions: :mod:`.files` runs them in threads, the ``cp`` command calls them as
they are. Below the directory the caller names, every file, directory and link is reached
through the descriptor of its parent with ``O_NOFOLLOW``, so a link (even one a hostile
guest listed where a directory should be) never leads a read or a write out of the tree.
A file is written to a temporary name next to its target and renamed over it once whole
and on disk (fsynced, and its directory after the rename).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from typing import Any, Final

__all__ = [
    "TEMP_PREFIX",
    "create_temp",
    "discard",
    "entries",
    "hash_and_write",
    "install",
    "make_directory",
    "make_symlink",
    "open_directory",
    "open_file",
    "set_mode_and_mtime",
    "subdirectory",
    "write_all",
]

TEMP_PREFIX: Final = b".vsock_async.get."
"""A file being received is this and 16 lowercase hex digits, next to its target."""
_DIRECTORY: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _temp_name() -> bytes:
    return TEMP_PREFIX + secrets.token_hex(8).encode()


def open_directory(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> int:
    """A descriptor of the directory the caller named (a link to one is followed: it is the
    caller's own choice)."""
    return os.open(path, _DIRECTORY)


def make_directory(path: bytes) -> bool:
    """Make the directory ``path`` (mode 0700, to be filled) and its missing parents; False if
    something was there already (a file there fails when it is opened as a directory)."""
    try:
        os.makedirs(path, 0o700)
    except FileExistsError:
        return False
    return True


def subdirectory(dir_fd: int, name: bytes, *, make: bool) -> int:
    """A descriptor of the subdirectory ``name`` (made, mode 0700, if missing and ``make``);
    never of a link to one (``ELOOP``, ``ENOTDIR``)."""
    if make:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
    return os.open(name, _DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


def open_file(dir_fd: int, name: bytes) -> int:
    """The file ``name`` of ``dir_fd``, open for reading; never through a link."""
    return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def entries(dir_fd: int) -> list[tuple[bytes, os.stat_result, bytes | None]]:
    """Name, ``lstat`` and link target (None but for a link) of each entry of ``dir_fd``."""
    found = []
    with os.scandir(dir_fd) as listing:
        for entry in listing:
            st = entry.stat(follow_symlinks=False)
            target = None
            if stat.S_ISLNK(st.st_mode):
                target = os.fsencode(os.readlink(entry.name, dir_fd=dir_fd))
            found.append((os.fsencode(entry.name), st, target))
    return found


def create_temp(dir_fd: int) -> tuple[int, bytes]:
    """A new file in ``dir_fd`` (``O_EXCL``, mode 0600) and its name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        temp = _temp_name()
        try:
            return os.open(temp, flags, 0o600, dir_fd=dir_fd), temp
        except FileExistsError:
            continue


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data``."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def hash_and_write(hasher: Any, fd: int, data: memoryview) -> None:
    """Hash ``data``, then write all of it: one trip to the thread pool for both (each
    releases the GIL)."""
    hasher.update(data)
    write_all(fd, data)


def set_mode_and_mtime(fd: int, *, mode: int, mtime_ns: int) -> None:
    """Give the file or directory ``fd`` ``mode`` (set-id and sticky bits dropped) and
    ``mtime_ns``: a directory's last, once it is filled (its entries change its mtime)."""
    os.fchmod(fd, mode & 0o777)
    os.utime(fd, ns=(time.time_ns(), mtime_ns))


def install(fd: int, temp: bytes, dir_fd: int, name: bytes, *, mode: int, mtime_ns: int) -> None:
    """Give the temporary file ``temp`` ``mode`` and ``mtime_ns`` (:func:`set_mode_and_mtime`),
    fsync it, rename it over ``name`` and fsync the directory: once this returns, ``name`` is
    the whole new file even after a crash or power loss, and before, the old one or none."""
    set_mode_and_mtime(fd, mode=mode, mtime_ns=mtime_ns)
    os.fsync(fd)
    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def discard(dir_fd: int, temp: bytes) -> None:
    """Remove a temporary file that will not be installed (gone already is fine)."""
    with contextlib.suppress(OSError):
        os.unlink(temp, dir_fd=dir_fd)


def make_symlink(dir_fd: int, name: bytes, target: bytes) -> None:
    """``name`` in ``dir_fd`` becomes a link to ``target``, replacing a file or link there."""
    temp = _temp_name()
    os.symlink(target, temp, dir_fd=dir_fd)
    try:
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        discard(dir_fd, temp)
        raise

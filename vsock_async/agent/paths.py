"""Guest paths of file operations, resolved one component at a time under the files root.

Standard library only. A path from the host is walked from ``/`` with
``openat(..., O_PATH | O_NOFOLLOW)`` on each component: a symbolic link is
read from the very link that was opened (``readlinkat`` on its descriptor)
and its target walked in turn, so the walk never trusts a name twice and a
link swapped in meanwhile cannot send it elsewhere. What the walk ends on,
the directory and the last name, must lie under the agent's files root
(``--files-root``); otherwise ``EACCES``. The operation then uses the last
name relative to the directory's descriptor, with ``O_NOFOLLOW``. A descriptor
follows its directory when another process renames it, so the directory's place
is checked again where it is *now* (its ``..`` walked up to the root or ``/``)
at the end of the walk and right before each step that touches it
(:meth:`Resolved.confirm`): a directory moved out of the root meanwhile fails
the step with ``EACCES``.
docs/security.md ("File operations") describes the model and its limits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Final

__all__ = ["MAX_PATH", "FilesRoot", "Resolved"]

MAX_PATH: Final = 4096
"""The longest path (bytes) a file request may name, as Linux's PATH_MAX."""
_MAX_LINKS: Final = 40  # symbolic links followed in one walk, as Linux's MAXSYMLINKS
_DIRECTORY: Final = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ANY: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _components(path: bytes) -> list[bytes]:
    return [part for part in path.split(b"/") if part and part != b"."]


@dataclass(slots=True)
class Resolved:
    """Where a guest path leads: a directory (an ``O_PATH`` descriptor) and a name in it.

    ``name`` is None when the path is the directory itself (``/``, or a path
    ending in ``..``). ``parts`` are the components of the directory's path
    from ``/``, as the walk found it. Close it (or use ``with``) when done.
    """

    dir_fd: int
    name: bytes | None
    parts: tuple[bytes, ...]
    root: FilesRoot

    def confirm(self) -> None:
        """``EACCES`` unless the directory is under the files root where it is now (another
        process may have moved it since the walk): call it right before using it. The root
        itself, named in its parent, must still be the root."""
        if self.name is not None and self.target == self.root.parts:
            held = self.root.is_root(self.dir_fd, self.name)
        else:
            held = self.root.holds(self.dir_fd)
        if not held:
            raise self.root.moved_out()

    @property
    def target(self) -> tuple[bytes, ...]:
        """The components of the resolved path itself."""
        return self.parts if self.name is None else (*self.parts, self.name)

    def open(self, flags: int) -> int:
        """``openat`` of the name (the directory itself when it has none), never following
        a symbolic link in its place."""
        return os.open(self.name or b".", flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def __enter__(self) -> Resolved:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class FilesRoot:
    """The directory every file operation must stay under (``/``: the whole guest)."""

    def __init__(self, root: str | bytes = "/") -> None:
        """Raises ``OSError`` unless ``root`` is an existing directory (symlinks resolved)."""
        real = os.path.realpath(os.fsencode(root))
        if not os.path.isdir(real):
            raise NotADirectoryError(errno.ENOTDIR, "the files root is not a directory", root)
        self.path = real
        """The root's real path, as bytes."""
        self.parts = tuple(_components(real))
        st = os.stat(real)
        self._identity = (st.st_dev, st.st_ino)

    def __repr__(self) -> str:
        return f"FilesRoot({os.fsdecode(self.path)!r})"

    def inside(self, parts: Iterable[bytes]) -> bool:
        """True if the path of ``parts`` (components from ``/``) is the root or under it."""
        return tuple(parts)[: len(self.parts)] == self.parts

    def holds(self, dir_fd: int) -> bool:
        """True if the directory ``dir_fd`` is the root or under it *now*: its ``..`` walked
        up until the root (True) or ``/`` (False). Always True for the root ``/``."""
        if not self.parts:
            return True
        fd = os.open(b".", _DIRECTORY, dir_fd=dir_fd)  # our own, to walk up with
        try:
            st = os.fstat(fd)
            while (st.st_dev, st.st_ino) != self._identity:
                parent = os.open(b"..", _DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = parent
                above = os.fstat(fd)
                if (above.st_dev, above.st_ino) == (st.st_dev, st.st_ino):
                    return False  # "/": its own parent
                st = above
            return True
        finally:
            os.close(fd)

    def is_root(self, dir_fd: int, name: bytes) -> bool:
        """True if ``name`` in ``dir_fd`` is the root directory itself."""
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return (st.st_dev, st.st_ino) == self._identity

    def moved_out(self) -> OSError:
        """The error of a directory moved out of the root while an operation used it."""
        root = os.fsdecode(self.path)
        return PermissionError(errno.EACCES, f"moved outside the agent's files root {root}")

    def resolve(self, path: bytes, *, follow: bool, make_parents: bool = False) -> Resolved:
        """Walk ``path`` (absolute) to its directory and last name; ``OSError`` if it cannot.

        ``follow``: a symbolic link as the last component is followed too (else
        the link itself is the name). ``make_parents``: missing directories on
        the way are created (mode 0755 less the umask), only under the root.
        A last component that does not exist is fine (an operation may create
        it). ``EACCES`` when the result is outside the root.
        """
        if not path.startswith(b"/"):
            raise OSError(errno.EINVAL, "not an absolute path", path)
        if len(path) > MAX_PATH:
            raise OSError(errno.ENAMETOOLONG, f"a path is at most {MAX_PATH} bytes", path[:64])
        pending = deque(_components(path))
        names: list[bytes] = []
        fd = os.open(b"/", _DIRECTORY)
        links = 0
        try:
            while pending:
                name = pending.popleft()
                if name == b"..":
                    if names:
                        names.pop()
                        os.close(fd)
                        fd = -1
                        fd = self._walk(names)
                    continue
                last = not pending
                if last and not follow:
                    return self._result(fd, name, names, path)
                try:
                    child = os.open(name, _ANY, dir_fd=fd)
                except FileNotFoundError:
                    if last:
                        return self._result(fd, name, names, path)
                    if not make_parents:
                        raise
                    self._make_directory(fd, name, names, path)
                    pending.appendleft(name)
                    continue
                try:
                    mode = os.fstat(child).st_mode
                    if stat.S_ISLNK(mode):
                        links += 1
                        if links > _MAX_LINKS:
                            raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
                        target = os.readlink(b"", dir_fd=child)
                        if target.startswith(b"/"):
                            names.clear()
                            os.close(fd)
                            fd = -1
                            fd = os.open(b"/", _DIRECTORY)
                        pending.extendleft(reversed(_components(target)))
                        continue
                    if last:
                        return self._result(fd, name, names, path)
                    if not stat.S_ISDIR(mode):
                        raise OSError(errno.ENOTDIR, "not a directory", b"/" + b"/".join(names))
                    os.close(fd)
                    fd, child = child, -1
                    names.append(name)
                finally:
                    if child >= 0:
                        os.close(child)
            return self._result(fd, None, names, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def _walk(self, names: list[bytes]) -> int:
        """A descriptor of the directory ``names`` leads to from ``/`` (after a ``..``)."""
        fd = os.open(b"/", _DIRECTORY)
        try:
            for name in names:
                child = os.open(name, _DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _make_directory(self, fd: int, name: bytes, names: list[bytes], path: bytes) -> None:
        if not self.inside([*names, name]):
            raise self._outside(path)
        if not self.holds(fd):
            raise self.moved_out()
        with contextlib.suppress(FileExistsError):  # made meanwhile: the walk opens it next
            os.mkdir(name, 0o755, dir_fd=fd)

    def _result(self, fd: int, name: bytes | None, names: list[bytes], path: bytes) -> Resolved:
        parts = tuple(names)
        if not self.inside(parts if name is None else (*parts, name)):
            raise self._outside(path)
        resolved = Resolved(fd, name, parts, self)
        resolved.confirm()  # not moved out of the root while the walk went on
        return resolved

    def _outside(self, path: bytes) -> OSError:
        root = os.fsdecode(self.path)
        return PermissionError(errno.EACCES, f"outside the agent's files root {root}", path)

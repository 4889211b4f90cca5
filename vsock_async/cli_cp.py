"""``vsock-async cp``: files and directories in and out of a guest through ``serve``, like
``docker cp``. Standard library only; the exit codes are :mod:`vsock_async.cli`'s.

One side is ``GUEST:PATH`` (an empty ``GUEST`` names the only connected guest), the other a
local path, or ``-`` for stdin or stdout (one file's bytes). A directory is copied whole,
links as links. Every byte goes through the control API's streamed file routes; the local
side is written with :mod:`vsock_async.host.local` (whole or not at all, never through a
link).
"""

from __future__ import annotations

import base64
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TextIO

from .cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK
from .cli_exec import control_client, pick_guest
from .errors import UsageError, VsockAsyncError
from .host import local
from .serve.control_client import ControlClient, ControlError

__all__ = ["Endpoint", "copy", "parse_endpoint"]

_PIECE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One side of a copy: ``guest`` is None for a local path (``-``: stdin or stdout)."""

    guest: str | None
    path: bytes


def parse_endpoint(text: str) -> Endpoint:
    """``GUEST:PATH`` (no ``/`` before the first ``:``) is in a guest; anything else is local.

    A local path holding a ``:`` is written with a ``/`` before it (``./a:b``), as with
    ``docker cp``. An empty ``GUEST`` means the only connected guest.
    """
    head, colon, rest = text.partition(":")
    if colon and "/" not in head:
        if not rest.startswith("/"):
            raise UsageError(f"{text!r}: a guest path is absolute (GUEST:/PATH)")
        return Endpoint(head, os.fsencode(rest))
    if not text:
        raise UsageError("an empty path")
    return Endpoint(None, os.fsencode(text))


class _Report:
    """What cp tells on stderr: files it skips, and on a terminal its progress (``name: 12.5
    MiB``, at most five times a second)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._on = stream.isatty()
        self._shown = 0.0
        self.done = 0

    def add(self, name: bytes, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self._on and now - self._shown >= 0.2:
            self._shown = now
            shown = os.fsdecode(name)[-40:]
            self._stream.write(f"\r\x1b[K{shown}: {self.done / 2**20:.1f} MiB")
            self._stream.flush()

    def skip(self, path: bytes, why: str) -> None:
        if self._on and self._shown:
            self._stream.write("\r\x1b[K")
        self._stream.write(f"vsock-async cp: skipped {os.fsdecode(path)}: {why}\n")
        self._stream.flush()

    def close(self) -> None:
        if self._on and self._shown:
            self._stream.write(f"\r\x1b[K{self.done / 2**20:.1f} MiB copied\n")
            self._stream.flush()


def copy(
    source: str,
    destination: str,
    *,
    control: str | None,
    token_file: str | None,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Copy ``source`` to ``destination`` (exactly one of them in a guest); the exit status:
    :data:`EXIT_OK`, or :data:`EXIT_ERROR` with the reason on stderr. A bad argument raises
    :class:`UsageError` (the caller's exit status 2)."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr
    src, dst = parse_endpoint(source), parse_endpoint(destination)
    if (src.guest is None) == (dst.guest is None):
        raise UsageError("one side of cp is GUEST:PATH and the other a local path (or -)")
    progress = _Report(stderr)
    try:
        client = control_client(control, token_file)
        if src.guest is not None:
            key = pick_guest(client, src.guest or None)
            _Download(client, key, progress, stdout).run(src.path, dst.path)
        else:
            assert dst.guest is not None
            key = pick_guest(client, dst.guest or None)
            _Upload(client, key, progress, stdin).run(src.path, dst.path)
    except KeyboardInterrupt:
        progress.close()
        return EXIT_INTERRUPTED
    except UsageError:
        progress.close()
        raise
    except (VsockAsyncError, OSError) as exc:
        progress.close()
        print(f"vsock-async cp: {_reason(exc)}", file=stderr)
        return EXIT_ERROR
    progress.close()
    return EXIT_OK


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ControlError):
        path = exc.body.get("path")
        return f"{path}: {exc.message}" if path else exc.message
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{os.fsdecode(exc.filename)}: {exc.strerror}"
    return str(exc)


def _join(directory: bytes, name: bytes) -> bytes:
    return directory.rstrip(b"/") + b"/" + name


def _base(path: bytes) -> bytes:
    return os.path.basename(path.rstrip(b"/")) or b"/"


_ITSELF = (b".", b"..", b"/")
"""Base names of a SOURCE that is a directory's contents rather than a name to copy it as."""


def _guest_kind(client: ControlClient, key: str, path: bytes) -> str | None:
    """What ``path`` is in the guest (links followed), or None if nothing is there."""
    try:
        return str(client.stat_file(key, path)["kind"])
    except ControlError as exc:
        if exc.code == "file_not_found":
            return None
        raise


class _Upload:
    def __init__(self, client: ControlClient, key: str, progress: _Report, stdin: BinaryIO) -> None:
        self.client = client
        self.key = key
        self.progress = progress
        self.stdin = stdin

    def run(self, source: bytes, target: bytes) -> None:
        if source == b"-":
            if target.endswith(b"/") or _guest_kind(self.client, self.key, target) == "dir":
                raise UsageError("cp - GUEST:PATH needs PATH to name a file, not a directory")
            self._put(target, self._chunks(self.stdin.fileno(), target), None, None)
            return
        exists_as_dir = _guest_kind(self.client, self.key, target) == "dir"
        into_dir = target.endswith(b"/") or exists_as_dir
        st = os.stat(source)
        # SOURCE/. (or ., .., /): its entries, merged into the directory if there is one,
        # which keeps its own mode (docker cp's rule); else that directory, made as SOURCE's copy.
        itself = _base(source) in _ITSELF
        contents_only = itself and exists_as_dir
        if itself:
            target = target.rstrip(b"/") or b"/"
        elif into_dir:
            target = _join(target, _base(source))
        if stat.S_ISDIR(st.st_mode):
            fd = local.open_directory(source)
            try:
                if contents_only:
                    self._tree(fd, target)
                else:
                    self._directory(fd, target, st)
            finally:
                os.close(fd)
        else:
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._put(target, self._chunks(fd, target), st.st_mode, st.st_mtime)
            finally:
                os.close(fd)

    def _directory(self, fd: int, target: bytes, st: os.stat_result) -> None:
        """The local directory ``fd`` as ``target``: made with its owner's ``rwx`` added (a
        read-only one could not be filled), filled, then given its own mode and mtime, deepest
        first (an entry added changes a directory's mtime), as tar and rsync do."""
        mode = stat.S_IMODE(st.st_mode)
        self.client.make_directory(self.key, target, parents=True, mode=mode | 0o700)
        self._tree(fd, target)
        self.client.set_attributes(self.key, target, mode=mode, mtime=st.st_mtime)

    def _tree(self, fd: int, target: bytes) -> None:
        for name, st, link in local.entries(fd):
            child = _join(target, name)
            if link is not None:
                self.client.make_symlink(self.key, link, child)
            elif stat.S_ISDIR(st.st_mode):
                sub = local.subdirectory(fd, name, make=False)
                try:
                    self._directory(sub, child, st)
                finally:
                    os.close(sub)
            elif stat.S_ISREG(st.st_mode):
                file = local.open_file(fd, name)
                try:
                    self._put(child, self._chunks(file, child), st.st_mode, st.st_mtime)
                finally:
                    os.close(file)
            else:
                self.progress.skip(child, "not a file, directory or link")

    def _put(
        self, target: bytes, chunks: Iterator[bytes], mode: int | None, mtime: float | None
    ) -> None:
        self.client.put_file(
            self.key,
            target,
            chunks,
            mode=None if mode is None else stat.S_IMODE(mode),
            mtime=mtime,
            make_parents=False,
        )

    def _chunks(self, fd: int, name: bytes) -> Iterator[bytes]:
        while chunk := os.read(fd, _PIECE):
            self.progress.add(name, len(chunk))
            yield chunk


class _Download:
    def __init__(
        self, client: ControlClient, key: str, progress: _Report, stdout: BinaryIO
    ) -> None:
        self.client = client
        self.key = key
        self.progress = progress
        self.stdout = stdout

    def run(self, source: bytes, target: bytes) -> None:
        info = self.client.stat_file(self.key, source)
        if target == b"-":
            if info["kind"] != "file":
                raise UsageError("cp GUEST:PATH - needs PATH to name a file")
            self._get(source, self._to_stdout)
            return
        into_dir = os.path.isdir(target)
        if into_dir and info["kind"] == "dir" and _base(source) in _ITSELF:
            fd = local.open_directory(target)  # SOURCE/. : merged into target, as for uploads
            try:
                self._tree(source, fd)
            finally:
                os.close(fd)
            return
        if into_dir:
            target = _join(target, _base(source))
        directory, name = os.path.split(target)
        fd = local.open_directory(directory or b".")
        try:
            if info["kind"] == "dir":
                sub = local.subdirectory(fd, name, make=True)
                try:
                    self._tree(source, sub)
                    local.set_mode_and_mtime(sub, mode=info["mode"], mtime_ns=info["mtime_ns"])
                finally:
                    os.close(sub)
            else:
                self._file(source, fd, name, info)
        finally:
            os.close(fd)

    def _to_stdout(self, piece: bytes) -> None:
        self.stdout.write(piece)
        self.stdout.flush()

    def _tree(self, source: bytes, fd: int) -> None:
        for entry in self.client.list_files(self.key, source):
            name = _entry_bytes(entry, "name")
            if not name or name in (b".", b"..") or b"/" in name:
                raise UsageError(f"the guest listed a bad name {name!r} in {source!r}")
            child = _join(source, name)
            if entry["kind"] == "dir":
                sub = local.subdirectory(fd, name, make=True)
                try:
                    self._tree(child, sub)
                    local.set_mode_and_mtime(sub, mode=entry["mode"], mtime_ns=entry["mtime_ns"])
                finally:
                    os.close(sub)
            elif entry["kind"] == "symlink":
                local.make_symlink(fd, name, _entry_bytes(entry, "target"))
            elif entry["kind"] == "file":
                self._file(child, fd, name, entry)
            else:
                self.progress.skip(child, f"a {entry['kind']}")

    def _file(self, source: bytes, dir_fd: int, name: bytes, info: dict[str, Any]) -> None:
        """The guest file ``source`` as ``name`` in ``dir_fd``, with the mode and mtime of
        ``info`` (its description)."""
        fd, temp = local.create_temp(dir_fd)
        done = False
        try:
            self._get(source, lambda piece: local.write_all(fd, piece))
            local.install(fd, temp, dir_fd, name, mode=info["mode"], mtime_ns=info["mtime_ns"])
            done = True
        finally:
            os.close(fd)
            if not done:
                local.discard(dir_fd, temp)

    def _get(self, source: bytes, sink: Callable[[bytes], object]) -> None:
        def counted(piece: bytes) -> None:
            sink(piece)
            self.progress.add(source, len(piece))

        self.client.get_file(self.key, source, counted)


def _entry_bytes(entry: dict[str, Any], field: str) -> bytes:
    """A name or link target as the guest's bytes (``FIELD_b64`` when not UTF-8)."""
    encoded = entry.get(f"{field}_b64")
    if isinstance(encoded, str):
        return base64.b64decode(encoded)
    return os.fsencode(str(entry[field]))

"""SHA-256 of a stream of chunks, hashed in a worker thread while the stream moves on.

Standard library only: the host library and the guest agent both use it. A
file transfer hashes every byte on both sides; in the event loop's thread
that would stall the connection for about a millisecond per MiB, so each
chunk is hashed in the loop's thread pool (``hashlib`` releases the GIL),
one chunk at a time and in order, overlapping the reading, sending or
writing of the next.
"""

from __future__ import annotations

import asyncio
import hashlib

__all__ = ["BackgroundDigest"]


class BackgroundDigest:
    """The SHA-256 of every chunk given to :meth:`update`, in order."""

    def __init__(self) -> None:
        self._hasher = hashlib.sha256()
        self._pending: asyncio.Future[None] | None = None
        self.size = 0
        """Bytes given so far."""

    async def update(self, *chunks: bytes | bytearray | memoryview) -> None:
        """Hash ``chunks`` after everything given before. Returns once the previous call's
        chunks are hashed; these must not change until the next call or :meth:`hexdigest`."""
        await self._settle()
        self.size += sum(len(chunk) for chunk in chunks)
        self._pending = asyncio.get_running_loop().run_in_executor(None, self._hash, chunks)

    def _hash(self, chunks: tuple[bytes | bytearray | memoryview, ...]) -> None:
        for chunk in chunks:
            self._hasher.update(chunk)

    async def _settle(self) -> None:
        if self._pending is not None:
            await self._pending
            self._pending = None

    async def hexdigest(self) -> str:
        """The digest of everything given, once it is all hashed: 64 lowercase hex digits."""
        await self._settle()
        return self._hasher.hexdigest()

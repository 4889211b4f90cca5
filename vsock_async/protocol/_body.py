"""How the decoders (v1 and v2) take bytes in: the memory rules for large bodies, and the
loop that copies pushed bytes into the memory a parser lends.

A length prefix is hostile, so nothing of the size it claims is allocated before the bytes
arrive. Headers and small bodies stay in each decoder's scratch (in v1: ``SCRATCH_MIN`` bytes,
grown to ``SCRATCH_SIZE`` for a frame that needs it); a body larger than ``INLINE_MAX`` becomes
a :class:`LargeBody`: chunks that grow with what has arrived (never more than about twice the
bytes received), then, once ``1/WHOLE_AFTER`` of it is in, its final ``bytes`` object
(:class:`WholeBody`), filled in place. The caller's reads go straight into that memory.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Protocol

__all__ = [
    "FIRST_CHUNK",
    "INLINE_MAX",
    "SCRATCH_MIN",
    "SCRATCH_SIZE",
    "WHOLE_AFTER",
    "LargeBody",
    "WholeBody",
    "copy_into_lent_memory",
]

# Per-connection scratch for prefixes and small bodies. An idle connection holds one, so it
# starts at SCRATCH_MIN (every probe's answer and most short outputs fit) and grows to
# SCRATCH_SIZE only for a frame that needs the room; larger bodies get their own chunks.
SCRATCH_MIN = 1024
SCRATCH_SIZE = 8 * 1024
INLINE_MAX = 4 * 1024
FIRST_CHUNK = 64 * 1024
# Once 1/WHOLE_AFTER of a large body has arrived, the body gets its final home: one
# object of its full length, whose pages the kernel provides only as bytes land in them.
WHOLE_AFTER = 8


class WholeBody:
    """A large body's final ``bytes`` object, filled in place through ``io.BytesIO``.

    ``BytesIO(bytes(n))`` adopts that object, ``getbuffer()`` lends its storage,
    and once no view of it is left ``getvalue()`` returns the object itself:
    the body is never copied, and no second buffer exists beside it.
    """

    __slots__ = ("_io", "length", "view")

    def __init__(self, length: int, chunks: list[bytearray]) -> None:
        self.length = length
        self._io = io.BytesIO(bytes(length))
        for chunk in chunks:
            self._io.write(chunk)
        self.view = self._io.getbuffer()

    def peek(self, received: int) -> bytes:
        """A copy of the first ``received`` bytes."""
        return self.view[:received].tobytes()

    def finish(self) -> bytes:
        """The body, as ``bytes``; a copy only if a lent view is still alive somewhere."""
        self.view.release()
        return self._io.getvalue()


class LargeBody:
    """A body of ``length`` bytes (more than ``INLINE_MAX``) being received.

    Starts with the bytes already in the scratch; :meth:`buffer` lends memory for the next
    ones, :meth:`commit` counts them in, :meth:`take` hands over the finished body.
    """

    __slots__ = ("_fill", "chunks", "length", "received", "whole")

    def __init__(self, length: int, arrived: memoryview) -> None:
        available = len(arrived)
        first = bytearray(min(length, max(FIRST_CHUNK, available)))
        first[:available] = arrived
        self.length = length
        self.chunks: list[bytearray] | None = [first]  # None once the body is whole
        self.whole: WholeBody | None = None
        self._fill = available  # bytes written into the last chunk
        self.received = available

    def buffer(self) -> memoryview:
        """Memory for the next bytes of the body."""
        if self.whole is not None:
            return self.whole.view[self.received :]
        chunks = self.chunks
        assert chunks is not None
        chunk = chunks[-1]
        if self._fill == len(chunk):
            if self.received * WHOLE_AFTER >= self.length:
                self.whole = WholeBody(self.length, chunks)
                self.chunks = None
                return self.whole.view[self.received :]
            chunk = bytearray(min(self.length - self.received, max(self.received, FIRST_CHUNK)))
            chunks.append(chunk)
            self._fill = 0
        return memoryview(chunk)[self._fill :]

    def commit(self, nbytes: int) -> bool:
        """Count ``nbytes`` written into the last buffer lent; True once the body is complete."""
        self._fill += nbytes
        self.received += nbytes
        return self.received == self.length

    def take(self) -> bytes | WholeBody:
        """The complete body: ``bytes``, or the :class:`WholeBody` to :meth:`~WholeBody.finish`
        once no view lent for the last read is left."""
        if self.whole is not None:
            return self.whole
        chunks = self.chunks
        assert chunks is not None
        return bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)

    def peek(self) -> bytes:
        """A copy of the bytes received so far."""
        if self.whole is not None:
            return self.whole.peek(self.received)
        assert self.chunks is not None
        return b"".join(self.chunks)[: self.received]


class _Lender(Protocol):
    """What takes bytes the way ``asyncio.BufferedProtocol`` does."""

    def get_buffer(self, sizehint: int = -1) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...


def copy_into_lent_memory(
    receiver: _Lender, data: bytes | bytearray | memoryview, stop: Callable[[], bool] | None = None
) -> None:
    """Copy ``data`` into the memory ``receiver`` lends, committing each piece; the
    ``receive_data()`` of a parser whose own input path is ``get_buffer()``. Stops early
    once ``stop()`` is true."""
    src = memoryview(data).cast("B")
    while src:
        with receiver.get_buffer() as dst:
            n = min(len(dst), len(src))
            dst[:n] = src[:n]
        src = src[n:]
        receiver.buffer_updated(n)
        if stop is not None and stop():
            return

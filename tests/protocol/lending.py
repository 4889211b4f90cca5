"""Feeding a sans-I/O parser the way ``asyncio.BufferedProtocol`` does, for the protocol tests."""

from __future__ import annotations

from collections.abc import Callable

from vsock_async.protocol._body import _Lender


def lend(receiver: _Lender, data: bytes, after: Callable[[], object] = lambda: None) -> None:
    """Write ``data`` into the memory ``receiver`` lends, commit, call ``after()``, repeat
    (``after`` takes what a commit produced, as an I/O layer does before lending again)."""
    pos = 0
    while pos < len(data):
        with receiver.get_buffer(-1) as buf:
            assert len(buf) > 0
            n = min(len(buf), len(data) - pos)
            buf[:n] = data[pos : pos + n]
        receiver.buffer_updated(n)
        after()
        pos += n

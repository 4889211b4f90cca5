"""What ``listen()`` and ``connect()`` share: the asyncio loop they need, and being usable
both as ``await f()`` and ``async with f()``."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from ..errors import UsageError


def running_loop() -> asyncio.AbstractEventLoop:
    """The running asyncio loop; a clear :class:`UsageError` under any other (trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise UsageError(
            "vsock_async needs a running asyncio event loop"
            " (anyio on the asyncio backend works; trio does not)"
        ) from None


class _Closable(Protocol):
    async def aclose(self) -> None: ...


_T = TypeVar("_T", bound=_Closable)


class Opening(Generic[_T]):
    """An awaitable that is also an async context manager closing what it opened."""

    __slots__ = ("_opener", "_value")

    def __init__(self, opener: Coroutine[Any, Any, _T]) -> None:
        self._opener = opener
        self._value: _T | None = None

    def __await__(self) -> Generator[Any, None, _T]:
        return self._opener.__await__()

    async def __aenter__(self) -> _T:
        self._value = await self._opener
        return self._value

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._value is not None:
            await self._value.aclose()

"""A minimal v2 host for agent tests: the hello in v1 framing, then a HostSession over one socket.

Independent of the host library on purpose (the agent is tested against the pure
protocol core, not against another layer under test). Events are sorted into one
queue per stream; :meth:`HostEnd.raw` writes arbitrary bytes for hostile tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tests.agent_process import LONG
from vsock_async.errors import ProtocolError
from vsock_async.protocol import ResultDecoder, encode_command
from vsock_async.protocol.v2 import (
    DEFAULT_MAX_FRAME,
    Channel,
    Exited,
    HelloAnswer,
    HostSession,
    Output,
    Pong,
    RequestFailed,
    Started,
    StdinCredit,
    StreamError,
    hello_command,
    new_nonce,
    parse_hello_answer,
)
from vsock_async.results import CommandResult


@dataclass
class Outcome:
    """Everything one stream said, in order, once it ended."""

    pid: int | None = None
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exited: Exited | None = None
    error: StreamError | None = None


class HostEnd:
    """One connection to an agent, as a host sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.session: HostSession | None = None
        self.events: defaultdict[int, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)
        self.closed = asyncio.get_running_loop().create_future()
        self.error: ProtocolError | None = None
        self.reading = asyncio.Event()
        """Cleared: the host stops reading the connection (a stalled host)."""
        self.reading.set()
        self._pump: asyncio.Task[None] | None = None

    async def v1(self, command: bytes) -> CommandResult:
        """One v1 exchange (before any hello, or instead of it)."""
        self.writer.write(encode_command(command))
        decoder = ResultDecoder()
        while (result := decoder.next_event()) is None:
            data = await asyncio.wait_for(self.reader.read(1 << 16), LONG)
            assert data, "the agent closed the connection during a v1 exchange"
            decoder.receive_data(data)
        assert not decoder.holds_more()
        return result

    async def hello(self, max_frame: int = DEFAULT_MAX_FRAME) -> HelloAnswer:
        """Negotiate v2; fails the test if the agent does not switch."""
        nonce = new_nonce()
        result = await self.v1(hello_command(nonce, max_frame))
        answer = parse_hello_answer(result, nonce)
        assert answer is not None, f"the agent did not switch to v2: {result!r}"
        self.session = HostSession(answer, max_frame)
        self._pump = asyncio.create_task(self._read())
        return answer

    async def _read(self) -> None:
        assert self.session is not None
        try:
            while await self.reading.wait() and (data := await self.reader.read(1 << 20)):
                try:
                    self.session.receive_data(data)
                except ProtocolError as exc:
                    self.error = exc
                    return
                while (event := self.session.next_event()) is not None:
                    stream = 0 if isinstance(event, Pong) else event.stream
                    self.events[stream].put_nowait(event)
                self.flush()
        except ConnectionError:
            pass
        finally:
            self.closed.set_result(None)

    def flush(self) -> None:
        assert self.session is not None
        if data := self.session.data_to_send():
            self.writer.writelines(data)

    def raw(self, data: bytes) -> None:
        """Bytes on the wire as they are, past the session (hostile tests)."""
        self.writer.write(data)

    def exec(self, request: dict[str, Any], window: int = 1 << 20) -> int:
        assert self.session is not None
        stream = self.session.open_exec(request, window)
        self.flush()
        return stream

    async def next(self, stream: int) -> Any:
        return await asyncio.wait_for(self.events[stream].get(), LONG)

    async def outcome(self, stream: int, grant: bool = True) -> Outcome:
        """Read ``stream`` to its end, returning credit as output arrives when ``grant``."""
        assert self.session is not None
        outcome = Outcome()
        while True:
            event = await self.next(stream)
            if isinstance(event, Started):
                outcome.pid = event.pid
            elif isinstance(event, Output):
                (outcome.stdout if event.channel == Channel.STDOUT else outcome.stderr).extend(
                    event.data
                )
                if grant and event.data:
                    self.session.grant(stream, event.channel, len(event.data))
                    self.flush()
            elif isinstance(event, Exited):
                outcome.exited = event
                return outcome
            elif isinstance(event, StreamError):
                outcome.error = event
                return outcome
            else:
                assert isinstance(event, RequestFailed | StdinCredit), event

    async def run(self, request: dict[str, Any], window: int = 1 << 20, **kw: Any) -> Outcome:
        return await self.outcome(self.exec(request, window), **kw)

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

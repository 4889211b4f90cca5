"""Guests written in the tests: they dial a server over a real socket and answer with the
protocol encoders, or misbehave on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from vsock_async.protocol import CommandDecoder, encode_result
from vsock_async.protocol.v2 import HELLO_PREFIX


@dataclass
class Raw:
    """Send these bytes as the answer instead of a well-formed result; optionally close after."""

    data: bytes
    close: bool = False
    reset: bool = False


@dataclass
class Silent:
    """Answer nothing (a hung guest)."""


Answer = tuple[bytes, bytes, int] | Raw | Silent
Handler = Callable[[bytes], Awaitable[Answer]]


async def echo_handler(command: bytes) -> Answer:
    """Probe → exit 0; ``exit N`` → N; ``big N`` → N bytes of stdout; else echo the command."""
    if command == b":":
        return b"", b"", 0
    if command.startswith(b"exit "):
        return b"", b"", int(command[5:])
    if command.startswith(b"big "):
        n = int(command[4:])
        return bytes(i % 251 for i in range(256)) * (n // 256) + b"z" * (n % 256), b"e", 0
    if command == b"hang":
        return Silent()
    return command, b"stderr:" + command, 3


async def shell_handler(command: bytes) -> Answer:
    """Run ``command`` with ``/bin/sh -c``, as a v1 shell-loop guest does."""
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await proc.communicate()
    assert proc.returncode is not None
    return stdout, stderr, proc.returncode & 0xFF


class ScriptedGuest:
    """A v1 guest that dials ``path`` (unix) or ``(host, port)`` (tcp) and answers with ``handler``.

    Like a v1 shell loop, it runs the protocol v2 hello as the no-op ``:`` (exit 0, no
    output), so a server on ``protocol="auto"`` settles on v1; the hellos it got are in
    :attr:`hellos`, every other command in :attr:`commands`. With ``handle_hello``
    the hello goes to ``handler`` like any command.
    """

    def __init__(self, handler: Handler = echo_handler, *, handle_hello: bool = False) -> None:
        self.handler = handler
        self.handle_hello = handle_hello
        self.commands: list[bytes] = []
        self.hellos: list[bytes] = []
        self.task: asyncio.Task[None] | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self, address: str | tuple[str, int]) -> None:
        if isinstance(address, str):
            reader, writer = await asyncio.open_unix_connection(address)
        else:
            reader, writer = await asyncio.open_connection(*address)
        self.writer = writer
        self.task = asyncio.create_task(self._serve(reader, writer))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = CommandDecoder(1 << 30)
        try:
            while data := await reader.read(1 << 16):
                decoder.receive_data(data)
                while (event := decoder.next_event()) is not None:
                    command = event.command  # type: ignore[union-attr]
                    if command.startswith(HELLO_PREFIX) and not self.handle_hello:
                        self.hellos.append(command)
                        writer.write(encode_result(b"", b"", 0))
                        continue
                    self.commands.append(command)
                    answer = await self.handler(command)
                    if isinstance(answer, Silent):
                        continue
                    if isinstance(answer, Raw):
                        writer.write(answer.data)
                        await writer.drain()
                        if answer.reset:
                            sock = writer.get_extra_info("socket")
                            sock.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0"
                            )
                        if answer.close or answer.reset:
                            writer.close()
                            return
                        continue
                    writer.write(encode_result(*answer))
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

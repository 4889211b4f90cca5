"""Guests that attack the host: raw sockets (Unix or TCP loopback) in the test's event loop.

A :class:`RawGuest` reads command frames with the library's own decoder
and writes whatever the test tells it to: well-formed results, half frames,
length bombs, a trickle, nothing at all; it can close or reset at any point.
:func:`answer_forever` is the well-behaved bystander whose exchanges must
keep completing while the others attack.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable

from vsock_async import CommandServer, GuestChannel
from vsock_async.protocol import Command, CommandDecoder, encode_result

__all__ = [
    "Address",
    "Bystander",
    "RawGuest",
    "accept_guest",
    "answer_for",
    "answer_forever",
    "bomb_prefix",
    "bystander",
    "dial_address",
    "open_fds",
]

Address = str | tuple[str, int]
"""A Unix socket path, or a TCP (host, port)."""


def dial_address(server: CommandServer) -> Address:
    """Where a guest dials the server's first listener."""
    name = server.sockets[0].getsockname()
    return name if isinstance(name, str) else (str(name[0]), int(name[1]))


def bomb_prefix(length: int = 0xFFFF_FFFF) -> bytes:
    """A length prefix announcing ``length`` bytes (a stdout field, if sent first)."""
    return struct.pack(">I", length)


def answer_for(command: bytes) -> tuple[bytes, bytes, int]:
    """What a well-behaved test guest answers: distinct for every distinct command."""
    return b"out:" + command, b"err:" + command[::-1], len(command) % 256


def open_fds() -> int:
    """File descriptors this process holds."""
    return len(os.listdir("/proc/self/fd"))


class RawGuest:
    """One guest connection on a raw non-blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._decoder = CommandDecoder(1 << 30)
        self.commands: list[bytes] = []

    @classmethod
    async def dial(cls, address: Address) -> RawGuest:
        """Connect to a listening server."""
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def read_command(self) -> bytes:
        """The next command frame's body; ConnectionError if the host closes first."""
        while (event := self._decoder.next_event()) is None:
            data = await self._loop.sock_recv(self.sock, 65536)
            if not data:
                raise ConnectionResetError("the host closed the connection")
            self._decoder.receive_data(data)
        assert isinstance(event, Command)
        self.commands.append(event.command)
        return event.command

    async def send(self, data: bytes) -> None:
        await self._loop.sock_sendall(self.sock, data)

    async def answer(self, stdout: bytes, stderr: bytes, exit_code: int) -> None:
        await self.send(encode_result(stdout, stderr, exit_code))

    async def trickle(
        self, data: bytes, between: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Send ``data`` one byte at a time, a millisecond (and ``between()``) apart."""
        for i in range(len(data)):
            await self.send(data[i : i + 1])
            await asyncio.sleep(0.001)
            if between is not None:
                await between()

    async def wait_closed_by_host(self) -> bytes:
        """Read until the host closes (EOF or reset); what arrived meanwhile."""
        received = bytearray()
        with contextlib.suppress(ConnectionError):
            while data := await self._loop.sock_recv(self.sock, 65536):
                received += data
        return bytes(received)

    def close(self) -> None:
        """An orderly close (FIN)."""
        self.sock.close()

    def reset(self) -> None:
        """An abortive close: SO_LINGER 0 makes TCP send RST instead of FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


async def answer_forever(
    guest: RawGuest, answer: Callable[[bytes], tuple[bytes, bytes, int]] = answer_for
) -> None:
    """Answer every command until the host closes; a well-behaved guest."""
    with contextlib.suppress(ConnectionError):
        while True:
            command = await guest.read_command()
            await guest.answer(*answer(command))


async def accept_guest(server: CommandServer, address: Address) -> tuple[RawGuest, GuestChannel]:
    """Dial ``server`` and accept the connection that results."""
    guest = await RawGuest.dial(address)
    channel = await server.accept(timeout=5)
    return guest, channel


class Bystander:
    """A well-behaved guest the test keeps busy, counting the exchanges that complete."""

    def __init__(self, channel: GuestChannel, guest: RawGuest) -> None:
        self.channel = channel
        self.guest = guest
        self.completed = 0
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._answering: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        n = 0
        while True:
            command = f"bystander {n}".encode()
            result = await self.channel.run(command, timeout=5)
            assert (result.stdout, result.stderr, result.exit_code) == answer_for(command)
            n += 1
            self.completed = n
            self._progress.set()

    def start(self) -> Bystander:
        self._answering = asyncio.create_task(answer_forever(self.guest))
        self._task = asyncio.create_task(self._loop())
        return self

    async def progress(self, count: int = 1) -> None:
        """Wait until ``count`` more exchanges have completed (fails if the bystander fails)."""
        target = self.completed + count
        while self.completed < target:
            assert self._task is not None
            if self._task.done():
                self._task.result()
                raise AssertionError("the bystander stopped")
            self._progress.clear()
            waiter = asyncio.ensure_future(self._progress.wait())
            await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def stop(self) -> int:
        """Stop exchanging; the number of exchanges that completed."""
        for task in (self._task, self._answering):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await task
        self.guest.close()
        return self.completed


async def bystander(server: CommandServer, address: Address) -> Bystander:
    """Connect a well-behaved guest and start exchanging with it."""
    guest, channel = await accept_guest(server, address)
    return Bystander(channel, guest).start()

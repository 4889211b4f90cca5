"""Test doubles for hybrid vsock: guests that speak v1 with the protocol encoders, and a
stand-in for Firecracker's host-side vsock muxer (``docs/vsock.md`` of Firecracker).

The muxer double does what Firecracker documents for host-initiated connections:
a host process connects to the VMM's Unix socket ``uds_path`` and sends
``CONNECT <port>\\n`` (any letter case); if a guest listens on vsock port ``port``
the muxer answers ``OK <assigned_host_port>\\n`` and from then on relays bytes both
ways; if nothing listens, it closes the connection. A guest "listening on vsock
port P" is, here, a Unix socket at ``f"{guest_dir}/port_{P}"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Awaitable, Callable

from vsock_async.protocol import Command, CommandDecoder, encode_result
from vsock_async.protocol.v2 import HELLO_PREFIX

Answer = tuple[bytes, bytes, int]
Handler = Callable[[bytes], Awaitable[Answer]]


class GuestScript:
    """What a v1 test guest answers: ``:`` → exit 0; ``exit N``; ``wait NAME`` blocks until
    :meth:`release` (NAME); ``close`` drops the connection; anything else is echoed.

    Like a v1 shell, it runs the protocol v2 hello as ``:``; hellos are kept in
    :attr:`hellos`, not in :attr:`commands`.
    """

    def __init__(self, name: str = "guest") -> None:
        self.name = name
        self.commands: list[bytes] = []
        self.hellos: list[bytes] = []
        self.running = 0
        self.max_running = 0
        self._gates: dict[bytes, asyncio.Event] = {}
        self.started: asyncio.Queue[bytes] = asyncio.Queue()

    def gate(self, name: bytes) -> asyncio.Event:
        return self._gates.setdefault(name, asyncio.Event())

    def release(self, name: bytes) -> None:
        self.gate(name).set()

    async def answer(self, command: bytes) -> Answer | None:
        if command.startswith(HELLO_PREFIX):
            self.hellos.append(command)
            return b"", b"", 0
        self.commands.append(command)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.started.put_nowait(command)
        try:
            if command == b":":
                return b"", b"", 0
            if command.startswith(b"exit "):
                return b"", b"", int(command[5:])
            if command.startswith(b"wait "):
                await self.gate(command[5:]).wait()
                return self.name.encode() + b":" + command, b"", 0
            if command == b"close":
                return None
            return self.name.encode() + b":" + command, b"", 0
        finally:
            self.running -= 1


async def serve_connection(
    script: GuestScript, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer commands on one connection, one at a time, until EOF or a ``close`` command."""
    decoder = CommandDecoder()
    try:
        while data := await reader.read(65536):
            decoder.receive_data(data)
            while (event := decoder.next_event()) is not None:
                assert isinstance(event, Command)
                answer = await script.answer(event.command)
                if answer is None:
                    return
                writer.write(encode_result(*answer))
                await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class DialingGuest:
    """A guest agent stand-in that dials the host's Unix socket; each ``dial`` is one connection."""

    def __init__(self, path: str, script: GuestScript | None = None) -> None:
        self.path = path
        self.script = script or GuestScript()
        self.tasks: list[asyncio.Task[None]] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def dial(self, count: int = 1) -> None:
        for _ in range(count):
            reader, writer = await asyncio.open_unix_connection(self.path)
            self.writers.append(writer)
            self.tasks.append(asyncio.create_task(serve_connection(self.script, reader, writer)))

    def drop(self, index: int = 0) -> None:
        """Reset connection ``index`` at once, as a crashed or restored VM does."""
        transport = self.writers[index].transport
        transport.abort()

    async def aclose(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class ListeningGuest:
    """A guest agent stand-in listening on a Unix socket (its vsock port, behind the muxer)."""

    def __init__(self, path: str, script: GuestScript | None = None) -> None:
        self.path = path
        self.script = script or GuestScript()
        self.server: asyncio.Server | None = None
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._on_client, self.path)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await serve_connection(self.script, reader, writer)

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class FirecrackerMuxer:
    """Firecracker's host-side vsock muxer for host-initiated connections, over Unix sockets.

    ``handshake_bytes`` records what each host connection sent before the
    relay started, so tests can check the host sent exactly one line.
    """

    def __init__(self, uds_path: str, guest_dir: str) -> None:
        self.uds_path = uds_path
        self.guest_dir = guest_dir
        self.server: asyncio.Server | None = None
        self.accepted = 0
        self.refused = 0
        self.handshakes: list[bytes] = []
        self.reply_delay = 0.0
        self._host_ports = itertools.count(1073741824)
        self._tasks: set[asyncio.Task[None]] = set()

    def guest_port_path(self, port: int) -> str:
        return os.path.join(self.guest_dir, f"port_{port}")

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._on_host, self.uds_path)

    async def _on_host(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            line = await reader.readline()
            self.handshakes.append(line)
            parts = line.decode("ascii", "replace").split()
            if len(parts) != 2 or parts[0].upper() != "CONNECT" or not parts[1].isdigit():
                return
            try:
                guest_reader, guest_writer = await asyncio.open_unix_connection(
                    self.guest_port_path(int(parts[1]))
                )
            except OSError:
                self.refused += 1
                return
            if self.reply_delay:
                await asyncio.sleep(self.reply_delay)
            writer.write(f"OK {next(self._host_ports)}\n".encode())
            await asyncio.gather(
                _pipe(reader, guest_writer), _pipe(guest_reader, writer), return_exceptions=True
            )
        finally:
            writer.close()

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(OSError):
                os.unlink(self.uds_path)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()

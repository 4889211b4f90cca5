"""Benchmark 1: probe-sized exchanges per second on one connection.

Over a Unix socket; with ``--transport vsock``, over AF_VSOCK inside the VM tier's guest.

Ours is ``GuestChannel.probe()`` on a channel from ``listen()``/``accept()``.
Baselines, each on its own connection to its own instant guest process:
plain blocking sockets (``sendall`` then ``recv`` until the result is whole),
and the floor of any asyncio design (a bare ``asyncio.Protocol`` that writes
the frame and awaits one future under ``asyncio.wait_for``). Run on the
default loop and, when installed, on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import socket
import struct
import time
from collections.abc import Callable, Iterator
from types import ModuleType

import vsock_async

from ._harness import Endpoint, Table, endpoint, fresh_dir, guest_process

NAME = "exchange"
FRAME = b"\0\0\0\x01:"
_U32 = struct.Struct(">I")


class FloorProtocol(asyncio.Protocol):
    """The least an asyncio client can do: write, and resolve one future per 9-byte answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[bytes] | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= 9 and self.waiter is not None:
            waiter, self.waiter, self.buf = self.waiter, None, b""
            waiter.set_result(data)


Measure = tuple[float, float]  # (exchanges per second, host CPU microseconds per exchange)


def _measured(n: int, wall: float, cpu: float) -> Measure:
    return n / wall, cpu / n * 1e6


async def floor_rounds(proto: FloorProtocol, n: int) -> Measure:
    loop = asyncio.get_running_loop()
    assert proto.transport is not None
    write = proto.transport.write
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        proto.waiter = fut = loop.create_future()
        write(FRAME)
        await asyncio.wait_for(fut, 10)
    return _measured(n, time.perf_counter() - start, time.process_time() - cpu)


async def ours_rounds(channel: vsock_async.GuestChannel, n: int) -> Measure:
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        await channel.probe(timeout=10)
    return _measured(n, time.perf_counter() - start, time.process_time() - cpu)


def recv_result(sock: socket.socket) -> tuple[bytes, bytes, int]:
    """Read one whole result frame with blocking ``recv`` calls."""
    buf = sock.recv(65536)
    while True:
        if len(buf) >= 4:
            (n1,) = _U32.unpack_from(buf)
            if len(buf) >= 8 + n1:
                (n2,) = _U32.unpack_from(buf, 4 + n1)
                end = 9 + n1 + n2
                if len(buf) >= end:
                    return buf[4 : 4 + n1], buf[8 + n1 : end - 1], buf[end - 1]
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("guest closed")
        buf += more


def blocking_rounds(sock: socket.socket, n: int) -> Measure:
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        sock.sendall(FRAME)
        recv_result(sock)
    return _measured(n, time.perf_counter() - start, time.process_time() - cpu)


@contextlib.contextmanager
def _plain_connection(ep: Endpoint) -> Iterator[socket.socket]:
    with ep.raw_listener() as lsock, guest_process(["--connect", ep.guest]):
        conn, _ = lsock.accept()
        with conn:
            yield conn


class _LoopSide:
    """Our channel and a floor protocol, both on one event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stack: contextlib.ExitStack,
        ours: Endpoint,
        floor: Endpoint,
    ):
        self.loop = loop
        server = loop.run_until_complete(vsock_async.listen(ours.address))
        stack.callback(lambda: loop.run_until_complete(server.aclose()))
        stack.enter_context(guest_process(["--connect", ours.guest]))
        self.channel = loop.run_until_complete(server.accept(timeout=60))
        sock = stack.enter_context(_plain_connection(floor))
        sock.setblocking(False)
        _, self.floor = loop.run_until_complete(loop.connect_accepted_socket(FloorProtocol, sock))

    def ours(self, n: int) -> Measure:
        return self.loop.run_until_complete(ours_rounds(self.channel, n))

    def floor_rate(self, n: int) -> Measure:
        return self.loop.run_until_complete(floor_rounds(self.floor, n))


def installed_uvloop() -> ModuleType | None:
    """uvloop if it is installed (imported by name: optional, and no stubs needed to check)."""
    try:
        return importlib.import_module("uvloop")
    except ImportError:
        return None


def uvloop_vsock_note() -> str:
    """Whether uvloop serves an AF_VSOCK listening socket (bind/listen only, never connect)."""
    uvloop = installed_uvloop()
    if uvloop is None:
        return "uvloop is not installed (pip install 'vsock_async[uvloop]')"
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        return "AF_VSOCK is not available here; uvloop's support for it is untested"
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot create an AF_VSOCK socket here ({exc}); uvloop untested on it"
    loop = uvloop.new_event_loop()
    try:
        sock.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
        sock.listen(1)
        sock.setblocking(False)
        server = loop.run_until_complete(loop.create_server(asyncio.Protocol, sock=sock))
        server.close()
        loop.run_until_complete(server.wait_closed())
        return "uvloop accepts an AF_VSOCK listening socket (create_server(sock=...))"
    except Exception as exc:
        return f"uvloop refuses an AF_VSOCK socket: {type(exc).__name__}: {exc}"
    finally:
        sock.close()
        loop.close()


def run(
    quick: bool = False,
    rounds: int | None = None,
    transport: str = "unix",
    exchanges: int | None = None,
) -> Table:
    n = exchanges or (100 if quick else 400)
    rounds = rounds or (2 if quick else 41)
    kind = "Unix-socket" if transport == "unix" else "AF_VSOCK"
    table = Table(f"1. exchange rate, one {kind} connection ({n} probes per round)")
    uvloop = installed_uvloop()
    with contextlib.ExitStack() as stack, fresh_dir() as d:
        default_loop = asyncio.new_event_loop()
        stack.callback(default_loop.close)

        def make_side(loop: asyncio.AbstractEventLoop, tag: str) -> _LoopSide:
            eps = (endpoint(transport, d, f"ours-{tag}"), endpoint(transport, d, f"floor-{tag}"))
            return _LoopSide(loop, stack, *eps)

        sides = [("asyncio", make_side(default_loop, "asyncio"))]
        if uvloop is not None:
            uv_loop = uvloop.new_event_loop()
            stack.callback(uv_loop.close)
            sides.append(("uvloop", make_side(uv_loop, "uvloop")))
        blocking = stack.enter_context(_plain_connection(endpoint(transport, d, "blocking")))

        contenders: list[tuple[str, Callable[[int], Measure]]] = [
            ("blocking", lambda k: blocking_rounds(blocking, k))
        ]
        for label, side in sides:
            contenders.append((f"ours-{label}", side.ours))
            contenders.append((f"floor-{label}", side.floor_rate))
        for _, fn in contenders:  # warm up every path once
            fn(max(10, n // 10))
        measures: dict[str, list[Measure]] = {name: [] for name, _ in contenders}
        for r in range(rounds):
            k = r % len(contenders)
            for name, fn in contenders[k:] + contenders[:k]:
                measures[name].append(fn(n))

    def row(name: str, ours: str, base: str, target: float | None) -> None:
        if ours in measures and base in measures:
            rw = table.row(name, "exch/s", baseline_name=base, target=target)
            for o, b in zip(measures[ours], measures[base], strict=True):
                rw.add(o[0], b[0])

    def cpu_row(name: str, ours: str, base: str) -> None:
        if ours in measures and base in measures:
            rw = table.row(name, "CPU us/exch", baseline_name=base, higher_is_better=False)
            for o, b in zip(measures[ours], measures[base], strict=True):
                rw.add(o[1], b[1])

    row("default loop: ours vs asyncio floor", "ours-asyncio", "floor-asyncio", 0.9)
    row("default loop: ours vs blocking sockets", "ours-asyncio", "blocking", None)
    row("default loop: asyncio floor vs blocking", "floor-asyncio", "blocking", None)
    row("uvloop: ours vs blocking sockets", "ours-uvloop", "blocking", 0.5)
    row("uvloop: ours vs uvloop floor", "ours-uvloop", "floor-uvloop", None)
    row("uvloop: uvloop floor vs blocking", "floor-uvloop", "blocking", None)
    cpu_row("default loop: host CPU, ours vs asyncio floor", "ours-asyncio", "floor-asyncio")
    cpu_row("default loop: host CPU, ours vs blocking", "ours-asyncio", "blocking")
    cpu_row("uvloop: host CPU, ours vs uvloop floor", "ours-uvloop", "floor-uvloop")
    cpu_row("uvloop: host CPU, ours vs blocking", "ours-uvloop", "blocking")
    table.notes.append(uvloop_vsock_note())
    table.notes.append("'floor vs blocking' rows compare two baselines, for context")
    table.notes.append(
        "host CPU = process_time of the host process per exchange (user+system, this process"
        " only); CPU ratios are baseline/ours, above 1 means we spend less"
    )
    return table

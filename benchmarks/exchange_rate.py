"""Benchmark 1: small exchanges per second on one connection, against the real asyncio floor.

Over a Unix socket; with ``--transport vsock``, over AF_VSOCK inside the VM tier's guest.

Ours is ``GuestChannel.probe()`` (the empty answer's fast path) and ``GuestChannel.run()``
of a command whose answer is ``ok\\n`` (a small non-empty result), on a channel from
``listen()``/``accept()``, each with its deadline. Baselines, on their own connections to
their own instant guest processes, on the default loop and on uvloop:

- the floor: an ``asyncio.BufferedProtocol`` that reads into one reused buffer and resolves
  one future per exchange, with no deadline: the least any asyncio design can do;
- the floor plus one ``call_later`` per exchange (the least a deadline adds);
- asyncio streams under ``asyncio.timeout``: what a user writes instead of this library;
- plain blocking sockets (``sendall``, then ``recv`` until the result is whole), on no loop.

A round is thousands of exchanges of every contender, run as ten passes over all of them
(the order rotates each round), so a burst of load hits every contender alike. Every row is
the median of per-round ratios, and each rate row has the host CPU row of the same pair
beside it (``process_time``, far steadier than wall clock on a busy machine).
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

from ._guest import OK_ANSWER, PROBE_ANSWER
from ._harness import Endpoint, Table, endpoint, fresh_dir, guest_process

NAME = "exchange"
FRAME = b"\0\0\0\x01:"
ECHO = b"echo"  # the instant guest answers it with stdout "ok\n", exit 0
ECHO_FRAME = len(ECHO).to_bytes(4, "big") + ECHO
DEADLINE = 10.0  # seconds; never fires, but every contender but the floor pays for one
_U32 = struct.Struct(">I")

Measure = tuple[float, float]  # (exchanges per second, host CPU microseconds per exchange)


def _measured(n: int, wall: float, cpu: float) -> Measure:
    return n / wall, cpu / n * 1e6


class FloorProtocol(asyncio.BufferedProtocol):
    """The least an asyncio client can do: reads land in one reused buffer, and one future
    per exchange resolves once the expected number of answer bytes is in."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = memoryview(bytearray(65536))
        self.waiter: asyncio.Future[None] | None = None
        self.expected = 0
        self.got = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.got += nbytes
        waiter = self.waiter
        if waiter is not None and self.got >= self.expected:
            self.waiter = None
            self.got = 0
            waiter.set_result(None)


async def floor_rounds(proto: FloorProtocol, frame: bytes, answer: int, n: int) -> Measure:
    """``n`` exchanges on the bare floor: write, await one future, nothing else."""
    loop = asyncio.get_running_loop()
    assert proto.transport is not None
    write = proto.transport.write
    proto.expected = answer
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        proto.waiter = fut = loop.create_future()
        write(frame)
        await fut
    return _measured(n, time.perf_counter() - start, time.process_time() - cpu)


async def floor_timer_rounds(proto: FloorProtocol, frame: bytes, answer: int, n: int) -> Measure:
    """The floor plus one ``call_later`` per exchange, cancelled when the answer comes."""
    loop = asyncio.get_running_loop()
    assert proto.transport is not None
    write = proto.transport.write
    proto.expected = answer
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        proto.waiter = fut = loop.create_future()
        timer = loop.call_later(DEADLINE, fut.cancel)
        write(frame)
        await fut
        timer.cancel()
    return _measured(n, time.perf_counter() - start, time.process_time() - cpu)


async def read_result(reader: asyncio.StreamReader) -> tuple[bytes, bytes, int]:
    """One v1 result frame, read the way a streams user writes it."""
    (n_out,) = _U32.unpack(await reader.readexactly(4))
    stdout = await reader.readexactly(n_out)
    (n_err,) = _U32.unpack(await reader.readexactly(4))
    stderr = await reader.readexactly(n_err)
    return stdout, stderr, (await reader.readexactly(1))[0]


async def streams_rounds(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frame: bytes, n: int
) -> Measure:
    """What a user writes with asyncio streams: write, drain, read the frame, under a timeout."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        async with asyncio.timeout(DEADLINE):
            writer.write(frame)
            await writer.drain()
            await read_result(reader)
    return _measured(n, time.perf_counter() - start, time.process_time() - cpu)


async def ours_probe_rounds(channel: vsock_async.GuestChannel, n: int) -> Measure:
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        await channel.probe(timeout=DEADLINE)
    return _measured(n, time.perf_counter() - start, time.process_time() - cpu)


async def ours_run_rounds(channel: vsock_async.GuestChannel, n: int) -> Measure:
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        await channel.run(ECHO, timeout=DEADLINE)
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


def blocking_rounds(sock: socket.socket, frame: bytes, n: int) -> Measure:
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        sock.sendall(frame)
        recv_result(sock)
    return _measured(n, time.perf_counter() - start, time.process_time() - cpu)


@contextlib.contextmanager
def _plain_connection(ep: Endpoint) -> Iterator[socket.socket]:
    with ep.raw_listener() as lsock, guest_process(["--connect", ep.guest]):
        conn, _ = lsock.accept()
        with conn:
            yield conn


class _LoopSide:
    """Our channel, a floor protocol and an asyncio streams pair, all on one event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, stack: contextlib.ExitStack, eps: list[Endpoint]
    ):
        self.loop = loop
        run = loop.run_until_complete
        server = run(vsock_async.listen(eps[0].address))
        stack.callback(lambda: run(server.aclose()))
        stack.enter_context(guest_process(["--connect", eps[0].guest]))
        self.channel = run(server.accept(timeout=60))
        sock = stack.enter_context(_plain_connection(eps[1]))
        sock.setblocking(False)
        _, self.floor = run(loop.connect_accepted_socket(FloorProtocol, sock))
        sock = stack.enter_context(_plain_connection(eps[2]))
        sock.setblocking(False)
        self.reader, self.writer = run(asyncio.open_connection(sock=sock))

    def contenders(self, tag: str) -> dict[str, Callable[[int], Measure]]:
        run = self.loop.run_until_complete
        floor = self.floor
        return {
            f"ours-probe-{tag}": lambda n: run(ours_probe_rounds(self.channel, n)),
            f"ours-run-{tag}": lambda n: run(ours_run_rounds(self.channel, n)),
            f"floor-probe-{tag}": lambda n: run(floor_rounds(floor, FRAME, len(PROBE_ANSWER), n)),
            f"floor-run-{tag}": lambda n: run(floor_rounds(floor, ECHO_FRAME, len(OK_ANSWER), n)),
            f"floor-timer-{tag}": lambda n: run(
                floor_timer_rounds(floor, FRAME, len(PROBE_ANSWER), n)
            ),
            f"streams-{tag}": lambda n: run(streams_rounds(self.reader, self.writer, FRAME, n)),
        }


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


SLICES = 10


def _interleaved(
    contenders: dict[str, Callable[[int], Measure]], order: list[str], n: int
) -> dict[str, Measure]:
    """One round: ``n`` exchanges of each contender, run as ``SLICES`` passes of ``n/SLICES``
    each over all of them, so a burst of load from elsewhere hits every contender alike."""
    each = max(1, n // SLICES)
    wall = dict.fromkeys(order, 0.0)
    cpu = dict.fromkeys(order, 0.0)
    for _ in range(SLICES):
        for name in order:
            rate, cpu_us = contenders[name](each)
            wall[name] += each / rate
            cpu[name] += cpu_us * each / 1e6
    return {name: _measured(each * SLICES, wall[name], cpu[name]) for name in order}


# (row name, ours, baseline, target): each gives a rate row and the CPU row of the same pair.
PAIRS = [
    ("ours probe vs floor", "ours-probe", "floor-probe", 0.9),
    ("ours run('echo') vs floor", "ours-run", "floor-run", 0.9),
    ("ours probe vs floor + call_later", "ours-probe", "floor-timer", None),
    ("ours probe vs streams + asyncio.timeout", "ours-probe", "streams", None),
    ("ours probe vs blocking sockets", "ours-probe", "blocking-probe", None),
    ("ours run('echo') vs blocking sockets", "ours-run", "blocking-run", None),
    ("floor vs blocking (context)", "floor-probe", "blocking-probe", None),
]


def run(
    quick: bool = False,
    rounds: int | None = None,
    transport: str = "unix",
    exchanges: int | None = None,
) -> Table:
    n = exchanges or (50 if quick else 2000)
    rounds = rounds or (2 if quick else 21)
    kind = "Unix-socket" if transport == "unix" else "AF_VSOCK"
    table = Table(
        f"1. exchange rate, one {kind} connection ({rounds} rounds of {n} exchanges each)"
    )
    uvloop = installed_uvloop()
    with contextlib.ExitStack() as stack, fresh_dir() as d:
        default_loop = asyncio.new_event_loop()
        stack.callback(default_loop.close)
        loops = [("asyncio", default_loop)]
        if uvloop is not None:
            uv_loop = uvloop.new_event_loop()
            stack.callback(uv_loop.close)
            loops.append(("uvloop", uv_loop))
        contenders: dict[str, Callable[[int], Measure]] = {}
        for tag, loop in loops:
            eps = [endpoint(transport, d, f"{role}-{tag}") for role in ("ours", "floor", "streams")]
            contenders.update(_LoopSide(loop, stack, eps).contenders(tag))
        blocking = stack.enter_context(_plain_connection(endpoint(transport, d, "blocking")))
        contenders["blocking-probe"] = lambda k: blocking_rounds(blocking, FRAME, k)
        contenders["blocking-run"] = lambda k: blocking_rounds(blocking, ECHO_FRAME, k)

        order = list(contenders)
        for name in order:  # warm up every path once
            contenders[name](max(10, n // 10))
        measures: dict[str, list[Measure]] = {name: [] for name in order}
        for r in range(rounds):
            k = r % len(order)
            for name, measure in _interleaved(contenders, order[k:] + order[:k], n).items():
                measures[name].append(measure)

    for tag, _ in loops:
        for label, ours, base, target in PAIRS:
            ours_key = f"{ours}-{tag}"
            base_key = base if base.startswith("blocking") else f"{base}-{tag}"
            rate = table.row(f"{tag}: {label}", "exch/s", baseline_name=base_key, target=target)
            cpu = table.row(
                f"{tag}: {label}", "CPU us/exch", baseline_name=base_key, higher_is_better=False
            )
            for o, b in zip(measures[ours_key], measures[base_key], strict=True):
                rate.add(o[0], b[0])
                cpu.add(o[1], b[1])
    table.notes.append(uvloop_vsock_note())
    table.notes.append(
        "floor = BufferedProtocol into one reused buffer, one future per exchange, no"
        f" deadline; ours, floor + call_later and streams each carry a {DEADLINE:g} s deadline"
    )
    table.notes.append(
        "CPU = process_time of the host process per exchange (user+system); CPU ratios are"
        " baseline/ours, above 1 means we spend less; they move far less with the machine's"
        " load than the rates"
    )
    return table

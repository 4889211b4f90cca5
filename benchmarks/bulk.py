"""Benchmark 2: one large stdout (256 MiB by default) through one exchange.

Over a Unix socket; with ``--transport vsock``, over AF_VSOCK inside the VM tier's guest.

Each receiver runs in its own process so its memory and CPU can be measured on their own:
before every exchange it resets its peak RSS (``/proc/self/clear_refs`` ``5``) and reports
``VmHWM`` minus the RSS it had just before, and the ``process_time`` the exchange took.
Ours is ``GuestChannel.run()`` on a channel from ``listen()``/``accept()``. Baselines, none of
which zero-fills anything inside the timed region:

- ``lazy-mmap``: ``recv_into`` a fresh ``MAP_PRIVATE`` anonymous ``mmap`` of the frame's size,
  whose pages the kernel provides as the bytes land: what any receiver that hands out a
  fresh result pays at least;
- ``makefile-read``: ``sock.makefile("rb").read(n)`` per field, as a blocking user writes it;
- ``raw-preallocated``: ``recv_into`` one buffer allocated and touched once at start-up: no
  page faults at all, which no fresh result can match (context).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import mmap
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO

import vsock_async

from ._harness import (
    REPO,
    Endpoint,
    Table,
    endpoint,
    fresh_dir,
    guest_process,
    read_status_kib,
    reset_peak_rss,
)

NAME = "bulk"
MiB = 1024 * 1024
COMMAND_FRAME = b"\0\0\0\x04bulk"
MODES = ("ours", "lazy-mmap", "makefile-read", "raw-preallocated")


# -- receivers (each in its own process) ----------------------------------------------------


def _measure(exchange: Callable[[], int]) -> dict[str, float]:
    gc.collect()
    idle = read_status_kib("VmRSS")
    reset_peak_rss()
    start, cpu = time.perf_counter(), time.process_time()
    size = exchange()
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    peak = read_status_kib("VmHWM")
    return {"seconds": seconds, "cpu_s": cpu_s, "idle_kib": idle, "peak_kib": peak, "size": size}


def _serve_commands(out: IO[str], exchange: Callable[[], int]) -> None:
    for line in sys.stdin:
        if line.strip() != "go":
            break
        out.write(json.dumps(_measure(exchange)) + "\n")
        out.flush()


def receive_ours(address: str, size: int, use_uvloop: bool) -> None:
    # uvloop by name: it is optional, and type checking then needs no stubs for it
    loop: asyncio.AbstractEventLoop = (
        importlib.import_module("uvloop").new_event_loop()
        if use_uvloop
        else asyncio.new_event_loop()
    )
    limits = vsock_async.Limits(max_stdout=size)
    server = loop.run_until_complete(vsock_async.listen(address, limits=limits))
    print("ready", flush=True)
    channel = loop.run_until_complete(server.accept(timeout=60))

    def exchange() -> int:
        result = loop.run_until_complete(channel.run(b"bulk", timeout=600))
        assert result.exit_code == 0 and type(result.stdout) is bytes
        return len(result.stdout)

    _serve_commands(sys.stdout, exchange)
    loop.run_until_complete(server.aclose())
    loop.close()


def _recv_exactly_into(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if not n:
            raise ConnectionError("guest closed")
        got += n


def receive_raw(ep: Endpoint, size: int, mode: str) -> None:
    total = size + 9
    keep = bytearray(total)  # bytearray(n) zero-fills: every page touched, once, untimed
    with ep.raw_listener() as lsock:
        print("ready", flush=True)
        conn, _ = lsock.accept()
    reader = conn.makefile("rb")

    def preallocated() -> int:
        conn.sendall(COMMAND_FRAME)
        with memoryview(keep) as view:
            _recv_exactly_into(conn, view)
        return int.from_bytes(keep[:4], "big")

    def lazy_mmap() -> int:
        conn.sendall(COMMAND_FRAME)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        with mmap.mmap(-1, total, flags=flags) as buf:
            with memoryview(buf) as view:
                _recv_exactly_into(conn, view)
            return int.from_bytes(buf[:4], "big")

    def makefile_read() -> int:
        conn.sendall(COMMAND_FRAME)
        stdout = reader.read(int.from_bytes(reader.read(4), "big"))
        reader.read(int.from_bytes(reader.read(4), "big"))  # stderr
        if len(reader.read(1)) != 1:
            raise ConnectionError("guest closed")
        return len(stdout)

    exchanges = {
        "raw-preallocated": preallocated,
        "lazy-mmap": lazy_mmap,
        "makefile-read": makefile_read,
    }
    with conn, reader:
        _serve_commands(sys.stdout, exchanges[mode])


# -- the parent: alternate rounds over long-lived receivers -----------------------------------


class _Receiver:
    def __init__(self, proc: subprocess.Popen[str]):
        self.proc = proc

    def go(self) -> dict[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("a bulk receiver died; see its stderr above")
        return json.loads(line)  # type: ignore[no-any-return]


@contextlib.contextmanager
def _receiver(mode: str, ep: Endpoint, size: int, use_uvloop: bool) -> Iterator[_Receiver]:
    args = [sys.executable, "-m", "benchmarks.bulk", "--receiver", mode, "--address", ep.address]
    args += ["--transport", ep.transport, "--guest", ep.guest]
    args += ["--size", str(size)] + (["--uvloop"] if use_uvloop else [])
    proc = subprocess.Popen(
        args, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"bulk receiver {mode} did not start")
        with guest_process(["--connect", ep.guest, "--bulk-bytes", str(size)]):
            yield _Receiver(proc)
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(
    quick: bool = False,
    rounds: int | None = None,
    bulk_mib: int | None = None,
    use_uvloop: bool = False,
    transport: str = "unix",
) -> Table:
    size = (bulk_mib or (1 if quick else 256)) * MiB
    rounds = rounds or (2 if quick else 7)
    loop_name = "uvloop" if use_uvloop else "default loop"
    kind = "Unix socket" if transport == "unix" else "AF_VSOCK"
    table = Table(f"2. bulk: one {size // MiB} MiB stdout, {kind}, {loop_name}")
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with contextlib.ExitStack() as stack, fresh_dir() as d:
        receivers = {
            m: stack.enter_context(_receiver(m, endpoint(transport, d, m), size, use_uvloop))
            for m in MODES
        }
        for m in MODES:  # warm-up exchange, not counted
            receivers[m].go()
        for r in range(rounds):
            k = r % len(MODES)
            for m in MODES[k:] + MODES[:k]:
                results[m].append(receivers[m].go())

    def mib_s(m: str) -> list[float]:
        return [x["size"] / MiB / x["seconds"] for x in results[m]]

    def cpu_ms(m: str) -> list[float]:
        return [x["cpu_s"] * 1000 for x in results[m]]

    for base, target in (("lazy-mmap", 0.95), ("makefile-read", 0.95), ("raw-preallocated", None)):
        rate = table.row(f"ours vs {base}", "MiB/s", baseline_name=base, target=target)
        for o, b in zip(mib_s("ours"), mib_s(base), strict=True):
            rate.add(o, b)
        cpu = table.row(
            f"ours vs {base}", "receiver CPU ms", baseline_name=base, higher_is_better=False
        )
        for o, b in zip(cpu_ms("ours"), cpu_ms(base), strict=True):
            cpu.add(o, b)
    limit = (size + 32 * MiB) / MiB
    for m in MODES:
        peaks = [(x["peak_kib"] - x["idle_kib"]) / 1024 for x in results[m]]
        table.single(
            f"{m}: peak RSS above idle", "MiB", peaks, limit=limit if m == "ours" else None
        )
    table.notes.append(
        "lazy-mmap and makefile-read get fresh memory per exchange, faulted in as bytes land,"
        " as ours must (its result is a new bytes object); raw-preallocated reuses one buffer"
        " touched at start-up and pays no page faults (context)"
    )
    table.notes.append("receiver CPU = process_time of the receiving process for the exchange")
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--receiver", choices=MODES, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--transport", required=True)
    parser.add_argument("--guest", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.receiver == "ours":
        receive_ours(args.address, args.size, args.uvloop)
    else:
        bind: str | tuple[int, int] = args.address.removeprefix("unix:")
        if args.transport == "vsock":
            bind = (socket.VMADDR_CID_ANY, int(args.address.rsplit(":", 1)[1]))
        ep = Endpoint(args.transport, args.address, args.guest, bind)
        receive_raw(ep, args.size, args.receiver)


if __name__ == "__main__":
    main()

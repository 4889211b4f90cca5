"""Benchmark 3: 1,000 guests connected to one server at once, probed, then 20 exchanges each.

The server runs in its own process (so its memory is its own); the guests
are a few separate processes holding many connections each. Ours is a
``CommandServer`` whose channels are accepted, probed and then all run their
exchanges concurrently (one coroutine per guest). The baseline is a
thread-per-guest server with blocking sockets doing the same. Reported: time
from the first connection until every guest has answered its probe,
aggregate exchanges per second, and server RSS per connected idle guest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time

import vsock_async

from ._harness import REPO, Table, fresh_dir, guest_process, raise_nofile_limit, read_status_kib
from .exchange_rate import FRAME as PROBE_FRAME
from .exchange_rate import recv_result

NAME = "many"
MODES = ("ours", "threads", "ours-uvloop")
COMMAND = b"echo"
COMMAND_FRAME = len(COMMAND).to_bytes(4, "big") + COMMAND


def _report(
    t_probed: float, rss_idle: int, rss_connected: int, rate: float, n: int, cpu_us: float
) -> None:
    print(
        json.dumps(
            {
                "probe_all_s": t_probed,
                "kib_per_guest": (rss_connected - rss_idle) / n,
                "rate": rate,
                "cpu_us": cpu_us,
            }
        ),
        flush=True,
    )


async def serve_ours(path: str, guests: int, exchanges: int) -> None:
    server = vsock_async.CommandServer()
    await server.add_listener(f"unix:{path}", backlog=guests)
    gc.collect()
    rss_idle = read_status_kib("VmRSS")
    print("ready", flush=True)
    first = await server.accept(timeout=60)
    started = time.perf_counter()

    async def probed(channel: vsock_async.GuestChannel | None) -> vsock_async.GuestChannel:
        if channel is None:
            channel = await server.accept(timeout=60)
        await channel.probe(timeout=60)
        return channel

    channels = await asyncio.gather(probed(first), *(probed(None) for _ in range(guests - 1)))
    t_probed = time.perf_counter() - started
    gc.collect()
    rss_connected = read_status_kib("VmRSS")

    async def work(channel: vsock_async.GuestChannel) -> None:
        for _ in range(exchanges):
            result = await channel.run(COMMAND, timeout=60)
            assert result.exit_code == 0

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(work(c) for c in channels))
    rate = guests * exchanges / (time.perf_counter() - started)
    cpu_us = (time.process_time() - cpu) / (guests * exchanges) * 1e6
    _report(t_probed, rss_idle, rss_connected, rate, guests, cpu_us)
    await server.aclose()


def serve_threads(path: str, guests: int, exchanges: int) -> None:
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(guests)
    lock = threading.Lock()
    all_probed = threading.Event()
    go = threading.Event()
    probed = 0

    def handle(conn: socket.socket) -> None:
        nonlocal probed
        with conn:
            conn.sendall(PROBE_FRAME)
            assert recv_result(conn) == (b"", b"", 0)
            with lock:
                probed += 1
                if probed == guests:
                    all_probed.set()
            go.wait()
            for _ in range(exchanges):
                conn.sendall(COMMAND_FRAME)
                assert recv_result(conn)[2] == 0

    gc.collect()
    rss_idle = read_status_kib("VmRSS")
    print("ready", flush=True)
    threads = []
    started = 0.0
    for i in range(guests):
        conn, _ = lsock.accept()
        if i == 0:
            started = time.perf_counter()
        thread = threading.Thread(target=handle, args=(conn,))
        thread.start()
        threads.append(thread)
    all_probed.wait()
    t_probed = time.perf_counter() - started
    gc.collect()
    rss_connected = read_status_kib("VmRSS")
    started, cpu = time.perf_counter(), time.process_time()
    go.set()
    for thread in threads:
        thread.join()
    rate = guests * exchanges / (time.perf_counter() - started)
    cpu_us = (time.process_time() - cpu) / (guests * exchanges) * 1e6
    _report(t_probed, rss_idle, rss_connected, rate, guests, cpu_us)
    lsock.close()


def _one_round(mode: str, d: str, guests: int, exchanges: int, processes: int) -> dict[str, float]:
    path = os.path.join(d, f"{mode}.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    args = [sys.executable, "-m", "benchmarks.many_guests", "--server", mode, "--path", path]
    args += ["--guests", str(guests), "--exchanges", str(exchanges)]
    server = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{mode} server did not start")
        share = [guests // processes + (i < guests % processes) for i in range(processes)]
        with contextlib.ExitStack() as stack:
            for n in share:
                if n:
                    stack.enter_context(guest_process(["--connect", path, "--connections", str(n)]))
            line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"{mode} server died; see its stderr above")
        return json.loads(line)  # type: ignore[no-any-return]
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def run(
    quick: bool = False,
    rounds: int | None = None,
    guests: int | None = None,
) -> Table:
    raise_nofile_limit()
    guests = guests or (20 if quick else 1000)
    exchanges = 3 if quick else 20
    rounds = rounds or (1 if quick else 5)
    processes = min(4, guests)
    table = Table(
        f"3. many guests: {guests} connected at once ({processes} guest processes),"
        f" probe each, then {exchanges} exchanges each, all concurrently"
    )
    modes = MODES if importlib.util.find_spec("uvloop") else MODES[:2]
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    with fresh_dir() as d:
        for r in range(rounds):
            k = r % len(modes)
            for mode in modes[k:] + modes[:k]:
                results[mode].append(_one_round(mode, d, guests, exchanges, processes))
    ours, threads = results["ours"], results["threads"]
    rate = table.row(
        "aggregate rate: ours vs thread-per-guest", "exch/s", baseline_name="threads", target=1.5
    )
    probe = table.row(
        "accept+probe all: ours vs thread-per-guest",
        "s",
        baseline_name="threads",
        higher_is_better=False,
    )
    cpu = table.row(
        "server CPU per exchange: ours vs thread-per-guest",
        "CPU us/exch",
        baseline_name="threads",
        higher_is_better=False,
    )
    for o, t in zip(ours, threads, strict=True):
        rate.add(o["rate"], t["rate"])
        probe.add(o["probe_all_s"], t["probe_all_s"])
        cpu.add(o["cpu_us"], t["cpu_us"])
    if "ours-uvloop" in results:
        uv_rate = table.row(
            "uvloop: aggregate rate, ours vs thread-per-guest", "exch/s", baseline_name="threads"
        )
        for o, t in zip(results["ours-uvloop"], threads, strict=True):
            uv_rate.add(o["rate"], t["rate"])
    table.single(
        "ours: server RSS per connected guest", "KiB", [o["kib_per_guest"] for o in ours], limit=32
    )
    table.single(
        "threads: server RSS per connected guest", "KiB", [t["kib_per_guest"] for t in threads]
    )
    table.notes.append("time ratios are baseline/ours: above 1 means we are faster")
    table.notes.append(
        "server CPU = process_time of the server process over the exchange phase (all its"
        " threads) per exchange; less sensitive to the machine's load than the rates"
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", choices=MODES, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--guests", type=int, required=True)
    parser.add_argument("--exchanges", type=int, required=True)
    args = parser.parse_args()
    raise_nofile_limit()
    if args.server == "ours":
        asyncio.run(serve_ours(args.path, args.guests, args.exchanges))
    elif args.server == "ours-uvloop":
        # Imported by name: uvloop is optional, and mypy --strict must pass without it.
        importlib.import_module("uvloop").run(serve_ours(args.path, args.guests, args.exchanges))
    else:
        serve_threads(args.path, args.guests, args.exchanges)


if __name__ == "__main__":
    main()

"""Instructions per exchange under callgrind: benchmark 1's contenders, counted, not timed.

``python -m benchmarks.instructions [--exchanges 2000] [--only NAME] [--loop uvloop]``

Each contender's exchange loop runs in a fresh Python process under ``valgrind
--tool=callgrind`` twice, after the same warm-up: once with no measured exchanges and once
with ``--exchanges`` of them. The difference of the two "Collected" totals, divided by the
exchanges, is the user-space instructions one exchange costs in this process (the instant
guest, a process of its own, is not counted; neither is the kernel). ``PYTHONHASHSEED=0``
makes both runs hash alike, so a count repeats to the instruction: the machine's load does
not move it, which is why docs/performance.md quotes these beside the timed rates. Needs
``valgrind`` on the PATH; one contender takes about half a minute.

``--run NAME N`` runs one loop in this process, without valgrind (what each valgrind run
does; tests/test_benchmarks.py checks every contender so).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable

import vsock_async
from vsock_async.host.transport import GuestConnection

from . import exchange_rate as ex
from ._guest import PROBE_ANSWER
from ._harness import REPO, endpoint, fresh_dir, guest_process

WARM_UP = 200  # exchanges before the count starts, in both runs
Loop = Callable[[int], Awaitable[object]]

CONTENDERS = {
    "floor": "the floor: BufferedProtocol, one future per exchange, no deadline",
    "floor-timer": "the floor + one call_later per exchange",
    "floor-armed": "the floor with one far timer armed (what any pending deadline costs the loop)",
    "exchange": "GuestConnection.exchange() awaited directly (asyncio layer + core)",
    "probe": "GuestChannel.probe(timeout=10)",
    "probe-no-deadline": "GuestChannel.probe(timeout=None)",
    "run": "GuestChannel.run(b'echo', timeout=10) (answer: 'ok\\n')",
    "run-no-deadline": "GuestChannel.run(b'echo', timeout=None)",
}


async def _floor_loop(name: str, stack: contextlib.AsyncExitStack, directory: str) -> Loop:
    loop = asyncio.get_running_loop()
    sock = stack.enter_context(ex._plain_connection(endpoint("unix", directory, "floor")))
    sock.setblocking(False)
    _, proto = await loop.connect_accepted_socket(ex.FloorProtocol, sock)
    if name == "floor-timer":
        return lambda n: ex.floor_timer_rounds(proto, ex.FRAME, len(PROBE_ANSWER), n)
    if name == "floor-armed":
        far = loop.call_later(1e6, print)
        stack.callback(far.cancel)
    return lambda n: ex.floor_rounds(proto, ex.FRAME, len(PROBE_ANSWER), n)


async def _our_loop(name: str, stack: contextlib.AsyncExitStack, directory: str) -> Loop:
    ep = endpoint("unix", directory, "ours")
    server = await vsock_async.listen(ep.address, protocol="v1")
    stack.push_async_callback(server.aclose)
    stack.enter_context(guest_process(["--connect", ep.guest]))
    channel = await server.accept(timeout=60)
    timeout = None if name.endswith("-no-deadline") else ex.DEADLINE

    async def exchanges(n: int) -> None:
        conn = channel.connection
        assert isinstance(conn, GuestConnection)
        for _ in range(n):
            await conn.exchange(ex.FRAME[4:], True)

    async def probes(n: int) -> None:
        for _ in range(n):
            await channel.probe(timeout=timeout)

    async def runs(n: int) -> None:
        for _ in range(n):
            await channel.run(ex.ECHO, timeout=timeout)

    return {"exchange": exchanges, "probe": probes, "run": runs}[name.split("-")[0]]


async def _run(name: str, n: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        directory = stack.enter_context(fresh_dir())
        make = _floor_loop if name.startswith("floor") else _our_loop
        loop = await make(name, stack, directory)
        await loop(WARM_UP)
        if n:
            await loop(n)


def run_one(name: str, n: int, loop_name: str) -> None:
    """``n`` exchanges of contender ``name`` after the warm-up, on ``loop_name``'s loop."""
    if loop_name == "uvloop":
        uvloop = ex.installed_uvloop()
        if uvloop is None:
            raise SystemExit("uvloop is not installed (pip install 'vsock_async[uvloop]')")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_run(name, n))
    finally:
        loop.close()


def collected(name: str, n: int, loop_name: str) -> int:
    """The instructions callgrind counts for one process running ``n`` exchanges."""
    env = dict(os.environ, PYTHONHASHSEED="0", VSOCK_ASYNC_FORBID_VSOCK_CONNECT="1")
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable]
    command += ["-m", "benchmarks.instructions", "--run", name, str(n), "--loop", loop_name]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    match = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or match is None:
        raise SystemExit(f"valgrind run of {name} failed:\n{proc.stderr[-2000:]}")
    return int(match[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    parser.add_argument("--exchanges", type=int, default=2000, help="exchanges counted")
    parser.add_argument("--only", action="append", choices=sorted(CONTENDERS), help="repeatable")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--run", nargs=2, metavar=("NAME", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        name, n = args.run
        if name not in CONTENDERS:
            parser.error(f"unknown contender {name!r}")
        run_one(name, int(n), args.loop)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: it counts the instructions")
    print(f"# instructions per exchange, {args.loop} loop, {args.exchanges} exchanges minus none")
    for name in args.only or list(CONTENDERS):
        count = collected(name, args.exchanges, args.loop) - collected(name, 0, args.loop)
        print(f"{count / args.exchanges:>10,.0f}  {name}: {CONTENDERS[name]}", flush=True)


if __name__ == "__main__":
    main()

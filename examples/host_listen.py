"""Guest-initiated: the host listens, guest agents dial in; run a command in each as it arrives.

    python examples/host_listen.py hvsock:/run/fc/v.sock:1024     # Firecracker / Cloud Hypervisor
    python examples/host_listen.py vsock://any:1024               # QEMU vhost-vsock
    python examples/host_listen.py unix:/tmp/demo.sock            # no VM: then, in another shell,
    python -m vsock_async agent --connect unix:/tmp/demo.sock

For hvsock:UDS:PORT the agent in the guest dials vsock://host:PORT and the VMM forwards it to
the Unix socket UDS_PORT. Stop with Ctrl-C or SIGTERM (socket files are removed). Exits 2 for
a bad address, 1 when it cannot listen there.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import vsock_async


async def greet(event: vsock_async.GuestEvent, command: str) -> None:
    """Probe each new connection and run ``command`` on it; report connections that go."""
    channel = event.channel
    if event.kind == "disconnected":
        print(f"guest {event.guest.key!r}: connection {channel.id} gone ({event.error})")
        return
    source = f" from {channel.peer!r}" if channel.peer else ""  # a Unix socket peer is ''
    print(f"guest {event.guest.key!r}: connection {channel.id}{source}")
    try:
        await channel.probe(timeout=5)
        result = await channel.run(command, timeout=30)
    except vsock_async.VsockAsyncError as exc:
        print(f"guest {event.guest.key!r}: {type(exc).__name__}: {exc}")
        return
    print(f"guest {event.guest.key!r}: {command!r} exited {result.exit_code}")
    print(result.stdout.decode(errors="replace"), end="")


async def serve(addresses: list[str], command: str) -> None:
    """Listen on every address until SIGINT or SIGTERM, greeting each guest that arrives."""
    first, *more = addresses
    async with vsock_async.listen(first) as server:
        for address in more:
            await server.add_listener(address)
        server.subscribe(lambda event: greet(event, command))
        print("listening on", ", ".join(str(a) for a in server.addresses))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    print("closed; socket files removed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="+", help="addresses to listen on (several allowed)")
    parser.add_argument("--command", default="uname -a", help="what to run in each guest")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.address, args.command))
    except vsock_async.UsageError as exc:  # an address that does not parse
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except vsock_async.VsockAsyncError as exc:  # cannot listen there: in use, no directory...
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Guest-initiated: the host listens, guest agents dial in; run a command in each as it arrives.

    python examples/host_listen.py hvsock:/run/fc/v.sock:1024     # Firecracker / Cloud Hypervisor
    python examples/host_listen.py vsock://any:1024               # QEMU vhost-vsock
    python examples/host_listen.py unix:/tmp/demo.sock            # no VM: then, in another shell,
    python -m vsock_async agent --connect unix:/tmp/demo.sock

For hvsock:UDS:PORT the agent in the guest dials vsock://host:PORT and the VMM forwards it to
the Unix socket UDS_PORT. Stop with Ctrl-C or SIGTERM (socket files are removed).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import vsock_async


async def greet(event: vsock_async.GuestEvent, command: str) -> None:
    """Probe each new connection and run ``command`` on it; report connections that go."""
    channel = event.channel
    if event.kind == "disconnected":
        print(f"guest {event.guest.key!r}: connection {channel.id} gone ({event.error})")
        return
    print(f"guest {event.guest.key!r}: connection {channel.id} from {channel.peer!r}")
    try:
        await channel.probe(timeout=5)
        result = await channel.run(command, timeout=30)
    except vsock_async.VsockAsyncError as exc:
        print(f"guest {event.guest.key!r}: {type(exc).__name__}: {exc}")
        return
    print(f"guest {event.guest.key!r}: {command!r} exited {result.exit_code}")
    print(result.stdout.decode(errors="replace"), end="")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="+", help="addresses to listen on (several allowed)")
    parser.add_argument("--command", default="uname -a", help="what to run in each guest")
    args = parser.parse_args()
    first, *more = args.address
    async with vsock_async.listen(first) as server:
        for address in more:
            await server.add_listener(address)
        server.subscribe(lambda event: greet(event, args.command))
        print("listening on", ", ".join(str(a) for a in server.addresses))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    print("closed; socket files removed")


if __name__ == "__main__":
    asyncio.run(main())

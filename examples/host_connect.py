"""Host-initiated: dial a guest agent that listens, probe it, run a command.

    python examples/host_connect.py hvsock:/run/fc/v.sock:52 -- uname -a    # Firecracker / CH
    python examples/host_connect.py vsock://3:52 -- uname -a                # QEMU vhost-vsock
    python -m vsock_async agent --listen unix:/tmp/agent.sock &             # no VM
    python examples/host_connect.py unix:/tmp/agent.sock -- uname -a

With hvsock:UDS:PORT the host dials the VMM's socket UDS and asks for guest port PORT, where
the agent runs with --listen vsock://any:PORT; while the guest is still booting, the connect
is retried until --timeout. Exits with the command's exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import vsock_async


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="where the agent listens")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it")
    parser.add_argument("command", nargs="+", help="the command and its arguments")
    args = parser.parse_args()
    try:
        async with vsock_async.connect(args.address, timeout=args.timeout) as guest:
            await guest.probe(timeout=5)
            result = await guest.run(args.command, timeout=None)
    except vsock_async.VsockAsyncError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 255
    sys.stdout.buffer.write(result.stdout)
    sys.stderr.buffer.write(result.stderr)
    return result.exit_code if result.exit_code is not None else 255


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

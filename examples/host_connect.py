"""Host-initiated: dial a guest agent that listens, probe it, run a command.

    python examples/host_connect.py hvsock:/run/fc/v.sock:52 -- uname -a    # Firecracker / CH
    python examples/host_connect.py vsock://3:52 -- uname -a                # QEMU vhost-vsock
    python -m vsock_async agent --listen unix:/tmp/agent.sock &             # no VM
    python examples/host_connect.py unix:/tmp/agent.sock -- uname -a

With hvsock:UDS:PORT the host dials the VMM's socket UDS and asks for guest port PORT, where
the agent runs with --listen vsock://any:PORT. While nothing listens yet (a guest still
booting, an agent still starting), the connect is retried until --timeout. Exits with the
command's exit code, 2 for a bad address, 255 when the guest cannot be reached or fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import vsock_async


async def dial(address: str, timeout: float) -> vsock_async.GuestChannel:
    """Connect to ``address``, retrying a refused connect until ``timeout`` seconds passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await vsock_async.connect(address, timeout=max(0.0, deadline - loop.time()))
        except vsock_async.ConnectTimeout:
            raise
        except vsock_async.ConnectFailed:  # nothing listens there yet
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(0.1)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="where the agent listens")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for it")
    parser.add_argument("command", nargs="+", help="the command and its arguments")
    args = parser.parse_args()
    try:
        async with await dial(args.address, args.timeout) as guest:
            await guest.probe(timeout=5)
            result = await guest.run(args.command, timeout=None)
    except vsock_async.UsageError as exc:  # an address that does not parse
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except vsock_async.VsockAsyncError as exc:
        print(f"{parser.prog}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 255
    sys.stdout.buffer.write(result.stdout)
    sys.stderr.buffer.write(result.stderr)
    return result.exit_code if result.exit_code is not None else 255


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

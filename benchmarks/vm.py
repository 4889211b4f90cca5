"""Benchmarks 1 and 2 over real AF_VSOCK and over Unix sockets, inside the VM tier.

``python -m benchmarks.vm [--rounds N] [--bulk-mib 64] [--memory-mib 2048]`` boots the VM
tier's QEMU guest (``tests/vm``; no network, no vsock device, so ``vsock_loopback`` carries
every AF_VSOCK connection and none leaves the guest), runs ``python -m benchmarks --only
exchange --only bulk`` there once with ``--transport unix`` and once with ``--transport vsock``,
and prints both sets of tables. Run on request only: it is not part of the test suite or CI.
"""

from __future__ import annotations

import argparse
import sys

from . import run as run_module
from ._harness import in_vm

# Under TCG emulation an exchange takes about 15 ms and 64 MiB about 3 s: 11 rounds of
# 100 probes and of 64 MiB keep the whole run near 7 minutes.
DEFAULT_ROUNDS = 11
DEFAULT_EXCHANGES = 100
DEFAULT_BULK_MIB = 64
DEFAULT_MEMORY_MIB = 2048


def guest_main(rounds: int, exchanges: int, bulk_mib: int) -> None:
    """Inside the guest: the exchange and bulk benchmarks on each transport in turn."""
    for transport in ("unix", "vsock"):
        print(f"\n### transport: {transport}", flush=True)
        argv = ["--only", "exchange", "--only", "bulk", "--transport", transport]
        argv += ["--rounds", str(rounds), "--exchanges", str(exchanges)]
        run_module.main([*argv, "--bulk-mib", str(bulk_mib)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vm", description=__doc__)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--exchanges", type=int, default=DEFAULT_EXCHANGES)
    parser.add_argument("--bulk-mib", type=int, default=DEFAULT_BULK_MIB)
    parser.add_argument("--memory-mib", type=int, default=DEFAULT_MEMORY_MIB)
    parser.add_argument("--timeout", type=float, default=1200.0, help="for the whole VM run (s)")
    parser.add_argument("--keep", action="store_true", help="keep the VM work dir")
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_guest:
        if not in_vm():
            parser.error("--in-guest runs only inside the VM tier's guest")
        guest_main(args.rounds, args.exchanges, args.bulk_mib)
        return 0

    from tests.vm import command, image

    payload = ["-m", "benchmarks.vm", "--in-guest", "--rounds", str(args.rounds)]
    payload += ["--exchanges", str(args.exchanges), "--bulk-mib", str(args.bulk_mib)]
    try:
        result = command.run_python(
            payload,
            extra_dirs=("benchmarks",),
            memory_mib=args.memory_mib,
            timeout=args.timeout,
            keep=args.keep,
        )
    except image.VmUnavailable as exc:
        print(f"benchmarks.vm: the QEMU guest is unavailable here: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(result.stdout)
    print(
        f"\n# VM: {result.accel}, {args.memory_mib} MiB, 2 vCPUs, boot to power-off"
        f" {result.seconds:.0f} s" + (f"; work dir {result.workdir}" if result.workdir else "")
    )
    if result.failure is not None or result.exit_status != 0:
        print(
            f"benchmarks.vm: {result.failure or f'exit status {result.exit_status}'}\n"
            f"--- guest console, last lines ---\n{result.console_tail}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

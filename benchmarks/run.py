"""Run the benchmarks and print one table each: ``python -m benchmarks [--quick] [--only NAME]``."""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time

from ._harness import TRANSPORTS, Table

MODULES = {
    "exchange": "benchmarks.exchange_rate",
    "bulk": "benchmarks.bulk",
    "many": "benchmarks.many_guests",
    "agent": "benchmarks.agent_overhead",
    "agent-memory": "benchmarks.agent_memory",
    "v2": "benchmarks.v2_streams",
    "files": "benchmarks.files",
}


def machine() -> str:
    """nproc, CPU model, Python version and the date, for the results table."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs, {cpu}, Python {platform.python_version()},"
        f" {platform.system()} {platform.release()},"
        f" {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks they run")
    parser.add_argument(
        "--only", action="append", choices=sorted(MODULES), help="run only these (repeatable)"
    )
    parser.add_argument("--rounds", type=int, help="alternating rounds per benchmark")
    parser.add_argument("--bulk-mib", type=int, help="payload of the bulk benchmark (MiB)")
    parser.add_argument("--guests", type=int, help="many: only this many guests at once")
    parser.add_argument(
        "--max-guests",
        type=int,
        help="many: every N of 1, 10, 100, 1000, 10000 up to this (default 1000)",
    )
    parser.add_argument("--exchanges", type=int, help="probes per round (exchange)")
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="unix",
        help="exchange and bulk: unix, or vsock (only inside the VM tier's guest:"
        " python -m benchmarks.vm)",
    )
    args = parser.parse_args(argv)
    print(f"# {machine()}", flush=True)
    for name in args.only or list(MODULES):
        module = importlib.import_module(MODULES[name])
        options: dict[str, object] = {}
        if name in ("exchange", "bulk"):
            options["transport"] = args.transport
        elif args.transport != "unix":
            parser.error(f"--transport {args.transport} applies to exchange and bulk only")
        if name == "exchange":
            options["exchanges"] = args.exchanges
        if name == "bulk":
            options["bulk_mib"] = args.bulk_mib
        if name == "many":
            options = {"guests": args.guests, "max_guests": args.max_guests}
        started = time.perf_counter()
        table: Table = module.run(quick=args.quick, rounds=args.rounds, **options)
        print(table.render())
        print(f"  ({time.perf_counter() - started:.1f} s)", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

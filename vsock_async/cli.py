"""``vsock-async`` / ``python -m vsock_async``: argparse wiring of the subcommands, nothing more.

Each subcommand has one function that adds its parser and one that runs it.
Only the standard library and the core modules are imported at the top:
``agent`` must run in a guest that has nothing else installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["main"]

Runner = Callable[[argparse.Namespace], int]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit code."""
    parser = argparse.ArgumentParser(
        prog="vsock-async",
        description="asyncio vsock command server and guest agent (wire protocol v1)",
    )
    subparsers = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    _add_agent_parser(subparsers)
    args = parser.parse_args(argv)
    runner: Runner = args.run
    try:
        return runner(args)
    except KeyboardInterrupt:
        return 130


# -- agent -------------------------------------------------------------------------------


def _add_agent_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .agent import AGENT_DEFAULT_ADDRESS, DEFAULT_MAX_OUTPUT, DEFAULT_OUTPUT_GRACE
    from .protocol import Limits

    parser = subparsers.add_parser(
        "agent",
        help="the guest side: run the host's commands with /bin/sh -c and send back the results",
        description=(
            "Run in a guest: dial the host (or wait for it to dial in), run each command it"
            " sends as SHELL -c COMMAND, and answer with stdout, stderr and the exit code."
        ),
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--connect",
        metavar="ADDRESS",
        help=f"dial the host at ADDRESS, redial when it goes (default {AGENT_DEFAULT_ADDRESS})",
    )
    where.add_argument(
        "--listen", metavar="ADDRESS", help="wait for the host to dial the agent at ADDRESS"
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        metavar="N",
        help="connections kept open (or accepted at once with --listen): N commands at a time",
    )
    parser.add_argument("--shell", default="/bin/sh", help="shell that runs each command with -c")
    parser.add_argument(
        "--command-timeout",
        type=float,
        metavar="S",
        help="kill a command's process group after S seconds and answer exit code 124",
    )
    parser.add_argument(
        "--max-command",
        type=int,
        default=Limits().max_command,
        metavar="BYTES",
        help="longer commands are discarded and answered with exit code 126 (default %(default)s)",
    )
    parser.add_argument(
        "--max-output",
        type=int,
        default=DEFAULT_MAX_OUTPUT,
        metavar="BYTES",
        help="stdout and stderr are each cut to BYTES, note included (default %(default)s)",
    )
    parser.add_argument(
        "--output-grace",
        type=float,
        default=DEFAULT_OUTPUT_GRACE,
        metavar="S",
        help=(
            "after the shell exits, wait S seconds for processes it left behind to close"
            " stdout/stderr, then kill its process group (default %(default)s)"
        ),
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default %(default)s",
    )
    parser.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="default %(default)s"
    )
    parser.set_defaults(run=_run_agent)


def _run_agent(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from ._logging import configure_logging
    from .agent import GuestAgent
    from .errors import VsockAsyncError

    async def run(agent: GuestAgent) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, agent.stop)
        await agent.run()

    configure_logging(args.log_level, args.log_format)
    try:
        agent = GuestAgent(
            args.listen or args.connect or None,
            listen=args.listen is not None,
            connections=args.connections,
            shell=args.shell,
            command_timeout=args.command_timeout,
            max_command=args.max_command,
            max_output=args.max_output,
            output_grace=args.output_grace,
        )
        asyncio.run(run(agent))
    except VsockAsyncError as exc:
        print(f"vsock-async agent: {exc}", file=sys.stderr)
        return 2
    return 0

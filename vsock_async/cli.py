"""``vsock-async`` / ``python -m vsock_async``: argparse wiring of the subcommands, nothing more.

Each subcommand has one function that adds its parser and one that runs it.
Only the standard library and the core modules are imported at the top:
``agent`` must run in a guest that has nothing else installed. The exit
codes below are the only ones the tool uses (besides a guest's own exit
code, passed through by ``exec``); docs/serve.md lists them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, NoReturn

if TYPE_CHECKING:
    from .serve.config import ServeConfig

__all__ = [
    "EXIT_CANNOT_RUN",
    "EXIT_ERROR",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "build_parser",
    "main",
    "serve_config",
]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
"""``serve`` could not start; ``guests`` could not reach the daemon; ``cp`` failed."""
EXIT_USAGE: Final = 2
"""A bad option or argument (argparse's own status)."""
EXIT_TIMEOUT: Final = 124
"""``exec``: the command's deadline fired (as with timeout(1))."""
EXIT_FAILED: Final = 125
"""``exec``: the daemon, the guest or its connection failed; the reason is on stderr."""
EXIT_CANNOT_RUN: Final = 126
"""``exec``: the guest could not start the program (a bad cwd or user, no permission), as
a shell says."""
EXIT_NOT_FOUND: Final = 127
"""``exec``: the guest found no such program (or cwd), as a shell says."""
EXIT_INTERRUPTED: Final = 130
"""Interrupted by Ctrl-C (128 + SIGINT)."""

Runner = Callable[[argparse.Namespace], int]


def build_parser(subcommand: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``vsock-async`` and every subcommand, or of ``subcommand`` alone if it is one.

    :func:`main` builds only the subcommand it runs: the others' parsers take their defaults
    from the host side and the daemon, which the agent must not load (it starts on a
    guest's boot path). The deployment files' tests use it too.
    """
    parser = argparse.ArgumentParser(
        prog="vsock-async",
        description="asyncio vsock command server and guest agent (wire protocol v1)",
    )
    subparsers = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    adders: dict[str, Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], object]] = {
        "agent": _add_agent_parser,
        "serve": _add_serve_parser,
        "exec": _add_exec_parser,
        "guests": _add_guests_parser,
        "cp": _add_cp_parser,
        "demo": _add_demo_parser,
    }
    for add in [adders[subcommand]] if subcommand in adders else adders.values():
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit code."""
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv[0] if argv else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.subcommand == "exec":
        _exec_misparsed(args, unknown)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    runner: Runner = args.run
    try:
        return runner(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


# -- agent -------------------------------------------------------------------------------


def _add_agent_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``agent``; its parser is returned for the single-file agent to use on its own."""
    from .agent.agent import AGENT_DEFAULT_ADDRESS, DEFAULT_MAX_OUTPUT, DEFAULT_OUTPUT_GRACE
    from .protocol import Limits
    from .protocol.v2 import AgentLimits

    parser = subparsers.add_parser(
        "agent",
        help="the guest side: run the host's commands with /bin/sh -c and send back the results",
        description=(
            "Run in a guest: dial the host (or wait for it to dial in), run each command it"
            " sends as SHELL -c COMMAND, and answer with stdout, stderr and the exit code."
            " Sizes are bytes, or with a K, M or G suffix (1K = 1024); times are seconds, or"
            " 'none' for no limit."
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
        type=_timeout("--command-timeout"),
        metavar="S",
        help=(
            "kill a command's process group after S seconds and answer exit code 124;"
            " 'none' for no limit (the default); 0 is refused (it would kill every command)"
        ),
    )
    parser.add_argument(
        "--max-command",
        type=_size,
        default=Limits().max_command,
        metavar="BYTES",
        help="longer commands are discarded and answered with exit code 126 (default %(default)s)",
    )
    parser.add_argument(
        "--max-output",
        type=_size,
        default=DEFAULT_MAX_OUTPUT,
        metavar="BYTES",
        help="stdout and stderr are each cut to BYTES, note included (default %(default)s)",
    )
    parser.add_argument(
        "--output-grace",
        type=_timeout("--output-grace"),
        default=DEFAULT_OUTPUT_GRACE,
        metavar="S",
        help=(
            "after the shell exits, wait S seconds for processes it left behind to close"
            " stdout/stderr, then kill its process group; 0: kill at once, 'none': wait for"
            " them (default %(default)s)"
        ),
    )
    parser.add_argument(
        "--max-streams",
        type=int,
        default=AgentLimits().max_streams,
        metavar="N",
        help=(
            "protocol v2: processes one connection may run at once; more are refused"
            " (default %(default)s)"
        ),
    )
    parser.add_argument(
        "--files-root",
        default="/",
        metavar="DIR",
        help=(
            "protocol v2: file operations (put, get, listdir, remove...) may touch only DIR"
            " and what is under it, symbolic links resolved (default %(default)s)"
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
    return parser


def _run_agent(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from ._logging import configure_logging
    from .agent.agent import GuestAgent
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
            max_streams=args.max_streams,
            files_root=args.files_root,
        )
        asyncio.run(run(agent))
    except VsockAsyncError as exc:  # it could not start
        print(f"vsock-async agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ExceptionGroup as group:  # a worker kept failing; the log has the tracebacks
        last = group.exceptions[-1]
        print(
            f"vsock-async agent: {group.message}; the last failure:"
            f" {type(last).__name__}: {last} (tracebacks in the log above)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return EXIT_OK


# -- serve --------------------------------------------------------------------------------


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    number, unit = text, 1
    if text[-1:].lower() in units:
        number, unit = text[:-1], units[text[-1].lower()]
    if not (number.isascii() and number.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or with K/M/G)")
    return int(number) * unit


def _cid(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a CID (a number)")
    return int(text)


def _cap(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    if not (text.isascii() and text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1 (or 'none')")
    return int(text)


def _timeout(what: str) -> Callable[[str], float | None]:
    """An argparse type: seconds or ``none``, by the rule of :mod:`vsock_async.timeouts`."""
    from .errors import UsageError
    from .timeouts import parse_timeout

    def parse(text: str) -> float | None:
        try:
            return parse_timeout(text, what)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _add_serve_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .host.server import DEFAULT_MAX_CONNECTIONS_PER_GUEST
    from .serve.config import DEFAULT_GRACE, DEFAULT_PROBE_INTERVAL, DEFAULT_PROBE_TIMEOUT
    from .serve.defaults import default_control_address
    from .timeouts import DEFAULT_TIMEOUT

    p = subparsers.add_parser(
        "serve",
        help="the host daemon: accept guests, serve the HTTP control API",
        description=(
            "Accept guest agents' connections, probe them, and serve an HTTP+JSON control API"
            " (on a Unix socket, mode 0600, by default) to run commands in them."
            " Times are seconds, or 'none' for no limit."
        ),
    )
    p.add_argument(
        "--listen",
        action="append",
        metavar="[LABEL=]ADDRESS",
        help=(
            "where guests dial in; repeatable. vsock://CID:PORT, hvsock:UDS_PATH:PORT,"
            " unix:PATH or tcp://HOST:PORT; LABEL names the guest behind a non-vsock"
            " listener (default vsock://any:1024)"
        ),
    )
    p.add_argument(
        "--allowed-cid",
        action="append",
        type=_cid,
        metavar="CID",
        help="accept vsock:// connections only from this CID; repeatable (default any)",
    )
    p.add_argument(
        "--control",
        metavar="ADDRESS",
        help=f"where the control API listens: unix:PATH (default {default_control_address()})"
        " or tcp://127.0.0.1:PORT (needs --token-file)",
    )
    p.add_argument(
        "--metrics",
        metavar="ADDRESS",
        help="also serve GET /metrics and GET /v1/health, read-only and with no token, on"
        " tcp://HOST:PORT: for Prometheus and health probes (default: only on --control)",
    )
    p.add_argument(
        "--token-file",
        metavar="PATH",
        help="file holding the bearer token the control API requires (mandatory on TCP)",
    )
    p.add_argument(
        "--control-allow-remote",
        action="store_true",
        help="allow a TCP control address that is not loopback (the token still applies)",
    )
    p.add_argument(
        "--default-timeout",
        type=_timeout("--default-timeout"),
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="command deadline when a request gives none; 'none': no deadline"
        " (default %(default)s)",
    )
    p.add_argument(
        "--probe-interval",
        type=_timeout("--probe-interval"),
        default=DEFAULT_PROBE_INTERVAL,
        metavar="S",
        help="re-probe connections idle this long; 'none': never (default %(default)s)",
    )
    p.add_argument(
        "--probe-timeout",
        type=_timeout("--probe-timeout"),
        default=DEFAULT_PROBE_TIMEOUT,
        metavar="S",
        help="deadline of each probe (default %(default)s)",
    )
    p.add_argument(
        "--grace",
        type=_timeout("--grace"),
        default=DEFAULT_GRACE,
        metavar="S",
        help="on SIGTERM/SIGINT, let running commands finish this long (default %(default)s)",
    )
    p.add_argument(
        "--max-connections-per-guest",
        type=_cap,
        default=DEFAULT_MAX_CONNECTIONS_PER_GUEST,
        metavar="N",
        help="refuse (and log) a guest's connections beyond N; 'none': no cap"
        " (default %(default)s)",
    )
    p.add_argument(
        "--protocol",
        choices=["auto", "v1", "v2"],
        default="auto",
        help="what guest connections speak: 'auto' offers v2 and falls back to v1, 'v2'"
        " refuses v1-only guests, 'v1' never offers v2 (default %(default)s)",
    )
    p.add_argument("--max-command", type=_size, metavar="BYTES", help="largest command sent")
    p.add_argument("--max-stdout", type=_size, metavar="BYTES", help="largest stdout accepted")
    p.add_argument("--max-stderr", type=_size, metavar="BYTES", help="largest stderr accepted")
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="default %(default)s",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text lines, or one JSON object per line (default %(default)s)",
    )
    p.set_defaults(run=_run_serve)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The checked configuration of parsed ``serve`` options; UsageError says what is wrong."""
    from .serve.config import ServeConfig

    return ServeConfig.from_options(
        listen=args.listen or [],
        allowed_cids=args.allowed_cid,
        control=args.control,
        metrics=args.metrics,
        token_file=args.token_file,
        control_allow_remote=args.control_allow_remote,
        max_connections_per_guest=args.max_connections_per_guest,
        protocol=args.protocol,
        default_timeout=args.default_timeout,
        probe_interval=args.probe_interval,
        probe_timeout=args.probe_timeout,
        grace=args.grace,
        max_command=args.max_command,
        max_stdout=args.max_stdout,
        max_stderr=args.max_stderr,
        log_level=args.log_level,
        log_format=args.log_format,
    )


def _run_serve(args: argparse.Namespace) -> int:
    from .errors import UsageError, VsockAsyncError
    from .serve.daemon import run_serve

    try:
        config = serve_config(args)
    except UsageError as exc:
        print(f"vsock-async serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        run_serve(config)
    except (VsockAsyncError, OSError) as exc:
        print(f"vsock-async serve: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


# -- exec, guests ---------------------------------------------------------------------------


def _add_control_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        metavar="ADDRESS",
        help="the daemon's control API: unix:PATH or tcp://HOST:PORT"
        " (default $VSOCK_ASYNC_CONTROL, else serve's default socket)",
    )
    p.add_argument(
        "--token-file",
        metavar="PATH",
        help="file holding the bearer token (default $VSOCK_ASYNC_TOKEN_FILE)",
    )


def _add_exec_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .timeouts import DEFAULT

    p = subparsers.add_parser(
        "exec",
        help="run a command in a guest through serve; exit with its exit code",
        description=(
            "Run a command in a guest through `serve`, write the guest's stdout and stderr"
            " to ours as they come, and exit with the guest's exit code (128+N: killed by"
            f" signal N; {EXIT_TIMEOUT}: it timed out; {EXIT_FAILED}: the daemon or the guest"
            f" connection failed; {EXIT_CANNOT_RUN}/{EXIT_NOT_FOUND}: the guest could not"
            " start the program). Ctrl-C and SIGTERM are forwarded to the command (a second"
            " Ctrl-C stops waiting for it). A guest speaking only protocol v1 runs it too,"
            " its output written once it ended; -i, -t, --user and --stderr stdout need v2."
        ),
        usage="vsock-async exec [options] [-i] [-t] (-c 'COMMAND LINE' | -- ARGV...)",
    )
    _add_control_options(p)
    p.add_argument("--guest", metavar="KEY", help="the guest (CID or label); optional with one")
    p.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="forward our stdin to the command, its end included (no deadline by default)",
    )
    p.add_argument(
        "-t",
        "--tty",
        action="store_true",
        help="give the command a terminal in the guest, of our terminal's size; with -i our"
        " terminal goes raw, every key to the guest (no deadline by default)",
    )
    p.add_argument(
        "--stderr",
        choices=("pipe", "stdout"),
        help="stdout: merge the command's stderr into its stdout, in the order written (as"
        " 2>&1, without a terminal); pipe: keep it apart, on our stderr (the default; -t"
        " merges them)",
    )
    p.add_argument(
        "--env",
        action="append",
        type=_env_pair,
        metavar="NAME=VALUE",
        help="set an environment variable for the command; repeatable",
    )
    p.add_argument("--cwd", metavar="DIR", help="run the command in DIR")
    p.add_argument(
        "--user", type=_user, metavar="USER", help="run as USER, a name or a uid (a root agent)"
    )
    p.add_argument(
        "--timeout",
        type=_timeout("--timeout"),
        default=DEFAULT,
        metavar="S",
        help="command deadline in seconds; 'none': no deadline (default: the daemon's, and"
        " none with -i or -t)",
    )
    p.add_argument(
        "-c",
        dest="command_line",
        metavar="'COMMAND LINE'",
        help="send this shell command line as it is, like sh -c",
    )
    p.add_argument("argv", nargs="*", metavar="ARGV", help="a command and its arguments (quoted)")
    p.set_defaults(run=_run_exec, parser=p)


def _env_pair(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not name or not equals:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def _user(text: str) -> str | int:
    return int(text) if text.isascii() and text.isdigit() else text


def _exec_misparsed(args: argparse.Namespace, unknown: list[str]) -> NoReturn:
    """Options of the guest's command taken for ours: say how to pass them."""
    parser: argparse.ArgumentParser = args.parser
    if args.command_line is not None:
        line = " ".join([args.command_line, *unknown, *args.argv])
        parser.error(
            f"unrecognized arguments: {' '.join(unknown)}; quote the whole command line:"
            f" vsock-async exec [options] -c {shlex.quote(line)}"
        )
    parser.error(
        f"unrecognized arguments: {' '.join(unknown)}; put the command after --:"
        f" vsock-async exec [options] -- {shlex.join([*args.argv, *unknown])}"
    )


def _run_exec(args: argparse.Namespace) -> int:
    from .cli_exec import exec_command

    parser: argparse.ArgumentParser = args.parser
    if (args.command_line is None) == (not args.argv):
        parser.error("give either -c 'COMMAND LINE' or -- ARGV... (exactly one of them)")
    if args.tty and args.stderr == "pipe":
        parser.error(
            "-t gives the command a terminal, its stdout and stderr both: --stderr pipe"
            " cannot keep them apart (leave --stderr out)"
        )
    command: str | list[str] = args.command_line if args.command_line is not None else args.argv
    return exec_command(
        command,
        control=args.control,
        token_file=args.token_file,
        guest=args.guest,
        timeout=args.timeout,
        interactive=args.interactive,
        tty=args.tty,
        stderr=args.stderr,
        env=dict(args.env) if args.env else None,
        cwd=args.cwd,
        user=args.user,
    )


def _add_guests_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("guests", help="list the guests connected to serve")
    _add_control_options(p)
    p.add_argument("--json", action="store_true", help="print the API's JSON, for scripts")
    p.set_defaults(run=_run_guests)


def _run_guests(args: argparse.Namespace) -> int:
    from .cli_exec import list_guests

    return list_guests(control=args.control, token_file=args.token_file, as_json=args.json)


def _add_cp_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "cp",
        help="copy files and directories in and out of a guest through serve, like docker cp",
        description=(
            "Copy SOURCE to DESTINATION, one of them GUEST:PATH (PATH absolute; an empty GUEST"
            " is the only connected guest), the other a local path, or - for stdin or stdout"
            " (one file's bytes). A directory is copied whole, links as links; into an"
            " existing directory, the copy takes SOURCE's name. Files keep their mode and mtime"
            " and land whole or not at all. A local path with a ':' is written ./a:b. Progress"
            f" shows on a terminal. Exit status {EXIT_OK}: copied; {EXIT_ERROR}: it failed (the"
            f" reason on stderr); {EXIT_USAGE}: bad arguments; {EXIT_INTERRUPTED}: Ctrl-C."
        ),
    )
    _add_control_options(p)
    p.add_argument("source", metavar="SOURCE", help="GUEST:PATH, a local path, or -")
    p.add_argument("destination", metavar="DESTINATION", help="GUEST:PATH, a local path, or -")
    p.set_defaults(run=_run_cp)


def _run_cp(args: argparse.Namespace) -> int:
    from .cli_cp import copy
    from .errors import UsageError

    try:
        return copy(args.source, args.destination, control=args.control, token_file=args.token_file)
    except UsageError as exc:
        print(f"vsock-async cp: {exc}", file=sys.stderr)
        return EXIT_USAGE


# -- demo ---------------------------------------------------------------------------------


def _add_demo_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run serve and an agent here (no VM needed) and drive them through the API",
        description=(
            "Start the real `serve` on a temporary Unix socket, the real agent dialing it as a"
            " separate process, run a few commands through the control API, print what"
            " happened, and clean up."
        ),
    )
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .serve.demo import run_demo

    return run_demo()

"""``vsock-async exec`` and ``vsock-async guests``: the control client library, driven from a
terminal; the exit codes are :mod:`vsock_async.cli`'s.

``exec`` streams over the daemon's exec WebSocket (:mod:`vsock_async.cli_stream`, which
needs aiohttp); against a guest speaking only protocol v1, or without aiohttp, a plain
``exec`` falls back to ``run`` (the whole output once the command ended), while ``-i``,
``-t``, ``--user`` and ``--stderr stdout`` cannot be done and say so.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import BinaryIO, Literal, TextIO

from .cli import (
    EXIT_CANNOT_RUN,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TIMEOUT,
)
from .errors import UsageError, VsockAsyncError
from .host.commandline import shown_command
from .serve.control_client import ControlClient, ControlError
from .serve.defaults import TOKEN_FILE_ENV, read_token_file
from .timeouts import DEFAULT, Timeout

__all__ = ["control_client", "exec_command", "list_guests", "pick_guest"]


def control_client(control: str | None, token_file: str | None) -> ControlClient:
    """The client of the daemon at ``control`` (default: serve's), with the token of ``token_file``
    (default ``$VSOCK_ASYNC_TOKEN_FILE``)."""
    token_path = token_file or os.environ.get(TOKEN_FILE_ENV)
    token = read_token_file(token_path) if token_path else None
    return ControlClient(control, token=token)


def pick_guest(client: ControlClient, guest: str | None) -> str:
    """``guest``, or the only connected guest; UsageError when there is none or several."""
    if guest is not None:
        return guest
    keys = [g["key"] for g in client.guests()]
    if len(keys) == 1:
        return str(keys[0])
    if not keys:
        raise UsageError("no guest is connected to the daemon (see `vsock-async guests`)")
    raise UsageError(
        f"{len(keys)} guests are connected ({', '.join(sorted(keys))}): pick one with --guest"
    )


class _ElapsedTicker:
    """Shows ``[running 3s]`` on a terminal's stderr while a command runs; nothing otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False

    def __enter__(self) -> _ElapsedTicker:
        if self._stream.isatty():
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()

    def _tick(self) -> None:
        start = time.monotonic()
        while not self._done.wait(1.0):
            self._stream.write(f"\r\x1b[K[running {time.monotonic() - start:.0f}s]")
            self._stream.flush()
            self._shown = True


def _write(stream: BinaryIO, data: bytes) -> None:
    stream.write(data)
    stream.flush()


def _base64_field(value: object) -> bytes:
    return base64.b64decode(value) if isinstance(value, str) else b""


def exec_command(
    command: str | list[str],
    *,
    control: str | None,
    token_file: str | None,
    guest: str | None,
    timeout: Timeout,
    interactive: bool = False,
    tty: bool = False,
    stderr: Literal["pipe", "stdout"] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    user: str | int | None = None,
) -> int:
    """Run ``command`` in a guest through the daemon, copy its output as it comes; the exit
    status.

    The guest's exit code (128+N when signal N killed the command), or
    :data:`EXIT_TIMEOUT` when the deadline fired, :data:`EXIT_NOT_FOUND` or
    :data:`EXIT_CANNOT_RUN` when the guest could not start the program, and
    :data:`EXIT_FAILED` when the daemon or the guest connection failed. With
    ``interactive`` or ``tty`` the deadline defaults to none. ``stderr`` is the exec
    request's: ``"stdout"`` merges it into stdout in the guest.
    """
    untimed = interactive or tty  # a session lasts as long as its user
    needs_stream = untimed or user is not None or stderr == "stdout"
    if untimed and timeout is DEFAULT:
        timeout = None
    try:
        client = control_client(control, token_file)
        key = pick_guest(client, guest)
    except VsockAsyncError as exc:
        return _failed(exc)
    try:
        from .cli_stream import ExecOptions, TimedOut, stream_exec
    except ImportError as exc:  # no aiohttp: what run can do, it does
        if needs_stream:
            return _failed(
                UsageError(
                    f"-i, -t, --user and --stderr stdout need aiohttp ({exc}):"
                    " pip install 'vsock_async[serve]'"
                )
            )
        return _run_command(client, key, command, timeout=timeout, env=env, cwd=cwd)
    options = ExecOptions(command, interactive, tty, stderr, env, cwd, user, timeout)
    try:
        return asyncio.run(stream_exec(str(client.address), client.token, key, options))
    except TimedOut:
        after = "" if not isinstance(timeout, float) else f" after {timeout:.3g} s"
        print(f"vsock-async exec: command {_shown(command)} timed out{after}", file=sys.stderr)
        return EXIT_TIMEOUT
    except ControlError as exc:
        if exc.code == "unsupported" and not needs_stream:  # a v1 guest: run does it
            return _run_command(client, key, command, timeout=timeout, env=env, cwd=cwd)
        if exc.code == "command_timeout":
            print(f"vsock-async exec: {exc.message}", file=sys.stderr)
            return EXIT_TIMEOUT
        if exc.code == "spawn_failed":
            print(f"vsock-async exec: {exc.message}", file=sys.stderr)
            return EXIT_NOT_FOUND if exc.body.get("errno") == "ENOENT" else EXIT_CANNOT_RUN
        return _failed(exc)
    except VsockAsyncError as exc:
        return _failed(exc)


def _shown(command: str | list[str]) -> str:
    return shown_command((command if isinstance(command, str) else shlex.join(command)).encode())


def _failed(exc: VsockAsyncError) -> int:
    print(f"vsock-async exec: error: {exc}", file=sys.stderr)
    return EXIT_FAILED


def _run_command(
    client: ControlClient,
    key: str,
    command: str | list[str],
    *,
    timeout: Timeout,
    env: Mapping[str, str] | None,
    cwd: str | None,
) -> int:
    """``exec`` through ``run``: the whole output once the command ended."""
    try:
        with _ElapsedTicker(sys.stderr):
            outcome = client.run(key, command, timeout=timeout, env=env, cwd=cwd)
    except ControlError as exc:
        if exc.code == "command_timeout":
            _write(sys.stdout.buffer, _base64_field(exc.body.get("stdout")))
            _write(sys.stderr.buffer, _base64_field(exc.body.get("stderr")))
            print(f"vsock-async exec: {exc.message}", file=sys.stderr)
            return EXIT_TIMEOUT
        return _failed(exc)
    except VsockAsyncError as exc:
        return _failed(exc)
    try:
        _write(sys.stdout.buffer, outcome.stdout)
        _write(sys.stderr.buffer, outcome.stderr)
    except BrokenPipeError:
        # The reader went away (``exec ... | head``): exit as a shell pipeline member would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return outcome.exit_code


def list_guests(*, control: str | None, token_file: str | None, as_json: bool) -> int:
    """Print the connected guests: a table, or the API's JSON with ``as_json``."""
    try:
        guests = control_client(control, token_file).guests()
    except VsockAsyncError as exc:
        print(f"vsock-async guests: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if as_json:
        print(json.dumps({"guests": guests}, indent=2))
        return EXIT_OK
    if not guests:
        print("no guests connected")
        return EXIT_OK
    header = ("KEY", "CONNECTIONS", "BUSY", "PEER", "CONNECTED AT", "LAST PROBE")
    rows = [
        (
            str(g["key"]),
            str(g["connections"]),
            f"{g['busy_connections']}/{g['connections']}",
            str(g["peer"] or "-"),
            str(g["connected_at"] or "-"),
            str(g["last_probe"] or "-"),
        )
        for g in guests
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK

"""``vsock-async exec`` streamed over the daemon's exec WebSocket: output as it comes, stdin
(``-i``), a terminal in the guest (``-t``), signals forwarded, the exit code passed through.

Built on :class:`~vsock_async.serve.async_client.AsyncControlClient` (aiohttp). With
``-i -t`` on a terminal the local terminal is put in raw mode, so every key goes to the
guest's terminal (Ctrl-C included, as a byte its line discipline turns into SIGINT), and
restored on every way out: the end, an error, a signal. Otherwise SIGINT, SIGTERM, SIGHUP
and SIGQUIT are forwarded to the guest process; a second Ctrl-C stops waiting for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import termios
import threading
import tty
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from .errors import VsockAsyncError
from .host.process import DEVNULL, PIPE, STDOUT, ProcessReader
from .serve.async_client import AsyncControlClient, RemoteProcess
from .timeouts import Timeout

__all__ = ["ExecOptions", "TimedOut", "stream_exec", "terminal_size"]

_CHUNK: Final = 64 * 1024
_DEFAULT_SIZE: Final = (24, 80)
_FORWARDED: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_STDERR: Final[dict[str | None, int]] = {"pipe": PIPE, "stdout": STDOUT}
"""``--stderr``'s values as :meth:`AsyncControlClient.create_process` takes them."""


@dataclass(frozen=True, slots=True)
class ExecOptions:
    """What ``exec`` was asked to run, and how."""

    command: str | list[str]
    interactive: bool
    """``-i``: forward stdin, its end included."""
    tty: bool
    """``-t``: a terminal in the guest."""
    stderr: Literal["pipe", "stdout"] | None
    """``--stderr``: ``"stdout"`` merged into stdout in the guest, ``"pipe"`` apart; None:
    apart, or merged by the terminal."""
    env: Mapping[str, str] | None
    cwd: str | None
    user: str | int | None
    timeout: Timeout


class TimedOut(Exception):
    """The process's deadline fired; the agent stopped it."""


def terminal_size() -> tuple[int, int]:
    """``(rows, cols)`` of the terminal on stdin, stdout or stderr; 24x80 with none."""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            columns, lines = os.get_terminal_size(fd)
            if lines and columns:
                return lines, columns
    return _DEFAULT_SIZE


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode, its settings restored however the block ends."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def stream_exec(address: str, token: str | None, key: str, options: ExecOptions) -> int:
    """Run ``options.command`` in guest ``key`` through the daemon at ``address``; the exit
    status for ``exec``: the process's own (128+N for signal N), 128+N when signal N made us
    stop waiting, 141 when our stdout went away.

    Raises :class:`TimedOut` when the process's deadline fired, and the client's errors
    (:class:`ControlError`, :class:`ConnectFailed`) when it could not run or its stream failed.
    """
    async with AsyncControlClient(address, token=token, timeout=None) as client:
        process = await client.create_process(
            key,
            options.command,
            stdin=PIPE if options.interactive else DEVNULL,
            stderr=_STDERR.get(options.stderr),
            env=options.env,
            cwd=options.cwd,
            user=options.user,
            pty=terminal_size() if options.tty else None,
            timeout=options.timeout,
        )
        async with process:
            raw = options.tty and options.interactive and os.isatty(0)
            with raw_mode(0) if raw else contextlib.nullcontext():
                return await _Session(process, raw=raw, tty=options.tty).run()


class _Session:
    """One streamed exec between the local terminal (or pipes) and a remote process."""

    def __init__(self, process: RemoteProcess, *, raw: bool, tty: bool) -> None:
        self.process = process
        self.raw = raw
        self.tty = tty
        self.loop = asyncio.get_running_loop()
        self.stop: asyncio.Future[int] = self.loop.create_future()
        """Set to an exit status when we stop waiting for the process."""
        self._interrupted = False
        self._tasks: set[asyncio.Future[None]] = set()

    async def run(self) -> int:
        handled = [*_FORWARDED, *([signal.SIGWINCH] if self.tty else [])]
        for signum in handled:
            self.loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            if self.process.stdin is not None:
                threading.Thread(target=self._read_stdin, daemon=True).start()
            outputs = asyncio.ensure_future(self._copy_outputs())
            waiting: set[asyncio.Future[Any]] = {outputs, self.stop}
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                outputs.cancel()
            if self.stop.done():
                return self.stop.result()
            try:
                outputs.result()
            except BrokenPipeError:
                # Our reader went away (``exec ... | head``): exit as a pipeline member would.
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                return 128 + signal.SIGPIPE
            await self.process.wait()
        finally:
            for signum in handled:
                self.loop.remove_signal_handler(signum)
        if self.process.timed_out:
            raise TimedOut
        signum_ended = self.process.exit_signal
        return 128 + signum_ended if signum_ended is not None else self.process.returncode or 0

    async def _copy_outputs(self) -> None:
        readers = [(1, self.process.stdout), (2, self.process.stderr)]
        await asyncio.gather(*(_copy(reader, fd) for fd, reader in readers if reader is not None))

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGWINCH:
            self._spawn(self.process.resize(*terminal_size()))
        elif self.raw or (signum == signal.SIGINT and self._interrupted):
            # In raw mode a signal comes from elsewhere, not the keyboard; after a forwarded
            # Ctrl-C, a second one means: stop waiting. The daemon then stops the process.
            if not self.stop.done():
                self.stop.set_result(128 + signum)
        else:
            self._interrupted = self._interrupted or signum == signal.SIGINT
            self.process.send_signal(signum)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _read_stdin(self) -> None:
        """A thread: read our stdin (a terminal, a pipe or a file alike) and hand each piece
        to the loop, waiting until it went to the guest: bounded memory, and the end too."""
        while True:
            try:
                data = os.read(0, _CHUNK)
            except OSError:  # a terminal that hung up
                data = b""
            try:
                sent = asyncio.run_coroutine_threadsafe(self._forward(data), self.loop)
                if not sent.result():
                    return
            except (RuntimeError, concurrent.futures.CancelledError):  # the loop is gone
                return

    async def _forward(self, data: bytes) -> bool:
        stdin = self.process.stdin
        assert stdin is not None
        if not data:
            stdin.write_eof()
            return False
        stdin.write(data)
        try:
            await stdin.drain()
        except VsockAsyncError:  # the process ended without reading it all, or the stream
            return False  # failed: the session reports that, not the stdin reader
        return True


async def _copy(reader: ProcessReader, fd: int) -> None:
    while data := await reader.read(_CHUNK):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

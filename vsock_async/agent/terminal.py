"""Pseudo-terminals for v2 process streams: open one, size it, make it a child's terminal.

Standard library only. The agent keeps the master; the child gets the slave as
stdin, stdout and stderr and as its controlling terminal, so job control, line
editing and ``SIGWINCH`` on a resize work as they do over ssh.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios

__all__ = [
    "eof_char",
    "foreground_group",
    "open_pty",
    "pty_available",
    "set_size",
    "take_terminal",
]

_WINSIZE_STRUCT = struct.Struct("HHHH")  # struct winsize: rows, cols, xpixel, ypixel


def pty_available() -> bool:
    """True if this system can open a pseudo-terminal (devpts mounted, /dev/ptmx usable)."""
    try:
        master, slave = os.openpty()
    except OSError:
        return False
    os.close(master)
    os.close(slave)
    return True


def open_pty(rows: int, cols: int) -> tuple[int, int]:
    """A new terminal of ``rows`` x ``cols``: (master, slave), both close-on-exec.

    The master is non-blocking, for the event loop; ``openpty`` opens both with
    ``O_NOCTTY``, so the agent itself never acquires the terminal.
    """
    master, slave = os.openpty()
    try:
        set_size(master, rows, cols)
        os.set_blocking(master, False)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


def set_size(master: int, rows: int, cols: int) -> None:
    """Resize the terminal; the kernel sends ``SIGWINCH`` to its foreground process group."""
    fcntl.ioctl(master, termios.TIOCSWINSZ, _WINSIZE_STRUCT.pack(rows, cols, 0, 0))


def take_terminal() -> None:
    """In the child, after ``setsid()``: make stdin (the slave) the controlling terminal.

    Runs as ``Popen(preexec_fn=...)``, between the fork and the exec.
    """
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def foreground_group(master: int) -> int:
    """The process group in the terminal's foreground (the one a typed ^C would signal)."""
    return os.tcgetpgrp(master)


def eof_char(master: int) -> bytes:
    """The terminal's end-of-file character (``VEOF``, ^D unless changed)."""
    char = termios.tcgetattr(master)[6][termios.VEOF]
    return char if isinstance(char, bytes) else bytes((char,))

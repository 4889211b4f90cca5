"""Commands start with every signal at its default and none blocked, however the agent started.

Ignored signals and the signal mask survive fork and exec. An agent started with SIGINT and
SIGQUIT ignored (how a non-interactive shell starts ``cmd &``), SIGHUP ignored (``nohup``) or
signals blocked would pass that on to every command: Ctrl-C on its terminal and the host's
SIGNAL could not reach it. A signal that has a handler is reset to its default by exec, so the
agent gives each such signal a handler that does nothing (the agent itself still ignores it)
and unblocks it, once, at start. Nothing is done per spawn, so subprocess keeps using vfork.
SIGPIPE and SIGXFSZ, which Python itself ignores, subprocess resets in each child
(``restore_signals``). The signals of a fault (SIGSEGV, SIGBUS, ...) are left alone: a handler
that returns would run the faulting instruction again, forever. Signals 32 and 33, which
glibc keeps for itself, are out of reach (its ``sigaction`` refuses them) and mean nothing
to a command; so is any other signal whose handler the runtime refuses to set (valgrind keeps
one for itself): the agent leaves it as it found it, blocked if it was, rather than fail.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["default_signals_for_commands"]

_LEFT_ALONE = {
    *(signal.SIGPIPE, signal.SIGXFSZ),  # reset by subprocess
    *(signal.SIGKILL, signal.SIGSTOP),  # cannot be caught
    *(signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS),
}
_JOB_CONTROL = {signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}


def default_signals_for_commands() -> None:
    """Catch, with a handler that does nothing, each signal ignored or blocked; unblock them.

    Only in the main thread (the only one that may set handlers). With a controlling
    terminal, SIGTSTP, SIGTTIN and SIGTTOU are left alone: caught, a background agent that
    writes its log to that terminal would be sent SIGTTOU and retry the write forever.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    left = _LEFT_ALONE | (_JOB_CONTROL if _has_controlling_terminal() else set())
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, ()) - left
    for signum in signal.valid_signals() - left:
        handler = signal.getsignal(signum)
        if handler is signal.SIG_IGN or (signum in blocked and handler is signal.SIG_DFL):
            try:
                signal.signal(signum, _ignored)
            except OSError:  # EINVAL: not ours to catch; unblocked, it could kill the agent
                blocked.discard(signum)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)


def _ignored(signum: int, frame: object) -> None:
    """The agent's handler for a signal it was started ignoring or blocking: nothing happens."""


def _has_controlling_terminal() -> bool:
    try:
        terminal = os.open("/dev/tty", os.O_RDONLY)
    except OSError:  # ENXIO: no controlling terminal
        return False
    os.close(terminal)
    return True

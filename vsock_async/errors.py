"""The one exception tree of vsock_async.

::

    VsockAsyncError                     everything this library raises
    ├── PeerError                       the other side misbehaved or went away
    │   ├── ProtocolError               bytes that break the wire protocol
    │   │   └── FrameTooLarge           a length prefix above the configured limit
    │   ├── ConnectionLost              the peer closed or reset it (also ConnectionClosed)
    │   └── ProbeFailed                 ``:`` did not come back as exit 0 with no output
    ├── ConnectionClosed                the connection is gone, whoever closed it
    │   ├── ConnectionLost              ... because of the peer (also PeerError)
    │   └── ClosedLocally               ... because we closed it: aclose(), a server closing, a
    │                                   timeout or cancel that put its stream out of step
    ├── CommandFailed                   ``check=True`` and a non-zero exit code
    ├── SpawnFailed                     the guest could not start a process (also OSError)
    ├── GuestFileError                  a file operation failed in the guest (also OSError)
    ├── StdinClosed                     a process ended before its stdin was all sent
    │                                   (also BrokenPipeError)
    ├── GuestBusy                       every connection of a guest is busy and ``wait=False``
    ├── UnknownGuest                    no guest with that key is connected (also LookupError)
    ├── ConnectFailed                   a connection could not be made (also OSError)
    ├── ListenFailed                    a listening socket could not be set up (also OSError)
    ├── DeadlineExceeded                a deadline fired (also the built-in TimeoutError)
    │   ├── AcceptTimeout               no guest connected in time
    │   ├── ConnectTimeout              a connection could not be made in time
    │   └── CommandTimeout              an exchange did not finish in time; carries the result
    └── UsageError                      local misuse of the API (also ValueError)
        ├── InvalidAddress              an address string that does not parse
        └── Unsupported                 the guest cannot do that: it speaks only v1, or its
                                        agent lacks the capability

Peer errors say the guest (or the network path to it) is at fault; a usage error
says the calling code is; :class:`ClosedLocally` says this process closed the
connection itself. ``except ConnectionClosed`` catches a closed connection
whoever closed it. Timeouts subclass :class:`TimeoutError` so that code
written for ``asyncio.timeout`` or ``anyio.fail_after`` catches them too.
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import CommandResult

__all__ = [
    "AcceptTimeout",
    "ClosedLocally",
    "CommandFailed",
    "CommandTimeout",
    "ConnectFailed",
    "ConnectTimeout",
    "ConnectionClosed",
    "ConnectionLost",
    "DeadlineExceeded",
    "FrameTooLarge",
    "GuestBusy",
    "GuestFileError",
    "InvalidAddress",
    "ListenFailed",
    "PeerError",
    "ProbeFailed",
    "ProtocolError",
    "SpawnFailed",
    "StdinClosed",
    "UnknownGuest",
    "Unsupported",
    "UsageError",
    "VsockAsyncError",
]


class VsockAsyncError(Exception):
    """Root of every exception raised by vsock_async."""


class PeerError(VsockAsyncError):
    """The peer misbehaved or went away; nothing the caller did wrong."""


class ProtocolError(PeerError):
    """The peer sent bytes that break the v1 wire protocol."""


class FrameTooLarge(ProtocolError):
    """A length prefix announced more bytes than the configured limit allows."""

    def __init__(self, what: str, length: int, limit: int) -> None:
        super().__init__(
            f"{what} of {length} bytes exceeds the limit of {limit} bytes"
            " (raise it with Limits if the peer is trusted to send that much)"
        )
        self.what = what
        self.length = length
        self.limit = limit


class ConnectionClosed(VsockAsyncError):
    """The connection is closed and the channel unusable; the subclass says who closed it."""


class ConnectionLost(ConnectionClosed, PeerError):
    """The peer closed or reset the connection, or the path to it failed."""


class ClosedLocally(ConnectionClosed):
    """We closed the connection: ``aclose()``, the server closing, or a timeout or cancel that
    put its stream out of step (on v1 a late answer must never be read as the next one's)."""


class ProbeFailed(PeerError):
    """The readiness probe ``:`` did not come back as exit 0 with empty output.

    ``result`` is the answer when one was read whole (a non-zero exit code), and None
    when the answer announced output: a probe's answer may hold none, so none is read.
    """

    def __init__(self, message: str, result: CommandResult | None) -> None:
        super().__init__(message)
        self.result = result


class CommandFailed(VsockAsyncError):
    """A command run with ``check=True`` exited with a non-zero code."""

    def __init__(self, command: bytes, result: CommandResult) -> None:
        super().__init__(f"command {command!r} exited with code {result.exit_code}")
        self.command = command
        self.result = result


class GuestBusy(VsockAsyncError):
    """Every connection of the guest is busy and the call was asked not to wait."""


class UnknownGuest(VsockAsyncError, LookupError):
    """No guest with that key is connected."""


class ConnectFailed(VsockAsyncError, OSError):
    """A connection to a guest, a listener or a VMM socket could not be made."""


class ListenFailed(VsockAsyncError, OSError):
    """A listening socket could not be set up: address in use, no permission, no AF_VSOCK."""


class DeadlineExceeded(VsockAsyncError, TimeoutError):
    """A deadline fired. Also a :class:`TimeoutError`."""


class AcceptTimeout(DeadlineExceeded):
    """No guest connection arrived before the accept deadline."""


class ConnectTimeout(DeadlineExceeded, ConnectFailed):
    """A connection could not be made before its deadline."""


class CommandTimeout(DeadlineExceeded):
    """A call missed its deadline.

    ``sent`` is False when its command never reached the guest (it waited for a
    connection or a free stream, or was given no time): nothing ran and nothing
    was closed. Otherwise, on v1 the channel has been closed (its stream is out
    of step); on v2 only the command's process was stopped. ``result`` has
    ``timed_out=True`` and ``exit_code=None``; its stdout and stderr hold
    whatever output had arrived before the deadline.
    """

    def __init__(self, message: str, result: CommandResult, *, sent: bool = True) -> None:
        super().__init__(message)
        self.result = result
        self.sent = sent


class UsageError(VsockAsyncError, ValueError):
    """The API was used wrongly: a bad argument or an operation in the wrong state."""


class InvalidAddress(UsageError):
    """An address string that does not parse, with what was expected."""


class Unsupported(UsageError):
    """The guest cannot do what was asked: the connection speaks only protocol v1, or the
    guest's agent did not announce the capability the call needs (``pty``, ``user``...).

    Nothing was sent; the message says what is missing and how to get it.
    """


class SpawnFailed(VsockAsyncError, OSError):
    """The guest's agent could not start a process.

    ``code`` is the agent's reason (``spawn_failed``, ``permission``, ``limit``,
    ``unsupported``, ``bad_request``, ``internal``); for ``spawn_failed``,
    ``errno`` is the OS error number (``errno.ENOENT`` for a missing program) and
    ``errno_name`` its name, as the agent reported it.
    """

    def __init__(self, code: str, message: str, errno_name: str | None = None) -> None:
        number = getattr(_errno, errno_name, None) if errno_name else None
        if isinstance(number, int):
            super().__init__(number, f"the guest could not start the process: {message}")
        else:
            super().__init__(f"the guest could not start the process ({code}): {message}")
        self.code = code
        self.errno_name = errno_name


class GuestFileError(VsockAsyncError, OSError):
    """A file operation failed in the guest; nothing was left half done.

    ``path`` is the guest path of the operation. ``code`` is the agent's reason:
    ``file_error`` (the OS said no: ``errno_name`` is its name, e.g. ``ENOENT``,
    ``EACCES``, ``EISDIR``, ``ENOSPC``, and ``errno`` its number here),
    ``permission`` (an owner asked of an agent that is not root),
    ``digest_mismatch``, ``bad_request``, ``limit``, ``unsupported``, ``internal``.
    """

    def __init__(self, code: str, message: str, path: str, errno_name: str | None = None) -> None:
        number = getattr(_errno, errno_name, None) if errno_name else None
        if isinstance(number, int):
            super().__init__(number, f"in the guest: {message}", path)
        else:
            super().__init__(f"{path!r} in the guest ({code}): {message}")
        self.code = code
        self.path = path
        self.errno_name = errno_name


class StdinClosed(VsockAsyncError, BrokenPipeError):
    """A process ended while bytes written to its stdin were still waiting to be sent.

    Also a :class:`BrokenPipeError`, as writing to an exited local process is;
    :meth:`Process.communicate` ignores it, as asyncio's does.
    """

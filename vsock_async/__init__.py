"""vsock_async: reach a microVM guest over vsock from asyncio, run commands, get results back.

::

    async with await vsock_async.listen("vsock://any:1024") as server:
        guest = await server.accept(timeout=10)
        await guest.probe(timeout=2)
        result = await guest.run("uname -a", timeout=30)

The core imports only the standard library. The names below are imported from their home
modules on first use (PEP 562), so ``python -m vsock_async agent``, which imports only the
agent's modules, never loads the host side or the daemon.
"""

import typing as _typing

if _typing.TYPE_CHECKING:
    from ._sockets import UnixSocketOptions
    from .addresses import (
        DEFAULT_ADDRESS,
        Address,
        HybridVsockAddress,
        TcpAddress,
        UnixAddress,
        VsockAddress,
        parse_address,
    )
    from .agent.agent import GuestAgent
    from .errors import (
        AcceptTimeout,
        ClosedLocally,
        CommandFailed,
        CommandTimeout,
        ConnectFailed,
        ConnectionClosed,
        ConnectionLost,
        ConnectTimeout,
        DeadlineExceeded,
        FrameTooLarge,
        GuestBusy,
        GuestFileError,
        InvalidAddress,
        ListenFailed,
        PeerError,
        ProbeFailed,
        ProtocolError,
        SpawnFailed,
        StdinClosed,
        UnknownGuest,
        Unsupported,
        UsageError,
        VsockAsyncError,
    )
    from .host.channel import GuestChannel
    from .host.commandline import compose_command
    from .host.connect import connect
    from .host.files import FileInfo
    from .host.guests import (
        Guest,
        GuestEvent,
    )
    from .host.process import (
        DEVNULL,
        PIPE,
        STDOUT,
        Process,
        ProcessReader,
        ProcessWriter,
    )
    from .host.server import (
        CommandServer,
        listen,
    )
    from .protocol import Limits
    from .results import CommandResult

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADDRESS",
    "DEVNULL",
    "PIPE",
    "STDOUT",
    "AcceptTimeout",
    "Address",
    "ClosedLocally",
    "CommandFailed",
    "CommandResult",
    "CommandServer",
    "CommandTimeout",
    "ConnectFailed",
    "ConnectTimeout",
    "ConnectionClosed",
    "ConnectionLost",
    "DeadlineExceeded",
    "FileInfo",
    "FrameTooLarge",
    "Guest",
    "GuestAgent",
    "GuestBusy",
    "GuestChannel",
    "GuestEvent",
    "GuestFileError",
    "HybridVsockAddress",
    "InvalidAddress",
    "Limits",
    "ListenFailed",
    "PeerError",
    "ProbeFailed",
    "Process",
    "ProcessReader",
    "ProcessWriter",
    "ProtocolError",
    "SpawnFailed",
    "StdinClosed",
    "TcpAddress",
    "UnixAddress",
    "UnixSocketOptions",
    "UnknownGuest",
    "Unsupported",
    "UsageError",
    "VsockAddress",
    "VsockAsyncError",
    "compose_command",
    "connect",
    "listen",
    "parse_address",
]

_HOMES: dict[str, str] = {
    "UnixSocketOptions": "._sockets",
    "DEFAULT_ADDRESS": ".addresses",
    "Address": ".addresses",
    "HybridVsockAddress": ".addresses",
    "TcpAddress": ".addresses",
    "UnixAddress": ".addresses",
    "VsockAddress": ".addresses",
    "parse_address": ".addresses",
    "GuestAgent": ".agent.agent",
    "AcceptTimeout": ".errors",
    "ClosedLocally": ".errors",
    "CommandFailed": ".errors",
    "CommandTimeout": ".errors",
    "ConnectFailed": ".errors",
    "ConnectionClosed": ".errors",
    "ConnectionLost": ".errors",
    "ConnectTimeout": ".errors",
    "DeadlineExceeded": ".errors",
    "FrameTooLarge": ".errors",
    "GuestBusy": ".errors",
    "GuestFileError": ".errors",
    "InvalidAddress": ".errors",
    "ListenFailed": ".errors",
    "PeerError": ".errors",
    "ProbeFailed": ".errors",
    "ProtocolError": ".errors",
    "SpawnFailed": ".errors",
    "StdinClosed": ".errors",
    "UnknownGuest": ".errors",
    "Unsupported": ".errors",
    "UsageError": ".errors",
    "VsockAsyncError": ".errors",
    "GuestChannel": ".host.channel",
    "compose_command": ".host.commandline",
    "connect": ".host.connect",
    "FileInfo": ".host.files",
    "Guest": ".host.guests",
    "GuestEvent": ".host.guests",
    "DEVNULL": ".host.process",
    "PIPE": ".host.process",
    "STDOUT": ".host.process",
    "Process": ".host.process",
    "ProcessReader": ".host.process",
    "ProcessWriter": ".host.process",
    "CommandServer": ".host.server",
    "listen": ".host.server",
    "Limits": ".protocol",
    "CommandResult": ".results",
}
"""Each name of ``__all__`` and the module it is defined in."""


def __getattr__(name: str) -> object:
    """Import ``name`` from its home module on first use, and keep it here."""
    from importlib import import_module

    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

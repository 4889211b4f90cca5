"""vsock_async: reach a microVM guest over vsock from asyncio, run commands, get results back.

::

    async with await vsock_async.listen("vsock://any:1024") as server:
        guest = await server.accept(timeout=10)
        await guest.probe(timeout=2)
        result = await guest.run("uname -a", timeout=30)

The core imports only the standard library.
"""

from ._sockets import UnixSocketOptions as UnixSocketOptions
from .addresses import (
    DEFAULT_ADDRESS as DEFAULT_ADDRESS,
)
from .addresses import (
    Address as Address,
)
from .addresses import (
    HybridVsockAddress as HybridVsockAddress,
)
from .addresses import (
    TcpAddress as TcpAddress,
)
from .addresses import (
    UnixAddress as UnixAddress,
)
from .addresses import (
    VsockAddress as VsockAddress,
)
from .addresses import (
    parse_address as parse_address,
)
from .agent.agent import GuestAgent as GuestAgent
from .errors import (
    AcceptTimeout as AcceptTimeout,
)
from .errors import (
    ClosedLocally as ClosedLocally,
)
from .errors import (
    CommandFailed as CommandFailed,
)
from .errors import (
    CommandTimeout as CommandTimeout,
)
from .errors import (
    ConnectFailed as ConnectFailed,
)
from .errors import (
    ConnectionClosed as ConnectionClosed,
)
from .errors import (
    ConnectionLost as ConnectionLost,
)
from .errors import (
    ConnectTimeout as ConnectTimeout,
)
from .errors import (
    DeadlineExceeded as DeadlineExceeded,
)
from .errors import (
    FrameTooLarge as FrameTooLarge,
)
from .errors import (
    GuestBusy as GuestBusy,
)
from .errors import (
    GuestFileError as GuestFileError,
)
from .errors import (
    InvalidAddress as InvalidAddress,
)
from .errors import (
    ListenFailed as ListenFailed,
)
from .errors import (
    PeerError as PeerError,
)
from .errors import (
    ProbeFailed as ProbeFailed,
)
from .errors import (
    ProtocolError as ProtocolError,
)
from .errors import (
    SpawnFailed as SpawnFailed,
)
from .errors import (
    StdinClosed as StdinClosed,
)
from .errors import (
    UnknownGuest as UnknownGuest,
)
from .errors import (
    Unsupported as Unsupported,
)
from .errors import (
    UsageError as UsageError,
)
from .errors import (
    VsockAsyncError as VsockAsyncError,
)
from .host.channel import GuestChannel as GuestChannel
from .host.commandline import compose_command as compose_command
from .host.connect import connect as connect
from .host.files import FileInfo as FileInfo
from .host.guests import Guest as Guest
from .host.guests import GuestEvent as GuestEvent
from .host.process import DEVNULL as DEVNULL
from .host.process import PIPE as PIPE
from .host.process import STDOUT as STDOUT
from .host.process import Process as Process
from .host.process import ProcessReader as ProcessReader
from .host.process import ProcessWriter as ProcessWriter
from .host.server import CommandServer as CommandServer
from .host.server import listen as listen
from .protocol import Limits as Limits
from .results import CommandResult as CommandResult

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

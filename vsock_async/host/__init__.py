"""The asyncio host side: listen and accept, the guest registry, channels, connect.

A thin layer over :mod:`vsock_async.protocol`: sockets, deadlines and tasks
live here, the wire rules do not.
"""

from .channel import GuestChannel as GuestChannel
from .commandline import compose_command as compose_command
from .connect import connect as connect
from .guests import Guest as Guest
from .guests import GuestEvent as GuestEvent
from .server import CommandServer as CommandServer
from .server import listen as listen

__all__ = [
    "CommandServer",
    "Guest",
    "GuestChannel",
    "GuestEvent",
    "compose_command",
    "connect",
    "listen",
]

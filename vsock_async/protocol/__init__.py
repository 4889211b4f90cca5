"""The pure protocol core: frames, decoders, limits and handshakes. No sockets, no clock.

Everything here turns bytes into events and events into bytes, so it is tested
byte by byte without an event loop; the asyncio layers in :mod:`vsock_async.host`
and :mod:`vsock_async.agent` only feed it.

v1's names are here; protocol v2 (frames, the hello, the host and agent
sessions) is imported from :mod:`vsock_async.protocol.v2`.
"""

from . import v2 as v2
from .hybrid import MAX_REPLY as MAX_REPLY
from .hybrid import OkReplyParser as OkReplyParser
from .hybrid import encode_connect as encode_connect
from .limits import U32_MAX as U32_MAX
from .limits import Limits as Limits
from .v1 import PROBE_COMMAND as PROBE_COMMAND
from .v1 import Command as Command
from .v1 import CommandDecoder as CommandDecoder
from .v1 import OversizedCommand as OversizedCommand
from .v1 import ResultDecoder as ResultDecoder
from .v1 import encode_command as encode_command
from .v1 import encode_result as encode_result
from .v1 import result_frame_parts as result_frame_parts

__all__ = [
    "MAX_REPLY",
    "PROBE_COMMAND",
    "U32_MAX",
    "Command",
    "CommandDecoder",
    "Limits",
    "OkReplyParser",
    "OversizedCommand",
    "ResultDecoder",
    "encode_command",
    "encode_connect",
    "encode_result",
    "result_frame_parts",
    "v2",
]

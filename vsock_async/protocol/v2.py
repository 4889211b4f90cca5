"""The v2 wire protocol, sans I/O: the one place to import it from.

v2 is negotiated inside v1 on every new connection (:mod:`.hello`), then
carries many process and file streams on one connection with per-stream
credit flow control. docs/protocol.md ("Wire protocol v2") specifies it byte for byte.
"""

from .hello import HELLO_PREFIX as HELLO_PREFIX
from .hello import MAX_HELLO_ANSWER as MAX_HELLO_ANSWER
from .hello import VERSIONS as VERSIONS
from .hello import AgentLimits as AgentLimits
from .hello import HelloAnswer as HelloAnswer
from .hello import HelloRequest as HelloRequest
from .hello import hello_answer as hello_answer
from .hello import hello_answer_problem as hello_answer_problem
from .hello import hello_command as hello_command
from .hello import new_nonce as new_nonce
from .hello import parse_hello_answer as parse_hello_answer
from .hello import parse_hello_command as parse_hello_command
from .v2_frames import DEFAULT_MAX_FRAME as DEFAULT_MAX_FRAME
from .v2_frames import FLAG_END as FLAG_END
from .v2_frames import HEADER as HEADER
from .v2_frames import MAX_CONTROL as MAX_CONTROL
from .v2_frames import MAX_CREDIT as MAX_CREDIT
from .v2_frames import Channel as Channel
from .v2_frames import Frame as Frame
from .v2_frames import FrameDecoder as FrameDecoder
from .v2_frames import FrameType as FrameType
from .v2_frames import encode_frame as encode_frame
from .v2_frames import encode_json as encode_json
from .v2_frames import encode_window as encode_window
from .v2_frames import frame_parts as frame_parts
from .v2_frames import write_pieces as write_pieces
from .v2_session import DEFAULT_WINDOW as DEFAULT_WINDOW
from .v2_session import DOWNLOAD_OPS as DOWNLOAD_OPS
from .v2_session import MAX_PING as MAX_PING
from .v2_session import UPLOAD_OPS as UPLOAD_OPS
from .v2_session import AgentEvent as AgentEvent
from .v2_session import AgentSession as AgentSession
from .v2_session import CloseRequested as CloseRequested
from .v2_session import CommitRequested as CommitRequested
from .v2_session import ExecRequested as ExecRequested
from .v2_session import Exited as Exited
from .v2_session import FileRequested as FileRequested
from .v2_session import FileResult as FileResult
from .v2_session import HostEvent as HostEvent
from .v2_session import HostSession as HostSession
from .v2_session import Output as Output
from .v2_session import OutputCredit as OutputCredit
from .v2_session import Pong as Pong
from .v2_session import RequestFailed as RequestFailed
from .v2_session import ResizeRequested as ResizeRequested
from .v2_session import SignalRequested as SignalRequested
from .v2_session import Started as Started
from .v2_session import StdinCredit as StdinCredit
from .v2_session import StdinData as StdinData
from .v2_session import StreamError as StreamError

__all__ = [
    "DEFAULT_MAX_FRAME",
    "DEFAULT_WINDOW",
    "DOWNLOAD_OPS",
    "FLAG_END",
    "HEADER",
    "HELLO_PREFIX",
    "MAX_CONTROL",
    "MAX_CREDIT",
    "MAX_HELLO_ANSWER",
    "MAX_PING",
    "UPLOAD_OPS",
    "VERSIONS",
    "AgentEvent",
    "AgentLimits",
    "AgentSession",
    "Channel",
    "CloseRequested",
    "CommitRequested",
    "ExecRequested",
    "Exited",
    "FileRequested",
    "FileResult",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "HelloAnswer",
    "HelloRequest",
    "HostEvent",
    "HostSession",
    "Output",
    "OutputCredit",
    "Pong",
    "RequestFailed",
    "ResizeRequested",
    "SignalRequested",
    "Started",
    "StdinCredit",
    "StdinData",
    "StreamError",
    "encode_frame",
    "encode_json",
    "encode_window",
    "frame_parts",
    "hello_answer",
    "hello_answer_problem",
    "hello_command",
    "new_nonce",
    "parse_hello_answer",
    "parse_hello_command",
    "write_pieces",
]

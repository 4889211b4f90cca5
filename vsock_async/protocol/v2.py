"""The v2 wire protocol, sans I/O: the one place to import it from.

v2 is negotiated inside v1 on every new connection (:mod:`.hello`), then
carries many process streams on one connection with per-stream credit flow
control. docs/protocol.md ("Wire protocol v2") specifies it byte for byte.
"""

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

__all__ = [
    "DEFAULT_MAX_FRAME",
    "FLAG_END",
    "HEADER",
    "MAX_CONTROL",
    "MAX_CREDIT",
    "Channel",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "encode_frame",
    "encode_json",
    "encode_window",
    "frame_parts",
]

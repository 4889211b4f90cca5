"""Where ``serve``'s control API lives by default, and how its token is read.

Shared by the daemon and the client, and cheap to import: the CLI needs it
to build its help even in a guest, where only ``agent`` runs.
"""

from __future__ import annotations

import os
from typing import Final

from ..errors import UsageError

__all__ = [
    "CONTROL_ENV",
    "RAW_RESULT_TYPE",
    "TOKEN_FILE_ENV",
    "default_control_address",
    "default_control_path",
    "read_token_file",
]

CONTROL_ENV: Final = "VSOCK_ASYNC_CONTROL"
TOKEN_FILE_ENV: Final = "VSOCK_ASYNC_TOKEN_FILE"
RAW_RESULT_TYPE: Final = "application/vnd.vsock-async.result"
"""The media type of ``run``'s raw answer: the v1 result frame, byte for byte."""


def default_control_path() -> str:
    """Where ``serve`` puts its control socket unless told otherwise."""
    if os.geteuid() == 0:
        return "/run/vsock-async/control.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "vsock-async", "control.sock")
    return f"/tmp/vsock-async-{os.getuid()}/control.sock"


def default_control_address() -> str:
    """``$VSOCK_ASYNC_CONTROL``, else ``unix:`` + :func:`default_control_path`."""
    return os.environ.get(CONTROL_ENV) or f"unix:{default_control_path()}"


def read_token_file(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace removed); UsageError if unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"cannot read the token file {path}: {reason}") from None
    if not token or any(c.isspace() for c in token) or not token.isprintable():
        raise UsageError(
            f"the token file {path} must hold one token: printable, no spaces, not empty"
        )
    return token

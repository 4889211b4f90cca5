"""Turning what a caller passes to ``run()`` into the one shell command line v1 can carry.

v1 sends a single command line that the guest runs with ``/bin/sh -c``; it
has no fields for arguments, a working directory or environment. So:

- ``str`` is sent as UTF-8 (surrogateescape, so ``os.fsdecode`` round-trips),
- ``bytes`` as they are,
- a list of arguments is quoted with :func:`shlex.join`, so each arrives as one word,
- ``cwd`` becomes ``cd -- DIR || exit 1`` on a line of its own before the command,
- ``env`` becomes ``export NAME=VALUE`` lines before it (quoted, names checked).

The shell on the guest sees exactly that script; a failing ``cd`` exits 1
with the shell's own message on stderr before the command runs.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence

from ..errors import UsageError

__all__ = ["CommandLike", "compose_command", "shown_command"]

CommandLike = str | bytes | Sequence[str]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _encode(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise UsageError(
            f"{text[exc.start : exc.end]!r} at position {exc.start} cannot be sent as UTF-8"
            " (a lone surrogate that surrogateescape does not cover); pass bytes instead"
        ) from None


def compose_command(
    command: CommandLike,
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> bytes:
    """The bytes of the command line to send for ``command`` run in ``cwd`` with ``env``."""
    if isinstance(command, bytes):
        line = command
    elif isinstance(command, str):
        line = _encode(command)
    elif isinstance(command, list | tuple) and command and all(isinstance(a, str) for a in command):
        line = _encode(shlex.join(command))
    else:
        raise UsageError(
            f"a command must be str, bytes or a non-empty list of str, not {command!r}"
        )
    if cwd is None and not env:
        return line
    prelude: list[str] = []
    if cwd is not None:
        if not isinstance(cwd, str) or not cwd:
            raise UsageError(f"cwd must be a non-empty string, not {cwd!r}")
        prelude.append(f"cd -- {shlex.quote(cwd)} || exit 1")
    for name, value in (env or {}).items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise UsageError(f"environment variable name {name!r} is not a valid shell name")
        if not isinstance(value, str):
            raise UsageError(f"environment variable {name} must be a str, not {value!r}")
        prelude.append(f"export {name}={shlex.quote(value)}")
    return _encode("\n".join(prelude)) + b"\n" + line


def shown_command(line: bytes) -> str:
    """A command line as messages for people show it: text (undecodable bytes replaced), cut
    at 60 characters, quoted."""
    text = line.decode(errors="replace")
    return repr(text if len(text) <= 60 else text[:57] + "...")

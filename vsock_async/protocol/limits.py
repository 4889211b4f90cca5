"""Size limits shared by every protocol version: what a peer may make us hold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..errors import UsageError

__all__ = ["U32_MAX", "Limits", "MiB"]

MiB: Final = 1024 * 1024
U32_MAX: Final = 0xFFFF_FFFF
"""The largest length a u32 prefix can carry."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Largest bodies a decoder accepts. A security limit: a guest is untrusted input."""

    max_command: int = 1 * MiB
    max_stdout: int = 64 * MiB
    max_stderr: int = 64 * MiB

    def __post_init__(self) -> None:
        for name in ("max_command", "max_stdout", "max_stderr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U32_MAX:
                raise UsageError(f"Limits.{name} must be an int in 0..{U32_MAX}, not {value!r}")

    def check_command(self, command: bytes) -> None:
        """Raise :class:`UsageError` if ``command`` is longer than :attr:`max_command`."""
        if len(command) > self.max_command:
            raise UsageError(
                f"a command of {len(command)} bytes is longer than Limits.max_command"
                f" ({self.max_command} bytes), so the guest would refuse it;"
                " send a shorter one, or raise max_command on both sides"
            )

"""The outcome of one exchange, shaped like ``subprocess.CompletedProcess``."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CommandResult"]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a guest sent back for one command.

    ``exit_code`` is 0-255 for a finished exchange; ``None`` (with
    ``timed_out=True``) when the deadline fired first, in which case
    ``stdout`` and ``stderr`` hold only what had arrived by then.
    """

    stdout: bytes
    stderr: bytes
    exit_code: int | None
    timed_out: bool = False

    @property
    def returncode(self) -> int | None:
        """Alias of ``exit_code``, as on ``subprocess.CompletedProcess``."""
        return self.exit_code

    @property
    def ok(self) -> bool:
        """True when the command finished with exit code 0."""
        return self.exit_code == 0

"""The outcome of one exchange, shaped like ``subprocess.CompletedProcess``."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CommandResult"]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a guest sent back for one command.

    ``exit_code`` is 0-255 for a finished exchange: a command killed by
    signal N reports 128+N, as a shell does. It is ``None`` (with
    ``timed_out=True``) when the deadline fired first, and then ``stdout``
    and ``stderr`` hold only what had arrived by then.

    ``exit_signal`` is the signal that killed the command when the guest
    says so; protocol v1 cannot (an exit code of 130 may be SIGINT or
    ``exit 130``), so on v1 it is always None. ``stdout_truncated`` and
    ``stderr_truncated`` say the agent cut that stream at its
    ``--max-output``; on v1 they are read from the notes the agent appends to
    stderr, trusted only as its last lines and only when the length they name
    matches.
    """

    stdout: bytes
    stderr: bytes
    exit_code: int | None
    timed_out: bool = False
    exit_signal: int | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def returncode(self) -> int | None:
        """Alias of ``exit_code``, as on ``subprocess.CompletedProcess``; unlike there, a
        signal shows as 128+N, never as a negative number (see ``exit_signal``)."""
        return self.exit_code

    @property
    def ok(self) -> bool:
        """True when the command finished with exit code 0."""
        return self.exit_code == 0

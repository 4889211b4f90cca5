"""The outcome of one exchange, shaped like ``subprocess.CompletedProcess``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["CommandResult", "new_result"]


@dataclass(frozen=True, slots=True, init=False)
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

    def __init__(
        self,
        stdout: bytes,
        stderr: bytes,
        exit_code: int | None,
        timed_out: bool = False,
        exit_signal: int | None = None,
        stdout_truncated: bool = False,
        stderr_truncated: bool = False,
    ) -> None:
        # What the dataclass would write, but it would set each field through
        # object.__setattr__ (it is frozen); one result is made per exchange, and filling
        # the slots directly costs 40% less.
        _set_stdout(self, stdout)
        _set_stderr(self, stderr)
        _set_exit_code(self, exit_code)
        _set_timed_out(self, timed_out)
        _set_exit_signal(self, exit_signal)
        _set_stdout_truncated(self, stdout_truncated)
        _set_stderr_truncated(self, stderr_truncated)

    @property
    def returncode(self) -> int | None:
        """Alias of ``exit_code``, as on ``subprocess.CompletedProcess``; unlike there, a
        signal shows as 128+N, never as a negative number (see ``exit_signal``)."""
        return self.exit_code

    @property
    def ok(self) -> bool:
        """True when the command finished with exit code 0."""
        return self.exit_code == 0


(
    _set_stdout,
    _set_stderr,
    _set_exit_code,
    _set_timed_out,
    _set_exit_signal,
    _set_stdout_truncated,
    _set_stderr_truncated,
) = (CommandResult.__dict__[f.name].__set__ for f in fields(CommandResult))


class _Unfrozen:
    """:class:`CommandResult`'s slots without its frozen ``__setattr__``: :func:`new_result`
    fills one with plain attribute stores and then makes it a ``CommandResult`` (the two
    layouts are the same, which is what lets Python switch an object's class)."""

    __slots__ = CommandResult.__slots__


def new_result(stdout: bytes, stderr: bytes, exit_code: int | None) -> CommandResult:
    """``CommandResult(stdout, stderr, exit_code)``, built for a third of the cost: the v1
    decoders make one per exchange. The result is a ``CommandResult`` like any other
    (frozen, equal, hashed, printed and pickled the same)."""
    result: Any = object.__new__(_Unfrozen)
    result.stdout = stdout
    result.stderr = stderr
    result.exit_code = exit_code
    result.timed_out = False
    result.exit_signal = None
    result.stdout_truncated = False
    result.stderr_truncated = False
    result.__class__ = CommandResult
    return result  # type: ignore[no-any-return]

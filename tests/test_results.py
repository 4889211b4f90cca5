"""CommandResult, and new_result(): the decoders' cheaper way to make the same object."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from vsock_async import CommandResult
from vsock_async.results import new_result


@pytest.mark.parametrize("fields", [(b"out\n", b"", 0), (b"", b"err", 7), (b"", b"", None)])
def test_new_result_is_what_the_constructor_makes(
    fields: tuple[bytes, bytes, int | None],
) -> None:
    made = CommandResult(*fields)
    fast = new_result(*fields)
    assert type(fast) is CommandResult
    assert fast == made and hash(fast) == hash(made) and repr(fast) == repr(made)
    assert dataclasses.astuple(fast) == (*fields, False, None, False, False)
    assert dataclasses.replace(fast, exit_code=3) == CommandResult(fields[0], fields[1], 3)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(fast, protocol)) == made
    assert copy.copy(fast) == copy.deepcopy(fast) == made
    assert fast != CommandResult(fields[0], fields[1], 255)


def test_a_result_made_either_way_is_frozen() -> None:
    for result in (CommandResult(b"o", b"e", 0), new_result(b"o", b"e", 0)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.stdout = b"changed"  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            del result.exit_code
        with pytest.raises(TypeError):  # nor turned back into its unfrozen twin
            result.__class__ = type("Twin", (), {"__slots__": CommandResult.__slots__})
        assert result.stdout == b"o" and result.ok and result.returncode == 0

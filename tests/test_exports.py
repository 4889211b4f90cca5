"""The public API: every name users import from ``vsock_async`` stays importable, ``__all__`` is
exact, and each subpackage re-exports only what it defines."""

from __future__ import annotations

import importlib
import importlib.resources
import pkgutil

import pytest

import vsock_async

# The names of the first release: removing one breaks a user's import.
RELEASED = {
    "DEFAULT_ADDRESS",
    "AcceptTimeout",
    "Address",
    "CommandFailed",
    "CommandResult",
    "CommandServer",
    "CommandTimeout",
    "ConnectFailed",
    "ConnectTimeout",
    "ConnectionClosed",
    "DeadlineExceeded",
    "FrameTooLarge",
    "Guest",
    "GuestAgent",
    "GuestBusy",
    "GuestChannel",
    "GuestEvent",
    "HybridVsockAddress",
    "InvalidAddress",
    "Limits",
    "ListenFailed",
    "PeerError",
    "ProbeFailed",
    "ProtocolError",
    "TcpAddress",
    "UnixAddress",
    "UnixSocketOptions",
    "UnknownGuest",
    "UsageError",
    "VsockAddress",
    "VsockAsyncError",
    "compose_command",
    "connect",
    "listen",
    "parse_address",
}

SUBPACKAGES = ["vsock_async.protocol", "vsock_async.host", "vsock_async.agent"]


def test_released_names_are_still_exported() -> None:
    missing = RELEASED - set(vsock_async.__all__)
    assert not missing, f"removed from the public API: {sorted(missing)}"
    for name in RELEASED:
        assert getattr(vsock_async, name) is not None


def test_all_is_exact_and_sorted_names_exist() -> None:
    public = {n for n in vars(vsock_async) if not n.startswith("_")}
    submodules = {m.name for m in pkgutil.iter_modules(vsock_async.__path__)}
    # Submodules become attributes once imported; they are not re-exports.
    assert set(vsock_async.__all__) == public - submodules
    assert len(vsock_async.__all__) == len(set(vsock_async.__all__))


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackage_all_names_exist(name: str) -> None:
    package = importlib.import_module(name)
    for exported in package.__all__:
        assert hasattr(package, exported), f"{name}.__all__ names {exported}, which is missing"


def test_every_error_is_in_the_one_tree() -> None:
    from vsock_async import errors

    for exported in errors.__all__:
        cls = getattr(errors, exported)
        assert issubclass(cls, vsock_async.VsockAsyncError)
        assert exported in vsock_async.__all__, f"{exported} is not re-exported"


def test_timeouts_subclass_timeout_error_and_usage_errors_value_error() -> None:
    for exc in (vsock_async.AcceptTimeout, vsock_async.ConnectTimeout, vsock_async.CommandTimeout):
        assert issubclass(exc, TimeoutError)
    assert issubclass(vsock_async.UsageError, ValueError)
    assert issubclass(vsock_async.ConnectionLost, vsock_async.PeerError)
    assert not issubclass(vsock_async.ClosedLocally, vsock_async.PeerError)


def test_the_package_is_typed() -> None:
    assert importlib.resources.files("vsock_async").joinpath("py.typed").is_file()

"""The public API: every name users import from ``vsock_async`` stays importable, ``__all__`` is
exact, and each subpackage re-exports only what it defines."""

from __future__ import annotations

import ast
import importlib
import importlib.resources
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

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


def typing_view() -> dict[str, tuple[str, str]]:
    """What mypy and IDEs see: each name the package's ``TYPE_CHECKING`` block imports, and
    from where (absolute module, name there)."""
    tree = ast.parse(Path(vsock_async.__file__).read_text())
    [block] = [node for node in tree.body if isinstance(node, ast.If)]
    seen = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom)
        home = importlib.util.resolve_name("." * node.level + (node.module or ""), "vsock_async")
        for alias in node.names:
            seen[alias.asname or alias.name] = (home, alias.name)
    return seen


def test_all_is_exact_and_each_name_is_its_home_modules_object() -> None:
    assert len(vsock_async.__all__) == len(set(vsock_async.__all__))
    seen = typing_view()
    assert set(vsock_async.__all__) == set(seen)
    for name, (home, original) in seen.items():
        expected = getattr(importlib.import_module(home), original)
        assert getattr(vsock_async, name) is expected, name
    public = {n for n in vars(vsock_async) if not n.startswith("_")}
    submodules = {m.name for m in pkgutil.iter_modules(vsock_async.__path__)}
    # Submodules become attributes once imported; they are not re-exports.
    assert public - submodules <= set(vsock_async.__all__)
    assert set(vsock_async.__all__) <= set(dir(vsock_async))
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        vsock_async.no_such_name  # noqa: B018


def test_every_name_imports_in_a_fresh_interpreter_and_only_its_home_loads() -> None:
    """The names are imported on first use: ``import vsock_async`` loads none of the host side,
    and each ``from vsock_async import NAME`` works from nothing."""
    check = (
        "import sys, vsock_async\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('vsock_async.', 'aiohttp')))\n"
        "print(' '.join(loaded))\n"
        "for name in vsock_async.__all__:\n"
        "    exec(f'from vsock_async import {name}')\n"
        "from vsock_async import *\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert done.stdout.split() == []


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

"""Sizes for the adversarial suite: small by default, full with ``--soak``.

The normal run stays fast; the full sizes of the issue (1,000 guests x 100
commands, many more fuzz examples) run with::

    .venv/bin/pytest tests/adversarial --soak
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from vsock_async import CommandServer, listen


@dataclass(frozen=True)
class Scale:
    """How hard each attack pushes: counts of guests, commands, examples, bytes."""

    guests: int
    commands: int
    fuzz_examples: int
    slow_bystander_exchanges: int
    agent_commands: int


SMALL = Scale(
    guests=50, commands=20, fuzz_examples=300, slow_bystander_exchanges=20, agent_commands=100
)
SOAK = Scale(
    guests=1000,
    commands=100,
    fuzz_examples=20_000,
    slow_bystander_exchanges=500,
    agent_commands=1000,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the adversarial suite at full size (slow: minutes, not seconds)",
    )


def soak_enabled(config: pytest.Config) -> bool:
    """True under ``--soak``; False when the option is unknown (pytest run from elsewhere)."""
    return bool(config.getoption("--soak", default=False))


@pytest.fixture(scope="session")
def scale(request: pytest.FixtureRequest) -> Scale:
    """The sizes for this run."""
    return SOAK if soak_enabled(request.config) else SMALL


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """A short directory for Unix sockets (paths must fit in 108 bytes)."""
    path = tempfile.mkdtemp(prefix="vsa-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture(params=["unix", "tcp"])
async def server(request: pytest.FixtureRequest, socket_dir: str) -> AsyncIterator[CommandServer]:
    """A server listening on a Unix socket or on TCP loopback, with short default deadlines."""
    address = f"unix:{socket_dir}/guest.sock" if request.param == "unix" else "tcp://127.0.0.1:0"
    async with await listen(address, default_timeout=5, protocol="v1") as srv:
        yield srv


@pytest_asyncio.fixture
async def unix_server(socket_dir: str) -> AsyncIterator[CommandServer]:
    """A server on a Unix socket only."""
    async with await listen(
        f"unix:{socket_dir}/guest.sock", default_timeout=5, protocol="v1"
    ) as srv:
        yield srv

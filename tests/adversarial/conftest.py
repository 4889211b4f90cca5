"""Sizes for the adversarial suite: small by default, full with ``--soak``.

The normal run stays fast; the full sizes of the issue (1,000 guests x 100
commands, many more fuzz examples) run with::

    .venv/bin/pytest tests/adversarial --soak
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest


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

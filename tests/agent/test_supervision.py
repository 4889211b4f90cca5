"""A connection worker of the agent that fails is never silent: it is logged and restarted,
and one that keeps failing stops the agent (``run()`` raises, the CLI exits 1).

The failure is injected where the agent dials: ``connect_socket`` raising an
exception the agent does not expect (a bug, or an environment it cannot handle).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

import vsock_async
import vsock_async.agent.agent as agent_module
from tests.agent_process import LONG, agent_task, short_socket_path
from vsock_async._sockets import connect_socket
from vsock_async.agent import GuestAgent

RESTARTING = "a connection worker failed; restarting it"
STOPPING = "a connection worker keeps failing; the agent stops"


async def _fail(address: object) -> NoReturn:
    raise RuntimeError("injected failure")


@pytest.mark.asyncio
async def test_a_failed_worker_is_logged_with_its_traceback_and_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = short_socket_path(tmp_path, "restart.sock")
    calls = 0

    async def fail_once(address: vsock_async.Address) -> socket.socket:
        nonlocal calls
        calls += 1
        if calls == 1:
            await _fail(address)
        return await connect_socket(address)

    monkeypatch.setattr(agent_module, "connect_socket", fail_once)
    caplog.set_level(logging.INFO, logger="vsock_async.agent")
    agent = GuestAgent(f"unix:{path}", reconnect_delay=0.01)
    async with vsock_async.listen(f"unix:{path}") as server, agent_task(agent):
        guest = await server.accept(timeout=LONG)
        assert (await guest.run("echo back", timeout=LONG)).stdout == b"back\n"
    failed = [r for r in caplog.records if r.getMessage() == RESTARTING]
    assert len(failed) == 1
    assert failed[0].levelno == logging.ERROR
    assert failed[0].exc_info is not None
    assert str(failed[0].exc_info[1]) == "injected failure"
    assert calls == 2


@pytest.mark.asyncio
async def test_a_worker_that_keeps_failing_makes_run_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(agent_module, "connect_socket", _fail)
    caplog.set_level(logging.INFO, logger="vsock_async.agent")
    path = short_socket_path(tmp_path, "never.sock")
    agent = GuestAgent(
        f"unix:{path}", connections=2, reconnect_delay=0.001, max_reconnect_delay=0.01
    )
    with pytest.raises(ExceptionGroup) as raised:
        await asyncio.wait_for(agent.run(), LONG)
    (failure,) = raised.value.exceptions
    assert isinstance(failure, RuntimeError)
    assert str(failure) == "injected failure"
    assert "failed 5 times within 60 s" in raised.value.message
    stopping = [r.levelno for r in caplog.records if r.getMessage() == STOPPING]
    assert stopping[0] == logging.ERROR  # both workers may reach the limit in one iteration
    assert len([r for r in caplog.records if r.getMessage() == RESTARTING]) >= 4
    assert caplog.records[-1].getMessage() == "agent stopped"
    assert agent.connections_open == 0


INJECTED_CLI = """
import sys
import vsock_async.agent.agent as agent

async def fail(address):
    raise RuntimeError("injected failure")

agent.connect_socket = fail
from vsock_async.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_the_cli_exits_1_with_a_clear_message_when_a_worker_keeps_failing(
    tmp_path: Path,
) -> None:
    path = short_socket_path(tmp_path, "cli.sock")
    done = subprocess.run(
        [sys.executable, "-c", INJECTED_CLI, "agent", "--connect", f"unix:{path}"],
        capture_output=True,
        text=True,
        timeout=LONG,
    )
    assert done.returncode == 1, done.stderr
    assert RESTARTING in done.stderr
    assert "Traceback" in done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("vsock-async agent: a connection worker failed 5 times within 60 s")
    assert last.endswith("RuntimeError: injected failure (tracebacks in the log above)")

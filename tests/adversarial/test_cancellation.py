"""Cancelling a call is never swallowed, whenever it lands relative to the guest's answer.

A guest that answers at just the wrong moment must not make ``task.cancel()``
a no-op: task groups, timeouts and shutdown code depend on a cancelled task
ending cancelled. The cancel is scheduled a varying number of loop
iterations after the answer is sent, so that one of them lands between the
result arriving and the caller resuming.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

import pytest

from vsock_async import ClosedLocally, CommandServer
from vsock_async.protocol import encode_command, encode_result

from .hostile import accept_guest, answer_for, dial_address


def after_iterations(hops: int, callback: Callable[[], None]) -> None:
    """Run ``callback`` ``hops`` event-loop iterations from now."""
    loop = asyncio.get_running_loop()
    if hops == 0:
        callback()
    else:
        loop.call_soon(after_iterations, hops - 1, callback)


def cancel_into(task: asyncio.Task[object], accepted: list[bool]) -> None:
    accepted.append(task.cancel())


@pytest.mark.asyncio
@pytest.mark.parametrize("timeout", [5.0, None])
async def test_cancel_landing_as_the_result_arrives_is_honoured(
    unix_server: CommandServer, timeout: float | None
) -> None:
    """Found: with a deadline, a cancel landing as the result arrived was swallowed (3.11)."""
    address = dial_address(unix_server)
    for hops in range(10):
        guest, channel = await accept_guest(unix_server, address)
        command = f"cancel after {hops}".encode()
        task = asyncio.create_task(channel.run(command, timeout=timeout))
        assert await guest.read_command() == command
        await guest.answer(*answer_for(command))
        accepted: list[bool] = []
        after_iterations(hops, functools.partial(cancel_into, task, accepted))
        try:
            result = await task
        except asyncio.CancelledError:
            assert accepted == [True]
        else:
            assert accepted in ([], [False]), f"cancel swallowed {hops} iterations after the answer"
            assert (result.stdout, result.stderr, result.exit_code) == answer_for(command)
        guest.close()
        await channel.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("timeout", [5.0, None])
async def test_cancel_landing_as_a_waiting_call_gets_its_connection_is_honoured(
    unix_server: CommandServer, timeout: float | None
) -> None:
    """A call queued for a busy guest, cancelled as the connection is handed to it, ends
    cancelled (found: on 3.11 the hand-over won and the command was sent anyway)."""
    address = dial_address(unix_server)
    for hops in range(10):
        guest, channel = await accept_guest(unix_server, address)
        handle = unix_server.guest(channel.key)
        first = asyncio.create_task(handle.run("first", timeout=5))
        assert await guest.read_command() == b"first"
        waiting = asyncio.create_task(handle.run("second", timeout=timeout))
        while handle.waiting == 0:  # noqa: ASYNC110 (a few loop iterations, no event to wait on)
            await asyncio.sleep(0)
        await guest.answer(*answer_for(b"first"))
        accepted: list[bool] = []
        after_iterations(hops, functools.partial(cancel_into, waiting, accepted))
        await first
        done, _ = await asyncio.wait({waiting}, timeout=2)  # bounds a failure only
        if accepted == [True]:
            assert waiting in done and waiting.cancelled(), (
                f"cancel swallowed {hops} iterations after the hand-over"
            )
        else:
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        guest.close()
        await channel.wait_closed()


@pytest.mark.asyncio
@pytest.mark.parametrize("hops", range(4))
async def test_queued_call_cancelled_as_the_answer_before_it_arrives_is_never_sent(
    unix_server: CommandServer, hops: int
) -> None:
    """The answer to the call in flight releases the next queued command. A queued call
    cancelled in the same loop iteration, before its task has run, must be skipped: its
    caller gave up, and its command must never reach the guest."""
    guest, channel = await accept_guest(unix_server, dial_address(unix_server))
    first = asyncio.create_task(channel.run("first", timeout=5))
    assert await guest.read_command() == b"first"
    second = asyncio.create_task(channel.run("rm -rf /important", timeout=5))
    third = asyncio.create_task(channel.run("third", timeout=5))
    while channel.queued < 2:  # noqa: ASYNC110 (a loop iteration or two, no event to wait on)
        await asyncio.sleep(0)
    guest.sock.send(encode_result(*answer_for(b"first")))  # in the host's socket buffer now
    sent_before_cancel: list[bool] = []

    def cancel() -> None:
        sent_before_cancel.append(channel.bytes_sent > len(encode_command(b"first")))
        second.cancel()

    after_iterations(hops, cancel)
    await first
    await asyncio.gather(second, return_exceptions=True)
    if sent_before_cancel == [False]:
        assert second.cancelled()
        assert await guest.read_command() == b"third"
        await guest.answer(*answer_for(b"third"))
        assert (await third).stdout == answer_for(b"third")[0]
        assert not channel.closed
    else:  # sent already: cancelling it on the wire closes the channel
        assert await guest.read_command() == b"rm -rf /important"
        with pytest.raises(ClosedLocally):
            await third
    guest.close()
    await channel.aclose()

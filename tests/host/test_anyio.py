"""Under anyio (asyncio backend): fail_after / move_on_after around run() cancel cleanly."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import vsock_async
from tests.guests import ScriptedGuest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_fail_after_cancels_and_closes_the_channel(tmp_path: Path) -> None:
    path = str(tmp_path / "a.sock")
    async with vsock_async.listen(f"unix:{path}") as server:
        guest = ScriptedGuest()
        await guest.connect(path)
        channel = await server.accept(timeout=2)
        assert (await channel.run("exit 3")).exit_code == 3
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.05):
                await channel.run("hang", timeout=None)
        assert channel.closed
        with pytest.raises(vsock_async.ConnectionClosed, match="cancelled"):
            await channel.run("exit 0")
        await guest.close()


@pytest.mark.anyio
async def test_move_on_after_then_a_new_connection_works(tmp_path: Path) -> None:
    path = str(tmp_path / "b.sock")
    async with vsock_async.listen(f"unix:{path}") as server:
        first = ScriptedGuest()
        await first.connect(path)
        channel = await server.accept(timeout=2)
        with anyio.move_on_after(0.05) as scope:
            await channel.run("hang")
        assert scope.cancelled_caught
        assert channel.closed
        second = ScriptedGuest()
        await second.connect(path)
        fresh = await server.accept(timeout=2)
        assert fresh.id != channel.id
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(fresh.run, f"task {i}")
        assert sorted(second.commands) == [b"task 0", b"task 1", b"task 2"]
        await first.close()
        await second.close()

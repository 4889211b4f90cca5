"""The host's process API and run() over protocol v2, against the real agent over a Unix socket.

Each test starts ``python -m vsock_async agent`` dialing a ``listen()`` server on
the default ``protocol="auto"``, so the connection is v2. What the guest did is
checked in /proc (the agent runs on this machine): nothing may be left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest
import pytest_asyncio

import vsock_async
from tests.agent_process import (
    STARTS_WITHIN,
    Served,
    agent_process,
    alive,
    children_of,
    eventually,
    queued,
    served_agent,
    short_socket_path,
)
from tests.fc_muxer import DialingGuest, GuestScript
from vsock_async import (
    PIPE,
    STDOUT,
    CommandTimeout,
    ConnectionClosed,
    GuestChannel,
    Limits,
    Process,
    SpawnFailed,
    StdinClosed,
    Unsupported,
    UsageError,
)
from vsock_async.protocol import Command, CommandDecoder, encode_result
from vsock_async.protocol.v2 import (
    HEADER,
    AgentLimits,
    AgentSession,
    Channel,
    ExecRequested,
    hello_answer,
    parse_hello_command,
)

HANG_GUARD = 20.0  # seconds: only a hang ever gets near it


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with served_agent(tmp_path, "p.sock", "--output-grace", "0.2") as served:
        yield served


@pytest.fixture
def channel(served: Served) -> GuestChannel:
    return served.guest


async def nothing_left(served: Served) -> None:
    """Every process the agent started has gone (the agent reaps its children)."""
    await eventually(lambda: not children_of(served.agent.pid), "the agent's children are gone")


def test_the_process_api_is_exported() -> None:
    assert vsock_async.PIPE == -1 and vsock_async.STDOUT == -2 and vsock_async.DEVNULL == -3
    assert vsock_async.Process is Process


@pytest.mark.asyncio
async def test_a_v2_agent_negotiates_v2_and_says_what_it_can(channel: GuestChannel) -> None:
    assert channel.protocol == "v2"
    assert channel.agent is not None
    assert {"exec", "signal", "pty", "resize"} <= channel.agent.capabilities
    assert channel.concurrency == channel.agent.limits.max_streams == 64
    await channel.probe(timeout=5)  # a PING on v2
    assert channel.last_probe is not None


@pytest.mark.asyncio
async def test_output_streams_before_the_process_ends(channel: GuestChannel) -> None:
    proc = await channel.create_process(
        ["sh", "-c", "echo first; read line; echo got $line"], stdin=PIPE
    )
    assert proc.pid is not None and proc.stdout is not None and proc.stdin is not None
    assert await proc.stdout.readline() == b"first\n"
    assert proc.returncode is None  # it waits for its input: the line came first
    proc.stdin.write(b"it\n")
    await proc.stdin.drain()
    assert await proc.stdout.readline() == b"got it\n"
    assert await proc.wait() == 0
    quiet = await channel.create_process(["cat"])  # stdin is /dev/null by default
    assert quiet.stdin is None
    assert await quiet.communicate() == (b"", b"")


@pytest.mark.asyncio
async def test_communicate_pipes_input_through_gzip(channel: GuestChannel) -> None:
    data = os.urandom(300_000) * 3  # more than one credit window each way
    proc = await channel.create_process(["gzip", "-c"], stdin=PIPE)
    compressed, err = await proc.communicate(data)
    assert err == b"" and proc.returncode == 0
    back = await channel.create_process(["gzip", "-dc"], stdin=PIPE)
    out, _ = await back.communicate(compressed)
    assert out == data


@pytest.mark.asyncio
async def test_stderr_modes(channel: GuestChannel) -> None:
    script = "echo out; echo err >&2"
    piped = await channel.create_process(script, stderr=PIPE)
    assert await piped.communicate() == (b"out\n", b"err\n")
    merged = await channel.create_process("echo a; echo b >&2; echo c; exit 7", stderr=STDOUT)
    assert merged.stderr is None
    assert await merged.communicate() == (b"a\nb\nc\n", None)  # one pipe: the order written
    assert merged.returncode == 7
    dropped = await channel.create_process(script, stderr=vsock_async.DEVNULL)
    assert await dropped.communicate() == (b"out\n", None)


@pytest.mark.asyncio
async def test_readers_read_like_asyncio_streams(channel: GuestChannel) -> None:
    proc = await channel.create_process("printf 'ab\\ncd\\nrest-of-it'")
    assert proc.stdout is not None
    assert await proc.stdout.readexactly(1) == b"a"
    assert await proc.stdout.readuntil(b"\n") == b"b\n"
    assert [line async for line in proc.stdout] == [b"cd\n", b"rest-of-it"]
    assert proc.stdout.at_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await proc.stdout.readexactly(1)
    await proc.wait()
    into = await channel.create_process("printf 12345")
    assert into.stdout is not None
    buffer = bytearray(3)
    assert await into.stdout.readinto(buffer) == 3 and buffer == b"123"
    assert await into.stdout.read() == b"45"


@pytest.mark.asyncio
async def test_signals_reach_the_process_and_show_in_exit_signal(channel: GuestChannel) -> None:
    trapping = await channel.create_process(
        "trap 'echo got INT; exit 7' INT; echo ready; while :; do sleep 0.01; done"
    )
    assert trapping.stdout is not None
    assert await trapping.stdout.readline() == b"ready\n"
    trapping.send_signal(signal.SIGINT)
    assert await trapping.stdout.readline() == b"got INT\n"
    assert await trapping.wait() == 7 and trapping.exit_signal is None
    sleeper = await channel.create_process(["sleep", "100"])
    sleeper.terminate()
    assert await sleeper.wait() == -signal.SIGTERM
    assert sleeper.exit_signal == signal.SIGTERM
    sleeper.kill()  # it has ended: nothing happens, as with subprocess
    with pytest.raises(UsageError, match="signal"):
        sleeper.send_signal(0)


@pytest.mark.asyncio
async def test_a_terminal_answers_tty_and_sees_its_size_change(channel: GuestChannel) -> None:
    tty = await channel.create_process(["tty"], pty=(24, 80))
    out, err = await tty.communicate()
    assert err is None and out is not None and out.startswith(b"/dev/pts/")
    assert tty.stderr is None
    sized = await channel.create_process(
        ["sh", "-c", "stty size; read x; stty size"], pty=(24, 80), stdin=PIPE
    )
    assert sized.stdout is not None and sized.stdin is not None
    assert await sized.stdout.readuntil(b"24 80\r\n")
    await sized.resize(30, 100)
    sized.stdin.write(b"\n")
    assert (await sized.stdout.readuntil(b"30 100\r\n")).endswith(b"30 100\r\n")
    assert await sized.wait() == 0
    plain = await channel.create_process(["true"])
    with pytest.raises(UsageError, match="pty"):
        await plain.resize(1, 1)
    with pytest.raises(UsageError, match="stderr"):
        await channel.create_process(["true"], pty=(24, 80), stderr=PIPE)


@pytest.mark.asyncio
async def test_env_cwd_and_user(channel: GuestChannel, tmp_path: Path) -> None:
    proc = await channel.create_process(
        ["sh", "-c", 'printf "%s|" "$K" "$EMPTY" "$(pwd)"'],
        env={"K": "v a l", "EMPTY": "", b"RAW": b"\xff"},
        cwd=tmp_path,
    )
    out, _ = await proc.communicate()
    assert out == f"v a l||{tmp_path}|".encode()
    if os.geteuid() == 0:
        nobody = await channel.create_process(["id", "-u"], user="nobody")
        out, _ = await nobody.communicate()
        assert out is not None and int(out) != 0
    else:
        with pytest.raises(Unsupported, match="user"):
            await channel.create_process(["id", "-u"], user="nobody")


@pytest.mark.asyncio
async def test_a_program_that_cannot_start_is_spawn_failed(channel: GuestChannel) -> None:
    with pytest.raises(SpawnFailed) as info:
        await channel.create_process(["/nonexistent/program"])
    assert info.value.errno == 2 and isinstance(info.value, OSError)
    with pytest.raises(SpawnFailed):
        await channel.create_process(["true"], cwd="/nonexistent/dir")
    assert (await channel.run("echo still here")).stdout == b"still here\n"


@pytest.mark.asyncio
async def test_run_whose_shell_cannot_start_is_spawn_failed(tmp_path: Path) -> None:
    # run() waits for the exit alone, not for STARTED: the agent's refusal still reaches it.
    async with served_agent(tmp_path, "s.sock", "--shell", "/nonexistent/sh") as served:
        with pytest.raises(SpawnFailed) as info:
            await served.guest.run("true")
        assert info.value.errno == errno.ENOENT and info.value.code == "spawn_failed"
        assert served.guest.protocol == "v2" and not served.guest.closed


@pytest.mark.asyncio
async def test_bad_arguments_are_usage_errors_and_send_nothing(channel: GuestChannel) -> None:
    sent = channel.bytes_sent
    for kwargs in (
        {"stdin": STDOUT},
        {"stdout": STDOUT},
        {"stderr": 99},
        {"env": {"A=B": "c"}},
        {"pty": (0, 80)},
        {"limit": 0},
        {"timeout": -1},
        {"user": True},
    ):
        with pytest.raises(UsageError):
            await channel.create_process(["true"], **kwargs)
    for program in ([], "", ["a\0b"], 5):
        with pytest.raises(UsageError):
            await channel.create_process(program)  # type: ignore[arg-type]
    assert channel.bytes_sent == sent


@pytest.mark.asyncio
async def test_many_runs_on_one_connection_proceed_at_once(
    channel: GuestChannel, tmp_path: Path
) -> None:
    """Each command waits until all have started: only concurrent runs can all finish."""
    count = 20
    gate = tmp_path / "gate"
    gate.mkdir()
    script = (
        f"touch {gate}/$0; while [ $(ls {gate} | wc -l) -lt {count} ]; do sleep 0.01; done; echo $0"
    )
    results = await asyncio.gather(
        *(channel.run(["sh", "-c", script, str(i)], timeout=HANG_GUARD) for i in range(count))
    )
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(count)]
    assert all(r.exit_code == 0 for r in results)


@pytest.mark.asyncio
async def test_a_stalled_reader_does_not_block_another_stream(
    served: Served, channel: GuestChannel
) -> None:
    flood = await channel.create_process(["head", "-c", "5000000", "/dev/zero"], limit=65536)
    for _ in range(5):  # meanwhile, others run to the end on the same connection
        assert (await channel.run("echo hi", timeout=HANG_GUARD)).stdout == b"hi\n"
    assert flood.returncode is None  # blocked on its full pipe: nobody reads it
    assert flood.stdout is not None
    assert len(await flood.stdout.read()) == 5_000_000
    assert await flood.wait() == 0


@pytest.mark.asyncio
async def test_a_run_deadline_stops_only_its_process(served: Served, channel: GuestChannel) -> None:
    pid_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"vsa-run-{os.getpid()}"
    with pytest.raises(CommandTimeout) as info:
        await channel.run(f"echo partial; echo $$ > {pid_file}; exec sleep 100", timeout=0.3)
    assert info.value.sent and info.value.result.timed_out
    assert info.value.result.stdout == b"partial\n"
    assert isinstance(info.value, TimeoutError)
    assert not channel.closed
    pid = int(pid_file.read_text())
    pid_file.unlink()
    await eventually(lambda: not alive(pid), "the timed-out process was killed")
    assert (await channel.run("echo next")).stdout == b"next\n"
    await nothing_left(served)


@pytest.mark.asyncio
async def test_run_results_carry_signals_and_truncation(tmp_path: Path) -> None:
    limits = Limits(max_stdout=1000, max_stderr=10)
    async with served_agent(tmp_path, "t.sock", limits=limits) as served:
        channel = served.guest
        killed = await channel.run("kill -TERM $$")
        assert (killed.exit_code, killed.exit_signal) == (128 + signal.SIGTERM, signal.SIGTERM)
        big = await channel.run("head -c 5000 /dev/zero; echo 0123456789abc >&2")
        assert big.stdout == b"\0" * 1000 and big.stdout_truncated
        assert big.stderr == b"0123456789" and big.stderr_truncated
        assert big.exit_code == 0 and big.exit_signal is None
        ok = await channel.run("echo fits")
        assert not ok.stdout_truncated and not ok.stderr_truncated
        with pytest.raises(vsock_async.CommandFailed):
            await channel.run("exit 3", check=True)


@pytest.mark.asyncio
async def test_the_process_timeout_terminates_it(channel: GuestChannel) -> None:
    proc = await channel.create_process(["sleep", "100"], timeout=STARTS_WITHIN)
    await proc.wait()
    assert proc.timed_out and proc.exit_signal == signal.SIGTERM


@pytest.mark.asyncio
async def test_the_timeout_covers_the_wait_for_a_free_stream(tmp_path: Path) -> None:
    """One deadline for the whole call: a process that waits past its timeout, in the guest's
    queue or for its connection's stream, is never sent; nor is one given no time at all."""
    marker = tmp_path / "never-started"
    async with served_agent(tmp_path, "s.sock", "--max-streams", "1") as served:
        channel, guest = served.guest, served.server.guests[0]
        holder = await guest.create_process(["cat"], stdin=PIPE)
        with pytest.raises(CommandTimeout) as queued:
            waiting = guest.create_process(["touch", str(marker)], timeout=0.05)
            await asyncio.wait_for(waiting, HANG_GUARD)
        assert not queued.value.sent and "waiting for a free connection" in str(queued.value)
        with pytest.raises(CommandTimeout) as waited:
            waiting = channel.create_process(["touch", str(marker)], timeout=0.05)
            await asyncio.wait_for(waiting, HANG_GUARD)
        assert not waited.value.sent and "waiting for a free stream" in str(waited.value)
        with pytest.raises(CommandTimeout) as none:
            await channel.create_process(["touch", str(marker)], timeout=0)
        assert not none.value.sent and "given no time" in str(none.value)
        assert (guest.waiting, channel.queued) == (0, 0)
        assert holder.stdin is not None
        holder.stdin.write_eof()
        assert await holder.wait() == 0
        late = await channel.create_process(["sleep", "100"], timeout=STARTS_WITHIN)
        await late.wait()  # the stream came free: the agent got the time that was left
        assert late.timed_out
        await nothing_left(served)
    assert not marker.exists()


@pytest.mark.asyncio
async def test_a_background_child_holding_stdout_gives_output_incomplete(
    served: Served, channel: GuestChannel
) -> None:
    proc = await channel.create_process("sleep 100 & echo hi")
    out, _ = await proc.communicate()
    assert out == b"hi\n" and proc.returncode == 0 and proc.output_incomplete
    await nothing_left(served)


@pytest.mark.asyncio
async def test_leaving_async_with_stops_the_process(served: Served, channel: GuestChannel) -> None:
    async with await channel.create_process(["sleep", "100"]) as proc:
        pid = proc.pid
        assert pid is not None and alive(pid)
    assert proc.returncode is not None
    await eventually(lambda: not alive(pid), "the process was killed")
    await nothing_left(served)
    with pytest.raises(StdinClosed):
        async with await channel.create_process(["true"], stdin=PIPE) as done:
            await done.wait()
            assert done.stdin is not None
            done.stdin.write(b"too late")
            await done.stdin.drain()


@pytest.mark.asyncio
@pytest.mark.parametrize("hops", [*range(6), None])
async def test_cancelling_at_any_point_leaves_nothing_running(
    served: Served, channel: GuestChannel, hops: int | None
) -> None:
    """``hops`` loop turns before the cancel; None: once the process runs in the guest (a
    cancelled wait() alone leaves it running, as asyncio's does: ``async with`` stops it)."""

    async def start_and_wait() -> None:
        async with await channel.create_process(["sleep", "100"]) as proc:
            await proc.wait()

    for call in (start_and_wait(), channel.run("sleep 100", timeout=None)):
        task = asyncio.ensure_future(call)
        if hops is None:
            await eventually(lambda: children_of(served.agent.pid), "the process runs")
        for _ in range(hops or 0):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await nothing_left(served)
    assert not channel.closed
    assert (await channel.run("echo alive")).stdout == b"alive\n"


@pytest.mark.asyncio
async def test_a_lost_connection_fails_what_waits_on_it(channel: GuestChannel) -> None:
    proc = await channel.create_process(["sleep", "100"], stdin=PIPE)
    running = asyncio.ensure_future(channel.run("sleep 100", timeout=None))
    await asyncio.sleep(0.05)
    channel.abort("the test closes it")
    with pytest.raises(ConnectionClosed):
        await proc.wait()
    with pytest.raises(ConnectionClosed):
        await running
    assert proc.stdout is not None
    with pytest.raises(ConnectionClosed):
        await proc.stdout.read()
    with pytest.raises(ConnectionClosed):
        await channel.create_process(["true"])


@pytest.mark.asyncio
async def test_the_guest_handle_starts_processes_and_spreads_runs(served: Served) -> None:
    guest = served.server.guests[0]
    proc = await guest.create_process(["sh", "-c", "echo $0", "via guest"])
    assert await proc.communicate() == (b"via guest\n", b"")
    # A v2 connection takes many calls at once through the handle too.
    results = await asyncio.gather(*(guest.run(f"echo {i}", wait=False) for i in range(10)))
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(10)]
    await guest.probe(timeout=5)


@pytest.mark.asyncio
async def test_the_guest_handle_on_a_connection_just_closed_says_so(served: Served) -> None:
    """Closed but not yet forgotten (its end is reported a loop turn later), the guest's only
    connection is no reason to call the guest v1-only."""
    guest = served.server.guests[0]
    served.guest.abort("the test closes it")
    with pytest.raises(ConnectionClosed, match="no open connection"):
        await guest.create_process(["true"])


@pytest_asyncio.fixture
async def one_stream(tmp_path: Path) -> AsyncIterator[Served]:
    """An agent that runs one stream at a time: a second call through the guest waits."""
    async with served_agent(tmp_path, "one.sock", "--max-streams", "1") as served:
        yield served


@pytest.mark.asyncio
@pytest.mark.parametrize("holder", ["process", "run"])
async def test_runs_and_processes_wait_for_a_stream_in_one_fifo(
    one_stream: Served, tmp_path: Path, holder: str
) -> None:
    """With the one stream taken (by a process or a run), runs and processes are served in
    the order they came, whichever API: each appends its name to a log as it runs."""
    guest = one_stream.server.guests[0]
    log, gate = tmp_path / "order", tmp_path / "gate"
    if holder == "process":
        held = await guest.create_process(["cat"], stdin=PIPE)
        assert held.stdin is not None
        release = held.stdin.write_eof
    else:
        waiting = f"while [ ! -e {gate} ]; do sleep 0.01; done"
        holding = asyncio.ensure_future(guest.run(waiting, timeout=HANG_GUARD))
        await eventually(lambda: children_of(one_stream.agent.pid), "the run holds the stream")
        release = gate.touch

    async def run(name: str) -> None:
        assert (await guest.run(f"echo {name} >> {log}", timeout=HANG_GUARD)).exit_code == 0

    async def process(name: str) -> None:
        proc = await guest.create_process(f"echo {name} >> {log}")
        assert await proc.wait() == 0

    names = ["run1", "process1", "run2", "process2", "process3", "run4", "run5", "process6"]
    calls = []
    for name in names:
        calls.append(asyncio.ensure_future((run if name.startswith("run") else process)(name)))
        await queued(one_stream, len(calls))
    release()
    async with asyncio.timeout(HANG_GUARD):
        await asyncio.gather(*calls)
        if holder == "run":
            assert (await holding).exit_code == 0
    assert log.read_text().split() == names
    assert guest.waiting == 0
    await nothing_left(one_stream)


@pytest.mark.asyncio
async def test_waiters_that_give_up_leave_the_queue_and_start_nothing(
    one_stream: Served, tmp_path: Path
) -> None:
    guest, log = one_stream.server.guests[0], tmp_path / "started"
    async with asyncio.timeout(HANG_GUARD):  # a stream kept by a failed spawn would hang here
        with pytest.raises(SpawnFailed):
            await guest.create_process(["/no/such/program"])
        held = await guest.create_process(["cat"], stdin=PIPE)
        assert held.stdin is not None
        gave_up = [
            asyncio.ensure_future(guest.create_process(f"echo cancelled >> {log}")),
            asyncio.ensure_future(guest.run(f"echo cancelled >> {log}", timeout=None)),
        ]
        await queued(one_stream, 2)
        assert guest.waiting == 2  # both in the guest's queue
        with pytest.raises(UsageError, match="stdin must be"):  # at once, not in its turn
            await guest.create_process(["true"], stdin=STDOUT)
        with pytest.raises(CommandTimeout) as info:
            await guest.run(f"echo late >> {log}", timeout=0.05)
        assert not info.value.sent and info.value.result.timed_out
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await guest.create_process(f"echo late >> {log}")
        assert guest.waiting == 2
        for call in gave_up:
            call.cancel()
        for call in gave_up:
            with pytest.raises(asyncio.CancelledError):
                await call
        assert guest.waiting == 0 and one_stream.guest.queued == 0
        last = asyncio.ensure_future(guest.run(f"echo last >> {log}", timeout=HANG_GUARD))
        await queued(one_stream, 1)
        held.stdin.write_eof()
        assert (await last).exit_code == 0
    assert log.read_text() == "last\n"  # nothing that gave up ever ran
    await nothing_left(one_stream)


@pytest.mark.asyncio
@pytest.mark.parametrize("needs_v2", ["process", "file operation"])
async def test_a_call_that_needs_v2_is_never_handed_a_v1_connection(
    tmp_path: Path, needs_v2: str
) -> None:
    """A guest with a v2 connection (one stream) and a v1 one: a process (or a file
    operation) waits for the v2 stream while the v1 connection comes free, and fails once
    no v2 connection is left."""
    path = short_socket_path(tmp_path, "mixed.sock")
    v1 = DialingGuest(path, GuestScript("v1"))

    def call() -> Awaitable[object]:
        return guest.create_process(["true"]) if needs_v2 == "process" else guest.stat("/")

    async with (
        vsock_async.listen(f"unix:{path}", label="m") as server,
        agent_process("--connect", f"unix:{path}", "--max-streams", "1", tmp_path=tmp_path),
    ):
        guest = await server.wait_for_guest("m", timeout=HANG_GUARD)
        await v1.dial()
        try:
            await eventually(lambda: guest.connection_count == 2, "both connections")
            held = await guest.create_process(["cat"], stdin=PIPE)
            on_v1 = asyncio.ensure_future(guest.run("wait 1", timeout=HANG_GUARD))
            await v1.script.started.get()
            waiting = asyncio.ensure_future(call())
            await eventually(lambda: guest.waiting == 1, f"the {needs_v2} waits")
            v1.script.release(b"1")
            assert (await on_v1).stdout == b"v1:wait 1"  # its connection comes free...
            for _ in range(5):  # a hand-over would have woken it at once
                await asyncio.sleep(0)
            assert not waiting.done() and guest.waiting == 1  # ...and is not the waiting call's
            # A call any connection can carry takes the v1 one meanwhile: it waits behind no
            # call that could have used it.
            passing = await guest.run("now", timeout=HANG_GUARD)
            assert passing.stdout == b"v1:now" and not waiting.done()
            (v2,) = (c for c in guest.channels if c.protocol == "v2")
            v2.abort("the test closes it")
            with pytest.raises(ConnectionClosed, match="no open v2 connection"):
                await waiting
            with pytest.raises(ConnectionClosed):
                await held.wait()
            await eventually(lambda: guest.connection_count == 1, "the v2 connection is gone")
            with pytest.raises(Unsupported, match=f"only protocol v1.*{needs_v2}"):
                await call()
            assert (await guest.run("still", timeout=HANG_GUARD)).stdout == b"v1:still"
        finally:
            await v1.aclose()


@pytest.mark.asyncio
async def test_v1_connections_refuse_processes_clearly(tmp_path: Path) -> None:
    path = tmp_path / "v1.sock"
    async with (
        vsock_async.listen(f"unix:{path}", protocol="v1") as server,
        agent_process("--connect", f"unix:{path}", tmp_path=tmp_path),
    ):
        channel = await server.accept(timeout=HANG_GUARD)
        assert channel.protocol == "v1" and channel.agent is None and channel.concurrency == 1
        with pytest.raises(Unsupported, match="protocol v1") as info:
            await channel.create_process(["true"])
        assert isinstance(info.value, UsageError)
        guest = server.guests[0]
        with pytest.raises(Unsupported, match="only protocol v1"):
            await guest.create_process(["true"])
        assert (await channel.run("echo v1")).stdout == b"v1\n"


@pytest.mark.asyncio
async def test_credit_held_back_is_returned_before_a_reader_waits(channel: GuestChannel) -> None:
    """400 bytes read (under the batch of credit returned at once), then a line that needs
    more than the agent has credit for: the reader returns the 400 before waiting."""
    proc = await channel.create_process("printf %1000s | tr ' ' a; printf '%300s\\n' b", limit=1000)
    assert proc.stdout is not None
    async with asyncio.timeout(HANG_GUARD):
        assert await proc.stdout.readexactly(400) == b"a" * 400
        line = await proc.stdout.readuntil(b"\n")
    assert line == b"a" * 600 + b" " * 299 + b"b\n"
    assert await proc.wait() == 0


@pytest.mark.asyncio
async def test_run_takes_output_far_beyond_its_window(channel: GuestChannel) -> None:
    result = await channel.run("head -c 20000000 /dev/zero | tr '\\0' z", timeout=HANG_GUARD)
    assert result.stdout == b"z" * 20_000_000 and not result.stdout_truncated


@pytest.mark.asyncio
async def test_run_asks_an_agent_that_can_for_a_brief_stream(channel: GuestChannel) -> None:
    # One EXIT frame back for a silent command: no STARTED, no END (docs/protocol.md §3).
    exit_frame = HEADER.size + len(
        b'{"exit_code":0,"signal":null,"timed_out":false,"output_incomplete":false}'
    )
    assert channel.agent is not None and "brief" in channel.agent.capabilities
    before = channel.bytes_received
    assert (await channel.run("true", timeout=HANG_GUARD)).exit_code == 0
    assert channel.bytes_received - before == exit_frame
    before = channel.bytes_received
    result = await channel.run("echo hi; echo err >&2; exit 3", timeout=HANG_GUARD)
    assert (result.stdout, result.stderr, result.exit_code) == (b"hi\n", b"err\n", 3)
    exit3 = exit_frame  # the same length with another digit
    assert channel.bytes_received - before == 2 * HEADER.size + 3 + 4 + exit3
    long = "echo " + "x" * 70_000  # too long for the EXEC: the shell reads it from stdin
    assert (await channel.run(long, timeout=HANG_GUARD)).stdout == b"x" * 70_000 + b"\n"


async def older_agent(path: str, requests: list[dict[str, object]]) -> None:
    """A v2 agent that does not know brief streams, written on the protocol core: it
    announces only ``exec`` and answers every EXEC with STARTED, ``old`` and both ENDs."""
    reader, writer = await asyncio.open_unix_connection(path)
    decoder = CommandDecoder()
    while (command := decoder.next_event()) is None:
        decoder.receive_data(await reader.read(1 << 16))
    assert isinstance(command, Command)
    hello = parse_hello_command(command.command)
    assert hello is not None
    answer = hello_answer(hello, AgentLimits(), ["exec"], "old/1")
    assert answer is not None
    writer.write(encode_result(answer, b"", 0))
    session = AgentSession(hello)
    while data := await reader.read(1 << 16):
        session.receive_data(data)
        while (event := session.next_event()) is not None:
            assert isinstance(event, ExecRequested)
            requests.append(dict(event.request))
            session.started(event.stream, 4242)
            session.send_output(event.stream, Channel.STDOUT, b"old\n", end=True)
            session.send_output(event.stream, Channel.STDERR, b"", end=True)
            session.exited(event.stream, exit_code=0)
        writer.writelines(session.data_to_send())
    writer.close()


@pytest.mark.asyncio
async def test_run_on_an_agent_without_brief_streams_asks_for_full_ones(tmp_path: Path) -> None:
    path = short_socket_path(tmp_path, "old.sock")
    requests: list[dict[str, object]] = []
    async with await vsock_async.listen(f"unix:{path}", protocol="v2") as server:
        guest = asyncio.create_task(older_agent(path, requests))
        channel = await server.accept(timeout=HANG_GUARD)
        assert channel.agent is not None and "brief" not in channel.agent.capabilities
        result = await channel.run("echo old", timeout=HANG_GUARD)
        assert (result.stdout, result.stderr, result.exit_code) == (b"old\n", b"", 0)
        assert len(requests) == 1 and "brief" not in requests[0]
        await channel.aclose()
        await asyncio.wait_for(guest, HANG_GUARD)

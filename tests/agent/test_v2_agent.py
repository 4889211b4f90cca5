"""The agent's side of protocol v2, end to end: the agent as a real process dialling a Unix socket,
the host played by :class:`tests.agent.v2_host.HostEnd` (the pure HostSession over a plain socket).

What is left of the agent's processes is read from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.agent.v2_host import HostEnd
from tests.agent_process import (
    LONG,
    agent_process,
    alive,
    children_of,
    eventually,
    live_members,
    short_socket_path,
    single_file_agent,
)
from vsock_async.agent import GuestAgent
from vsock_async.errors import UsageError
from vsock_async.protocol import encode_command, encode_result
from vsock_async.protocol.v2 import (
    HEADER,
    MAX_CREDIT,
    Channel,
    Exited,
    FrameType,
    Output,
    Pong,
    RequestFailed,
    Started,
    encode_frame,
    encode_json,
    hello_command,
    new_nonce,
)

BOTH_FORMS = pytest.mark.parametrize("single", [False, True], ids=["package", "single-file"])


@dataclass
class Agent:
    """An agent process and the connections it dialled, as they arrive."""

    proc: asyncio.subprocess.Process
    arrivals: asyncio.Queue[HostEnd]

    async def connection(self) -> HostEnd:
        return await asyncio.wait_for(self.arrivals.get(), LONG)

    async def v2(self) -> HostEnd:
        host = await self.connection()
        await host.hello()
        return host


@contextlib.asynccontextmanager
async def running_agent(tmp_path: Path, *args: str, single: bool = False) -> AsyncIterator[Agent]:
    """The agent dialling a Unix socket: ``python -m vsock_async agent``, or the single file."""
    path = short_socket_path(tmp_path, "v2.sock")
    arrivals: asyncio.Queue[HostEnd] = asyncio.Queue()
    hosts: list[HostEnd] = []

    def arrived(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hosts.append(HostEnd(reader, writer))
        arrivals.put_nowait(hosts[-1])

    server = await asyncio.start_unix_server(arrived, path)
    try:
        form = single_file_agent if single else agent_process
        async with form("--connect", f"unix:{path}", *args, tmp_path=tmp_path) as proc:
            yield Agent(proc, arrivals)
            for host in hosts:
                await host.aclose()
    finally:
        server.close()


def zombie_free(agent: Agent, pids: list[int]) -> bool:
    """True once none of ``pids`` is alive or waiting to be reaped by the agent."""
    return not any(alive(pid) for pid in pids) and not set(pids) & children_of(agent.proc.pid)


# -- negotiation and v1 -------------------------------------------------------------------


@BOTH_FORMS
@pytest.mark.asyncio
async def test_hello_switches_and_announces_limits_and_capabilities(
    tmp_path: Path, single: bool
) -> None:
    async with running_agent(tmp_path, "--max-streams", "7", single=single) as agent:
        host = await agent.connection()
        answer = await host.hello(max_frame=65536)
        assert answer.version == 2
        assert answer.agent.startswith("vsock_async/")
        assert answer.limits.max_streams == 7
        assert (answer.limits.max_frame, answer.limits.stdin_window) == (1 << 20, 256 * 1024)
        assert {"exec", "signal", "ping", "pty", "resize"} <= answer.capabilities
        assert ("user" in answer.capabilities) == (os.geteuid() == 0)
        assert host.session is not None
        host.session.ping(b"are you there")
        host.flush()
        assert await host.next(0) == Pong(b"are you there")
        # The host's max_frame is honoured: 200 kB of output arrives in frames of 64 KiB.
        big = await host.run({"command": "head -c 200000 /dev/zero"})
        assert big.stdout == bytes(200000)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "8"])
def test_max_streams_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(UsageError, match="max_streams must be an int >= 1"):
        GuestAgent("unix:/nowhere", max_streams=bad)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_host_that_never_negotiates_gets_byte_exact_v1(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.connection()
        exchanges = [
            (b":", encode_result(b"", b"", 0)),
            (b"echo out; echo err >&2; exit 3", encode_result(b"out\n", b"err\n", 3)),
            # Not the hello's exact shape: an ordinary command, run by the shell as ':'.
            (b": vsock_async.hello versions=2", encode_result(b"", b"", 0)),
            (b": vsock_async.hello versions=2 nonce=XYZ", encode_result(b"", b"", 0)),
            # A hello naming only versions the agent does not speak: answered as ':' is.
            (hello_command(new_nonce(), versions=(3,)), encode_result(b"", b"", 0)),
            (b"printf %s still-v1", encode_result(b"still-v1", b"", 0)),
        ]
        for command, expected in exchanges:
            host.writer.write(encode_command(command))
            assert await asyncio.wait_for(host.reader.readexactly(len(expected)), LONG) == expected
        # And once it is v2, a new connection starts from v1 again.
        await host.hello()
        await host.aclose()
        again = await agent.connection()
        assert (await again.v1(b"echo back")).stdout == b"back\n"


@pytest.mark.asyncio
async def test_bytes_sent_before_the_hello_answer_close_the_connection(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.connection()
        eager = encode_command(hello_command(new_nonce())) + encode_frame(0, FrameType.PING)
        host.writer.write(eager)
        assert await asyncio.wait_for(host.reader.read(), LONG) == b""
        # The agent dials again and is as good as new.
        assert (await (await agent.v2()).run({"argv": ["true"]})).exited is not None


# -- processes ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_output_streams_before_the_exit_and_a_signal_ends_it(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        # A loop of builtins: the trap runs at once (no foreground child to wait for first).
        busy = "trap 'echo bye; exit 7' USR1; echo first; while :; do :; done"
        stream = host.exec({"command": busy})
        started = await host.next(stream)
        assert isinstance(started, Started)
        assert await host.next(stream) == Output(stream, Channel.STDOUT, b"first\n", False)
        assert host.session is not None
        host.session.send_signal(stream, signal.SIGUSR1)
        host.flush()
        rest = await host.outcome(stream)
        assert rest.stdout == b"bye\n"
        assert rest.exited == Exited(stream, 7, None, False, False)

        killed = await host.run({"command": "kill -TERM $$"})
        assert killed.exited is not None
        assert killed.exited == Exited(killed.exited.stream, None, signal.SIGTERM, False, False)


@pytest.mark.asyncio
async def test_stdin_with_eof_reaches_the_process(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        assert host.session is not None
        stream = host.exec({"argv": ["sh", "-c", "cat; echo eof-seen >&2"], "stdin": True})
        data = os.urandom(1_000_000)  # four times the stdin window: credit must come back
        sent = 0
        outcome_task = asyncio.create_task(host.outcome(stream))
        while sent < len(data):
            taken = host.session.send_stdin(stream, data[sent : sent + 65536])
            host.flush()
            sent += taken
            if not taken:
                await asyncio.sleep(0.005)
        host.session.send_stdin(stream, b"", end=True)
        host.flush()
        outcome = await outcome_task
        assert outcome.stdout == data
        assert outcome.stderr == b"eof-seen\n"
        assert outcome.exited is not None and outcome.exited.exit_code == 0


@pytest.mark.asyncio
async def test_env_cwd_stderr_modes_and_spawn_failures(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        out = await host.run(
            {"command": "echo $GREETING; pwd; echo err >&2", "env": {"GREETING": "hi"}, "cwd": "/"}
        )
        assert (bytes(out.stdout), bytes(out.stderr)) == (b"hi\n/\n", b"err\n")
        merged = await host.run({"command": "echo out; echo err >&2", "stderr": "stdout"})
        assert (bytes(merged.stdout), bytes(merged.stderr)) == (b"out\nerr\n", b"")
        dropped = await host.run({"command": "echo out; echo err >&2", "stderr": "null"})
        assert (bytes(dropped.stdout), bytes(dropped.stderr)) == (b"out\n", b"")
        inherited = await host.run({"argv": ["sh", "-c", "echo $PATH"]})
        assert inherited.stdout == os.environ["PATH"].encode() + b"\n"

        missing = await host.run({"argv": ["/no/such/program"]})
        assert missing.error is not None
        assert (missing.error.code, missing.error.errno) == ("spawn_failed", "ENOENT")
        denied = await host.run({"argv": [str(tmp_path)]})
        assert denied.error is not None and denied.error.errno == "EACCES"
        nowhere = await host.run({"argv": ["true"], "cwd": "/no/such/dir"})
        assert nowhere.error is not None and nowhere.error.errno == "ENOENT"
        bad = await host.run({"argv": ["true"], "stderr": "sideways"})
        assert bad.error is not None and bad.error.code == "bad_request"
        assert "stderr" in bad.error.message
        # Refusals end only their stream: the connection goes on.
        assert (await host.run({"argv": ["echo", "ok"]})).stdout == b"ok\n"


@BOTH_FORMS
@pytest.mark.asyncio
async def test_long_commands_and_argv(tmp_path: Path, single: bool) -> None:
    async with running_agent(tmp_path, single=single) as agent:
        host = await agent.v2()
        word = "x" * 300_000  # above Linux's 128 KiB limit on one argv string
        out = await host.run({"command": f"echo {word} | wc -c"})
        assert out.stdout.strip() == b"300001"
        assert out.exited is not None and out.exited.exit_code == 0
        many = ["sh", "-c", 'echo "$@" | wc -c', "sh", *["y"] * 200_000]
        long_argv = await host.run({"argv": many})
        assert long_argv.stdout.strip() == b"400000"


@BOTH_FORMS
@pytest.mark.asyncio
async def test_pty_is_a_terminal_and_resize_reaches_it(tmp_path: Path, single: bool) -> None:
    async with running_agent(tmp_path, single=single) as agent:
        host = await agent.v2()
        assert host.session is not None
        stream = host.exec(
            {
                "command": "tty; stty size; echo err >&2; read line; stty size; echo got $line",
                "pty": {"rows": 24, "cols": 80},
                "stdin": True,
            }
        )
        seen = b""
        while b"err" not in seen:
            event = await host.next(stream)
            if isinstance(event, Output):
                seen += event.data
        assert seen.startswith(b"/dev/pts/")
        assert b"24 80\r\n" in seen
        host.session.send_resize(stream, 50, 132)
        host.session.send_stdin(stream, b"hello\n")
        host.flush()
        rest = await host.outcome(stream)
        assert b"50 132\r\n" in rest.stdout
        assert b"got hello" in rest.stdout
        assert rest.stderr == b"", "a terminal merges stderr into stdout"
        assert rest.exited is not None and rest.exited.exit_code == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs a root agent")
@BOTH_FORMS
@pytest.mark.asyncio
async def test_user_switch_as_root(tmp_path: Path, single: bool) -> None:
    nobody = pwd.getpwnam("nobody")
    async with running_agent(tmp_path, single=single) as agent:
        host = await agent.v2()
        out = await host.run({"command": "id -u; id -g; id -G; echo $HOME $USER", "user": "nobody"})
        groups = " ".join(str(g) for g in os.getgrouplist("nobody", nobody.pw_gid))
        expected = f"{nobody.pw_uid}\n{nobody.pw_gid}\n{groups}\n{nobody.pw_dir} nobody\n"
        assert out.stdout.decode() == expected
        by_uid = await host.run({"argv": ["id", "-u"], "user": nobody.pw_uid})
        assert by_uid.stdout == f"{nobody.pw_uid}\n".encode()
        # A command too long for one argv string, which nobody cannot read from the agent's /proc.
        long = await host.run({"command": f": {'x' * 200_000}; id -u", "user": "nobody"})
        assert long.stdout == f"{nobody.pw_uid}\n".encode()
        unknown = await host.run({"argv": ["true"], "user": "no-such-user-here"})
        assert unknown.error is not None and unknown.error.code == "bad_request"


@pytest.mark.asyncio
async def test_many_processes_at_once_on_one_connection(tmp_path: Path) -> None:
    async with running_agent(tmp_path, "--max-streams", "40") as agent:
        host = await agent.v2()
        # All 40 run at the same time: each waits until all of them have started.
        marker = tmp_path / "count"
        marker.mkdir()
        script = f"touch {marker}/$$; while [ $(ls {marker} | wc -l) -lt 40 ]; do sleep 0.02; done"
        streams = [host.exec({"command": script + f"; echo {i}"}) for i in range(40)]
        outcomes = await asyncio.gather(*(host.outcome(s) for s in streams))
        assert [o.stdout for o in outcomes] == [f"{i}\n".encode() for i in range(40)]


@pytest.mark.asyncio
async def test_max_streams_refuses_one_more(tmp_path: Path) -> None:
    async with running_agent(tmp_path, "--max-streams", "2") as agent:
        host = await agent.v2()
        assert host.session is not None
        first = host.exec({"command": "sleep 30"})
        second = host.exec({"command": "sleep 30"})
        # Past the HostSession (which refuses locally): what the agent says to a third.
        host.raw(encode_json(second + 2, FrameType.EXEC, {"argv": ["true"]}))
        error = await host.next(second + 2)
        assert isinstance(error, RequestFailed)
        assert (error.code, error.type) == ("limit", FrameType.EXEC)
        for stream in (first, second):
            host.session.send_close(stream)
        host.flush()
        for stream in (first, second):
            assert (await host.outcome(stream)).exited is not None


@pytest.mark.asyncio
async def test_a_stalled_reader_does_not_block_another_stream(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        assert host.session is not None
        stalled = host.exec({"argv": ["yes"]}, window=65536)
        events: list[object] = []
        while sum(len(e.data) for e in events if isinstance(e, Output)) < 65536:
            events.append(await host.next(stalled))
        # The stalled stream has used all its credit and gets no more; another one streams 20 MB.
        size = 20_000_000
        busy = await host.run({"command": f"head -c {size} /dev/zero"})
        assert len(busy.stdout) == size
        assert host.events[stalled].empty(), "not a byte beyond the credit"
        started = events[0]
        assert isinstance(started, Started)
        assert alive(started.pid), "yes is blocked on a full pipe, not dead"
        host.session.send_close(stalled)
        host.flush()
        closed = await host.outcome(stalled)
        assert closed.exited is not None and closed.exited.signal == signal.SIGTERM


def bytes_written(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/PID/io")


@pytest.mark.asyncio
async def test_a_host_that_stops_reading_stops_the_pipes_not_the_agent(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        assert host.session is not None
        stream = host.exec({"argv": ["yes"]}, window=MAX_CREDIT)  # credit is not what stops it
        started = await host.next(stream)
        assert isinstance(started, Started)
        host.reading.clear()
        # The agent's write buffer fills, and it stops reading the pipe: yes blocks on it.
        counts = [bytes_written(started.pid)]

        async def stopped() -> bool:
            await asyncio.sleep(0.2)
            counts.append(bytes_written(started.pid))
            return counts[-1] == counts[-2]

        for _ in range(100):
            if await stopped():
                break
        else:
            pytest.fail(f"yes never stopped writing: {counts}")
        host.reading.set()
        await eventually(lambda: bytes_written(started.pid) > counts[-1], "yes writing again")
        host.session.send_close(stream)
        host.flush()
        exited = (await host.outcome(stream)).exited
        assert exited is not None and exited.signal == signal.SIGTERM


@BOTH_FORMS
@pytest.mark.asyncio
async def test_brief_streams_carry_only_output_and_the_exit(tmp_path: Path, single: bool) -> None:
    # The host session treats a STARTED or an END on a brief stream as a violation: any
    # such frame would leave host.error set and the stream unended.
    async with running_agent(tmp_path, "--output-grace", "0.2", single=single) as agent:
        host = await agent.v2()
        assert host.session is not None and "brief" in host.session.agent.capabilities
        out = await host.run({"command": "echo out; echo err >&2; exit 3", "brief": True})
        assert (out.pid, bytes(out.stdout), bytes(out.stderr)) == (None, b"out\n", b"err\n")
        assert out.exited is not None and (out.exited.exit_code, out.exited.signal) == (3, None)
        silent = await host.run({"argv": ["true"], "brief": True})
        assert silent.exited is not None and silent.exited.exit_code == 0
        big = await host.outcome(
            host.exec({"command": "head -c 300000 /dev/zero", "brief": True}, window=1000)
        )
        assert big.stdout == bytes(300000)
        fed = host.exec({"argv": ["cat"], "stdin": True, "brief": True})
        host.session.send_stdin(fed, b"typed", end=True)
        host.flush()
        assert (await host.outcome(fed)).stdout == b"typed"
        missing = await host.run({"argv": ["/no/such/program"], "brief": True})
        assert missing.error is not None and missing.error.errno == "ENOENT"
        timed = await host.run({"command": "sleep 30", "timeout": 0.1, "brief": True})
        assert timed.exited is not None
        assert (timed.exited.signal, timed.exited.timed_out) == (signal.SIGTERM, True)
        held = await host.run({"command": "sleep 30 & echo $!", "brief": True})
        assert held.exited is not None and held.exited.output_incomplete
        await eventually(lambda: not alive(int(held.stdout)), "the background sleep killed")
        closed = host.exec({"command": "yes", "brief": True})
        host.session.send_close(closed)
        host.flush()
        gone = await host.outcome(closed, grant=False)
        assert gone.exited is not None and gone.exited.signal == signal.SIGTERM
        # A full stream on the same connection still gets STARTED and END.
        full = await host.run({"argv": ["echo", "full"]})
        assert full.pid is not None and full.stdout == b"full\n"
        assert host.error is None


GROWS = (  # 64 KiB out, then, once told, the sizes of its stdout and stderr pipes
    "import fcntl, os, sys\n"
    "os.write(1, bytes(65536))\n"
    "sys.stdin.readline()\n"
    "print(fcntl.fcntl(1, 1032), fcntl.fcntl(2, 1032), file=sys.stderr)\n"  # F_GETPIPE_SZ
)


@pytest.mark.asyncio
async def test_a_pipe_that_streams_grows_to_the_window_at_most_1_mib(tmp_path: Path) -> None:
    # Only once a read of it comes back large, only as a root agent (an unprivileged one
    # would spend its user's pipe quota); stderr, which carries little, keeps 64 KiB.
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        assert host.session is not None
        sizes = [(4096, 65536), (262144, 262144), (1 << 20, 1 << 20), (8 << 20, 1 << 20)]
        for window, size in sizes:
            stream = host.exec(
                {"argv": [sys.executable, "-c", GROWS], "stdin": True}, window=window
            )
            got = 0
            while got < 65536:  # once the host has it, the agent has read it (and resized)
                event = await host.next(stream)
                if isinstance(event, Output) and event.data:
                    got += len(event.data)
                    host.session.grant(stream, event.channel, len(event.data))
                    host.flush()
            host.session.send_stdin(stream, b"go\n", end=True)
            host.flush()
            out = await host.outcome(stream)
            grown = size if os.geteuid() == 0 else 65536
            assert out.stderr.split() == [str(grown).encode(), b"65536"], window


@pytest.mark.asyncio
async def test_large_output_arrives_whole_beside_other_streams(tmp_path: Path) -> None:
    # Large output is spliced from its pipes straight onto the socket; frames of other
    # streams, credit and both channels must still come out whole and in order. The host
    # session takes any broken frame for a violation (host.error).
    data = tmp_path / "data"
    data.write_bytes(os.urandom(6_000_000))
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        big = host.exec({"command": f"cat {data} & cat {data} >&2; wait"}, window=200_000)
        small = [host.exec({"command": f"seq {i * 100}"}) for i in range(1, 9)]
        outcomes = await asyncio.gather(host.outcome(big), *(host.outcome(s) for s in small))
        assert outcomes[0].stdout == data.read_bytes() == outcomes[0].stderr
        for i, outcome in enumerate(outcomes[1:], 1):
            expected = "".join(f"{n}\n" for n in range(1, i * 100 + 1)).encode()
            assert outcome.stdout == expected
        assert host.error is None


@pytest.mark.asyncio
async def test_output_spliced_into_a_full_socket_arrives_whole(tmp_path: Path) -> None:
    # A host that stops reading with credit to spare: the socket fills mid-frame, the agent
    # hands the rest of that frame to its transport, and everything arrives in order.
    data = tmp_path / "data"
    data.write_bytes(os.urandom(8_000_000))
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        host.reading.clear()
        stream = host.exec({"command": f"cat {data}"}, window=16 << 20)
        await asyncio.sleep(0.3)
        host.reading.set()
        out = await host.outcome(stream)
        assert out.stdout == data.read_bytes() and host.error is None


PACKETS = (  # ordinary 64 KiB writes between runs of packet-mode (O_DIRECT) 4 KiB writes
    "import fcntl, os\n"
    "flags = fcntl.fcntl(1, fcntl.F_GETFL)\n"
    "for _ in range(150):\n"
    "    fcntl.fcntl(1, fcntl.F_SETFL, flags)\n"
    "    os.write(1, b'a' * 65536)\n"
    "    fcntl.fcntl(1, fcntl.F_SETFL, flags | os.O_DIRECT)\n"
    "    for _ in range(8):\n"
    "        os.write(1, b'b' * 4096)\n"
)


@pytest.mark.asyncio
async def test_a_packet_mode_pipe_spliced_into_a_full_socket_arrives_whole(
    tmp_path: Path,
) -> None:
    # A packet-mode pipe gives one write's bytes per read: what a splice into a full socket
    # leaves of a frame takes several reads. (It once closed the connection instead.)
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        stream = host.exec({"argv": [sys.executable, "-c", PACKETS]}, window=16 << 20)

        async def in_fits_and_starts() -> None:
            while True:
                host.reading.clear()
                await asyncio.sleep(0.02)
                host.reading.set()
                await asyncio.sleep(0.001)

        reader = asyncio.create_task(in_fits_and_starts())
        try:
            out = await host.outcome(stream)
        finally:
            reader.cancel()
        assert out.stdout == (b"a" * 65536 + b"b" * 32768) * 150
        assert out.exited is not None and out.exited.exit_code == 0 and host.error is None


@pytest.mark.asyncio
async def test_background_child_holding_stdout_gives_output_incomplete(tmp_path: Path) -> None:
    async with running_agent(tmp_path, "--output-grace", "0.2") as agent:
        host = await agent.v2()
        out = await host.run({"command": "sleep 30 & echo $!"})
        assert out.exited is not None
        assert (out.exited.exit_code, out.exited.output_incomplete) == (0, True)
        sleeper = int(out.stdout)
        await eventually(lambda: not alive(sleeper), "the background sleep killed")
        detached = await host.run({"command": "sleep 30 >/dev/null 2>&1 & echo $!"})
        assert detached.exited is not None and not detached.exited.output_incomplete
        runner = int(detached.stdout)
        assert alive(runner), "a process that detached its output keeps running"
        os.kill(runner, signal.SIGKILL)


@pytest.mark.asyncio
async def test_timeout_terminates_then_kills(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        out = await host.run({"command": "sleep 30", "timeout": 0.1})
        assert out.exited is not None
        assert (out.exited.signal, out.exited.timed_out) == (signal.SIGTERM, True)
        stubborn = await host.run(
            {"command": "trap '' TERM; sleep 30", "timeout": 0.1, "kill_grace": 0.1}
        )
        assert stubborn.exited is not None
        assert (stubborn.exited.signal, stubborn.exited.timed_out) == (signal.SIGKILL, True)
        quick = await host.run({"argv": ["true"], "timeout": 30})
        assert quick.exited is not None and not quick.exited.timed_out


@pytest.mark.asyncio
async def test_dropping_the_connection_kills_and_reaps_every_process(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        requests: list[dict[str, Any]] = [
            {"command": "sleep 30"},
            {"command": "sleep 30 & sleep 30 & wait"},
            {"command": "trap '' TERM HUP; sleep 30", "stdin": True},
            {"command": "sleep 30", "pty": {"rows": 24, "cols": 80}},
            {"argv": ["yes"]},  # blocked on a pipe nobody reads
        ]
        streams = [host.exec(request, window=1) for request in requests]
        pids = []
        for stream in streams:
            started = await host.next(stream)
            assert isinstance(started, Started)
            pids.append(started.pid)
        await eventually(
            lambda: all(len(live_members(pid)) >= 1 for pid in pids), "all processes running"
        )
        await eventually(lambda: len(live_members(pids[1])) == 3, "the shell and its two sleeps")
        members = [m for pid in pids for m in live_members(pid)]
        await host.aclose()
        await eventually(lambda: zombie_free(agent, members), "every process killed and reaped")
        # The agent itself lives on and dials again.
        again = await agent.v2()
        assert (await again.run({"argv": ["echo", "again"]})).stdout == b"again\n"


@pytest.mark.asyncio
async def test_an_exec_and_a_hang_up_in_one_breath_leave_nothing_behind(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        for _ in range(10):
            host = await agent.v2()
            host.exec({"command": "sleep 30"})
            host.writer.transport.abort()  # the EXEC and the hang-up arrive together
        await eventually(lambda: not children_of(agent.proc.pid), "every process reaped")


@pytest.mark.asyncio
async def test_sigterm_stops_the_agent_after_killing_and_reaping_its_processes(
    tmp_path: Path,
) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        streams = [host.exec({"command": "sleep 30 & sleep 30"}) for _ in range(3)]
        pids = []
        for stream in streams:
            started = await host.next(stream)
            assert isinstance(started, Started)
            pids.append(started.pid)
        await eventually(lambda: all(len(live_members(p)) == 3 for p in pids), "sh and 2 sleeps")
        members = [m for pid in pids for m in live_members(pid)]
        agent.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(agent.proc.wait(), LONG) == 0
        await eventually(lambda: not any(alive(pid) for pid in members), "all of them killed")


# -- a hostile host -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_oversized_frame_closes_the_connection_and_kills_its_processes(
    tmp_path: Path,
) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        stream = host.exec({"command": "sleep 30"})
        started = await host.next(stream)
        host.raw(HEADER.pack(0xFFFF_FFFF, stream, FrameType.STDIN, 0))
        await asyncio.wait_for(host.closed, LONG)
        await eventually(lambda: zombie_free(agent, [started.pid]), "the sleep killed and reaped")


@pytest.mark.asyncio
async def test_unknown_types_and_streams_are_answered_and_the_connection_lives(
    tmp_path: Path,
) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        assert host.session is not None
        host.raw(encode_frame(0, 0x7F, 0, b"a payload to skip"))
        host.raw(encode_frame(99, FrameType.SIGNAL, 0, b'{"signal": 15}'))
        unknown = await host.next(0)
        assert isinstance(unknown, RequestFailed)
        assert (unknown.code, unknown.type) == ("unknown_type", 0x7F)
        never = await host.next(99)
        assert isinstance(never, RequestFailed) and never.code == "unknown_stream"
        stream = host.exec({"command": "sleep 30"})
        await host.next(stream)
        host.raw(encode_frame(stream, FrameType.SIGNAL, 0, b'{"signal": "TERM"}'))
        bad = await host.next(stream)
        assert isinstance(bad, RequestFailed) and bad.code == "bad_request"
        host.raw(encode_frame(stream, FrameType.RESIZE, 0, b'{"rows": 1, "cols": 1}'))
        no_tty = await host.next(stream)
        assert isinstance(no_tty, RequestFailed) and no_tty.code == "unsupported"
        host.session.ping(b"still here")
        host.flush()
        assert await host.next(0) == Pong(b"still here")
        host.session.send_close(stream)
        host.flush()
        assert (await host.outcome(stream)).exited is not None


@pytest.mark.asyncio
async def test_stdin_beyond_credit_closes_the_connection(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        assert host.session is not None
        window = host.session.agent.limits.stdin_window
        stream = host.exec({"argv": ["sleep", "30"], "stdin": True})
        started = await host.next(stream)
        host.raw(encode_frame(stream, FrameType.STDIN, 0, bytes(window + 1)))
        await asyncio.wait_for(host.closed, LONG)
        await eventually(lambda: zombie_free(agent, [started.pid]), "the sleep killed and reaped")


@pytest.mark.asyncio
async def test_exec_with_a_reused_stream_id_closes_the_connection(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        stream = host.exec({"argv": ["true"]})
        assert (await host.outcome(stream)).exited is not None
        host.raw(encode_json(stream, FrameType.EXEC, {"argv": ["true"]}))
        await asyncio.wait_for(host.closed, LONG)
        assert (await (await agent.v2()).run({"argv": ["true"]})).exited is not None

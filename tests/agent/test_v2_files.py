"""The agent's file streams, end to end: the agent as a real process (package and single file),
the host played by :class:`tests.agent.v2_host.HostEnd` (the pure HostSession over a socket), so
that the host can also send what the library never would."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from tests.agent.test_v2_agent import BOTH_FORMS, running_agent
from tests.agent.v2_host import HostEnd
from tests.agent_process import LONG, eventually
from vsock_async.protocol.v2 import (
    FLAG_END,
    Channel,
    FileResult,
    FrameType,
    Output,
    RequestFailed,
    StdinCredit,
    StreamError,
    encode_frame,
    encode_json,
)


def leftovers(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(".vsock_async.")]


async def ended(host: HostEnd, stream: int) -> FileResult | StreamError:
    """The last event of a file stream; output and credit on the way are checked, then dropped."""
    while True:
        event = await host.next(stream)
        if isinstance(event, FileResult | StreamError):
            return event
        assert isinstance(event, Output | StdinCredit | RequestFailed), event


def open_file(host: HostEnd, request: dict[str, Any], window: int = 1 << 20) -> int:
    assert host.session is not None
    stream = host.session.open_file(request, window)
    host.flush()
    return stream


async def put(host: HostEnd, path: Path, data: bytes, digest: str | None = None) -> Any:
    """A put, its bytes sent as credit comes, and COMMIT with ``digest`` (the right one if None)."""
    session = host.session
    assert session is not None
    stream = open_file(host, {"op": "put", "path": str(path)})
    view = memoryview(data)
    while True:
        view = view[session.send_stdin(stream, view, end=True) :]
        host.flush()
        if not view:
            break
        assert isinstance(await host.next(stream), StdinCredit)
    session.send_commit(stream, digest or hashlib.sha256(data).hexdigest())
    host.flush()
    return await ended(host, stream)


@BOTH_FORMS
@pytest.mark.asyncio
async def test_a_put_lands_whole_with_its_digest(tmp_path: Path, single: bool) -> None:
    async with running_agent(tmp_path, single=single) as agent:
        host = await agent.v2()
        assert host.session is not None and "files" in host.session.agent.capabilities
        data = os.urandom(3 * (1 << 20) + 5)  # three file windows and a bit
        result = await put(host, tmp_path / "f", data)
        assert result == FileResult(
            1, {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
        assert (tmp_path / "f").read_bytes() == data


@pytest.mark.asyncio
async def test_a_wrong_digest_leaves_the_target_untouched(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        (tmp_path / "f").write_bytes(b"old")
        result = await put(host, tmp_path / "f", b"new bytes", digest="0" * 64)
        assert isinstance(result, StreamError) and result.code == "digest_mismatch"
        assert (tmp_path / "f").read_bytes() == b"old" and leftovers(tmp_path) == []


@pytest.mark.asyncio
async def test_close_mid_put_removes_the_temp_and_answers_closed(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        session = host.session
        assert session is not None
        stream = open_file(host, {"op": "put", "path": str(tmp_path / "f")})
        session.send_stdin(stream, b"partial")
        host.flush()
        await eventually(lambda: leftovers(tmp_path) != [], "the temp file exists")
        session.send_close(stream)
        host.flush()
        result = await ended(host, stream)
        assert isinstance(result, StreamError) and result.code == "closed"
        assert leftovers(tmp_path) == [] and not (tmp_path / "f").exists()


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        ({"op": "chmod", "path": "/x"}, "unsupported"),
        ({"op": "get", "path": "relative"}, "bad_request"),
        ({"op": "get"}, "bad_request"),
        ({"op": "get", "path": "/a\u0000b"}, "bad_request"),
        ({"op": "put", "path": "/x", "mode": 0o10000}, "bad_request"),
        ({"op": "put", "path": "/x", "uid": -1}, "bad_request"),
        ({"op": "put", "path": "/x", "make_parents": 1}, "bad_request"),
        ({"op": "stat", "path": {"b64": "!!"}}, "bad_request"),
        ({"op": "symlink", "path": "/x", "target": ""}, "bad_request"),
        ({"op": "remove", "path": "/x", "recursive": "yes"}, "bad_request"),
        ({"op": "setattr", "path": "/x", "mode": "0755"}, "bad_request"),
        ({"op": "mkdir", "path": "/x", "uid": -1}, "bad_request"),
        ({"op": "symlink", "path": "/x", "target": "y", "gid": "root"}, "bad_request"),
        ({"op": "setattr", "path": "/x", "mtime_ns": -1}, "bad_request"),
    ],
)
@pytest.mark.asyncio
async def test_bad_requests_are_refused_and_the_connection_goes_on(
    tmp_path: Path, request_: dict[str, Any], code: str
) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        result = await ended(host, open_file(host, request_))
        assert isinstance(result, StreamError) and result.code == code
        (tmp_path / "ok").write_bytes(b"ok")
        stat = await ended(host, open_file(host, {"op": "stat", "path": str(tmp_path / "ok")}))
        assert isinstance(stat, FileResult) and stat.result["size"] == 2


@pytest.mark.asyncio
async def test_a_get_moves_only_within_the_credit_granted(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        (tmp_path / "f").write_bytes(b"x" * 100_000)
        stream = open_file(host, {"op": "get", "path": str(tmp_path / "f")}, window=1000)
        first = await host.next(stream)
        assert first == Output(stream, Channel.STDOUT, b"x" * 1000, False)
        with pytest.raises(asyncio.TimeoutError):  # a silent peer: nothing more without credit
            await asyncio.wait_for(host.events[stream].get(), 0.05)
        assert host.session is not None
        host.session.grant(stream, Channel.STDOUT, 99_000)
        host.flush()
        received = 1000
        while received < 100_000:
            event = await host.next(stream)
            assert isinstance(event, Output)
            received += len(event.data)
        assert (await host.next(stream)) == Output(stream, Channel.STDOUT, b"", True)
        result = await host.next(stream)
        assert isinstance(result, FileResult) and result.result["size"] == 100_000


@pytest.mark.parametrize(
    "hostile",
    [
        encode_json(1, FrameType.COMMIT, {"sha256": "0" * 64}),  # before the bytes ended
        encode_frame(1, FrameType.STDIN, 0, b"x" * ((1 << 20) + 1)),  # above max_frame
        encode_json(2, FrameType.FILE, {"op": "stat", "path": "/"}),  # an even stream id
    ],
)
@pytest.mark.asyncio
async def test_hostile_file_frames_close_the_connection_and_leave_nothing(
    tmp_path: Path, hostile: bytes
) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        stream = open_file(host, {"op": "put", "path": str(tmp_path / "f")})
        assert stream == 1
        await eventually(lambda: leftovers(tmp_path) != [], "the temp file exists")
        host.raw(hostile)
        await asyncio.wait_for(host.closed, LONG)
        await eventually(lambda: leftovers(tmp_path) == [], "the temp file is removed")
        assert not (tmp_path / "f").exists()
        # The agent dials again and is as good as new.
        again = await agent.v2()
        result = await put(again, tmp_path / "f", b"fine")
        assert isinstance(result, FileResult) and (tmp_path / "f").read_bytes() == b"fine"


@pytest.mark.asyncio
async def test_an_end_with_no_commit_keeps_waiting_and_a_drop_cleans_up(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        stream = open_file(host, {"op": "put", "path": str(tmp_path / "f")})
        host.raw(encode_frame(stream, FrameType.STDIN, FLAG_END, b"all of it"))
        await eventually(lambda: leftovers(tmp_path) != [], "the temp file exists")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(host.events[stream].get(), 0.05)
        await host.aclose()
        await eventually(lambda: leftovers(tmp_path) == [], "the temp file is removed")
        assert not (tmp_path / "f").exists()


@pytest.mark.asyncio
async def test_setattr_sets_mode_and_mtime_and_never_follows_a_link(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        host = await agent.v2()
        (tmp_path / "d").mkdir(mode=0o755)
        (tmp_path / "f").write_bytes(b"x")
        os.symlink("d", tmp_path / "link")
        os.mkfifo(tmp_path / "fifo")
        for name, mode in (("d", 0o555), ("f", 0o4711)):
            request = {"op": "setattr", "path": str(tmp_path / name), "mode": mode}
            result = await ended(host, open_file(host, {**request, "mtime_ns": 10**18 + 1}))
            assert result == FileResult(result.stream, {})
            st = os.stat(tmp_path / name)
            assert (st.st_mode & 0o7777, st.st_mtime_ns) == (mode, 10**18 + 1)
        only_mtime = {"op": "setattr", "path": str(tmp_path / "f"), "mtime_ns": 5}
        assert isinstance(await ended(host, open_file(host, only_mtime)), FileResult)
        assert (tmp_path / "f").stat().st_mode & 0o7777 == 0o4711
        for name in ("link", "fifo"):
            request = {"op": "setattr", "path": str(tmp_path / name), "mode": 0o700}
            refused = await ended(host, open_file(host, request))
            assert isinstance(refused, StreamError)
            assert (refused.code, refused.errno) == ("file_error", "EINVAL"), name
        assert (tmp_path / "d").stat().st_mode & 0o7777 == 0o555  # not through the link
        os.chmod(tmp_path / "d", 0o755)

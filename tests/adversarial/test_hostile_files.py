"""A hostile agent against the host's file operations: wrong digests, malformed descriptions and
listings, names that climb out of a directory, a listing that turns a link into a directory.

The agent is scripted here over a socketpair (the pure AgentSession, plus raw frames where the
session would refuse to send them). Whatever it sends, the host raises ``ProtocolError`` (and
closes the connection) or a local ``OSError``, and writes nothing outside the target directory
and no partial file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from vsock_async import Limits, ProtocolError
from vsock_async.host import files
from vsock_async.host.session import SessionConnection
from vsock_async.protocol.v2 import (
    FLAG_END,
    AgentLimits,
    AgentSession,
    Channel,
    CommitRequested,
    FileRequested,
    FrameType,
    HelloAnswer,
    HelloRequest,
    StdinData,
    encode_frame,
    encode_json,
)

MiB = 1024 * 1024
Script = Callable[[AgentSession, FileRequested], bytes | None]
"""What the agent does with a request: queue frames on the session, or return raw bytes."""


def line(**fields: Any) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def info(kind: str = "file", **more: Any) -> dict[str, Any]:
    return {"kind": kind, "size": 1, "mode": 0o644, "uid": 0, "gid": 0, "mtime_ns": 0, **more}


@contextlib.asynccontextmanager
async def hostile(script: Script) -> AsyncIterator[SessionConnection]:
    """A v2 connection whose agent follows ``script`` for every file request."""
    loop = asyncio.get_running_loop()
    host_end, agent_end = socket.socketpair()
    agent_end.setblocking(False)
    answer = HelloAnswer(2, AgentLimits(), frozenset({"files"}), "hostile")
    _, conn = await loop.connect_accepted_socket(
        lambda: SessionConnection(answer, limits=Limits(), max_frame=MiB), host_end
    )
    session = AgentSession(HelloRequest((2,), "0123456789abcdef"))

    async def serve() -> None:
        while data := await loop.sock_recv(agent_end, 1 << 20):
            session.receive_data(data)
            raw = b""
            while (event := session.next_event()) is not None:
                if isinstance(event, FileRequested):
                    raw += script(session, event) or b""
                elif isinstance(event, StdinData):
                    session.stdin_consumed(event.stream, len(event.data))
                elif isinstance(event, CommitRequested):
                    raw += script(session, FileRequested(event.stream, "commit", {})) or b""
            out = b"".join(bytes(c) for c in session.data_to_send()) + raw
            if out:
                await loop.sock_sendall(agent_end, out)

    agent = asyncio.create_task(serve())
    try:
        yield conn
    finally:
        conn.abort(ProtocolError("the test is over"))
        agent.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await agent
        agent_end.close()


def get_with(data: bytes, result: dict[str, Any]) -> Script:
    """A get that sends ``data`` and ends with ``result``."""

    def script(session: AgentSession, request: FileRequested) -> None:
        session.send_output(request.stream, Channel.STDOUT, data, end=True)
        session.file_done(request.stream, result)

    return script


GOOD = b"the real bytes"
SHA = hashlib.sha256(GOOD).hexdigest()


@pytest.mark.parametrize(
    "result",
    [
        {"size": len(GOOD), "sha256": "0" * 64, "mode": 0o644, "mtime_ns": 0},
        {"size": len(GOOD) + 1, "sha256": SHA, "mode": 0o644, "mtime_ns": 0},
        {"size": len(GOOD), "sha256": SHA, "mode": 0o70000, "mtime_ns": 0},
        {"size": len(GOOD), "sha256": SHA, "mtime_ns": 0},
        {"size": len(GOOD), "sha256": SHA, "mode": 0o644, "mtime_ns": "soon"},
    ],
)
@pytest.mark.asyncio
async def test_a_get_that_does_not_add_up_writes_nothing(
    tmp_path: Path, result: dict[str, Any]
) -> None:
    (tmp_path / "kept").write_bytes(b"old")
    async with hostile(get_with(GOOD, result)) as conn:
        with pytest.raises(ProtocolError):
            await files.get_file(conn, "/f", tmp_path / "local")
        assert conn.closed
    async with hostile(get_with(GOOD, result)) as conn:
        with pytest.raises(ProtocolError):
            await files.get_file(conn, "/f", tmp_path / "kept")
    assert os.listdir(tmp_path) == ["kept"] and (tmp_path / "kept").read_bytes() == b"old"


@pytest.mark.asyncio
async def test_a_file_of_a_tree_that_does_not_add_up_is_not_written(tmp_path: Path) -> None:
    def answer(session: AgentSession, request: FileRequested) -> None:
        stream = request.stream
        if request.op == "stat":
            session.file_done(stream, info("dir"))
        elif request.op == "listdir":
            listing = line(name="good", **info()) + line(name="bad", **info())
            session.send_output(stream, Channel.STDOUT, listing, end=True)
            session.file_done(stream, {"entries": 2})
        else:
            sha = SHA if request.request["path"] == "/tree/good" else "0" * 64
            session.send_output(stream, Channel.STDOUT, GOOD, end=True)
            session.file_done(
                stream, {"size": len(GOOD), "sha256": sha, "mode": 0o644, "mtime_ns": 0}
            )

    async with hostile(answer) as conn:
        with pytest.raises(ProtocolError, match="SHA-256"):
            await files.get_tree(conn, "/tree", tmp_path / "local")
    assert os.listdir(tmp_path / "local") == ["good"]
    assert (tmp_path / "local" / "good").read_bytes() == GOOD


@pytest.mark.asyncio
async def test_output_beyond_the_window_is_a_violation(tmp_path: Path) -> None:
    def flood(session: AgentSession, request: FileRequested) -> bytes:
        return encode_frame(request.stream, FrameType.STDOUT, 0, b"x" * 5000)

    async with hostile(flood) as conn:
        with pytest.raises(ProtocolError, match="credit"):
            async for _ in files.read_file(conn, "/f", window=4096):
                pass


@pytest.mark.parametrize(
    "described",
    [
        info("weird"),
        info(size=-1),
        info(mode=0o10000),
        info(uid=True),
        info("symlink", target={"b64": "not base64!"}),
        {"kind": "file"},
    ],
)
@pytest.mark.asyncio
async def test_a_malformed_description_is_a_protocol_error(described: dict[str, Any]) -> None:
    def answer(session: AgentSession, request: FileRequested) -> None:
        session.file_done(request.stream, described)

    async with hostile(answer) as conn:
        with pytest.raises(ProtocolError, match="guest sent"):
            await files.stat(conn, "/f")
        assert conn.closed


@pytest.mark.parametrize(
    "listing",
    [
        line(name="..", **info("dir")),
        line(name=".", **info("dir")),
        line(name="a/b", **info()),
        line(name="", **info()),
        line(name={"b64": base64.b64encode(b"nul\0").decode()}, **info()),
        b'{"name": "no newline"',
        b"[1, 2]\n",
        b'{"name": "x"' + b" " * (300 * 1024) + b"}\n",  # longer than the listing window
    ],
)
@pytest.mark.asyncio
async def test_a_malformed_listing_is_a_protocol_error(listing: bytes) -> None:
    def answer(session: AgentSession, request: FileRequested) -> bytes:
        stream = request.stream
        frames = b""
        for start in range(0, len(listing), 64 * 1024):  # within the host's frame and window
            frames += encode_frame(stream, FrameType.STDOUT, 0, listing[start : start + 64 * 1024])
        return (
            frames
            + encode_frame(stream, FrameType.STDOUT, FLAG_END)
            + encode_json(stream, FrameType.RESULT, {"entries": 1})
        )

    async with hostile(answer) as conn:
        with pytest.raises(ProtocolError):
            await files.listdir(conn, "/d")
        assert conn.closed


@pytest.mark.asyncio
async def test_a_listing_that_miscounts_is_a_protocol_error() -> None:
    def answer(session: AgentSession, request: FileRequested) -> None:
        session.send_output(request.stream, Channel.STDOUT, line(name="a", **info()), end=True)
        session.file_done(request.stream, {"entries": 2})

    async with hostile(answer) as conn:
        with pytest.raises(ProtocolError, match="listed 1 entries"):
            await files.listdir(conn, "/d")


@pytest.mark.asyncio
async def test_get_tree_never_writes_through_a_link_the_guest_lists_as_a_directory(
    tmp_path: Path,
) -> None:
    """The guest lists ``x`` as a link to a directory outside, then ``x`` again as a directory
    holding ``evil``: the host must not create ``evil`` through the link."""
    outside = tmp_path / "outside"
    outside.mkdir()

    def answer(session: AgentSession, request: FileRequested) -> None:
        stream, path = request.stream, request.request["path"]
        if request.op == "stat":
            session.file_done(stream, info("dir"))
        elif request.op == "listdir" and path == "/tree":
            listing = line(name="x", **info("symlink", target=str(outside)))
            listing += line(name="x", **info("dir"))
            session.send_output(stream, Channel.STDOUT, listing, end=True)
            session.file_done(stream, {"entries": 2})
        elif request.op == "listdir":
            session.send_output(stream, Channel.STDOUT, line(name="evil", **info()), end=True)
            session.file_done(stream, {"entries": 1})
        else:
            session.send_output(stream, Channel.STDOUT, b"e", end=True)
            sha = hashlib.sha256(b"e").hexdigest()
            session.file_done(stream, {"size": 1, "sha256": sha, "mode": 0o644, "mtime_ns": 0})

    local = tmp_path / "local"
    async with hostile(answer) as conn:
        with pytest.raises(OSError):  # ELOOP or ENOTDIR: the link is never opened as a directory
            await files.get_tree(conn, "/tree", local)
    assert os.listdir(outside) == []
    assert os.path.islink(local / "x")


@pytest.mark.asyncio
async def test_a_put_answered_with_another_digest_is_a_protocol_error() -> None:
    def answer(session: AgentSession, request: FileRequested) -> None:
        if request.op == "commit":
            session.file_done(request.stream, {"size": 3, "sha256": "f" * 64})

    async with hostile(answer) as conn:
        with pytest.raises(ProtocolError, match="SHA-256"):
            await files.put_file(conn, b"abc", "/f")
        assert conn.closed


@pytest.mark.asyncio
async def test_a_put_answered_before_its_commit_is_a_violation() -> None:
    def answer(session: AgentSession, request: FileRequested) -> bytes | None:
        if request.op == "put":
            return encode_json(request.stream, FrameType.RESULT, {"size": 0})
        return None

    async with hostile(answer) as conn:
        with pytest.raises(ProtocolError, match="before its COMMIT"):
            await files.put_file(conn, b"abc", "/f")

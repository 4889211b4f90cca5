"""The control API attacked over raw HTTP: no token, hostile bodies, odd keys, bad deadlines.

The API runs in this process on TCP loopback with a bearer token, in front
of a server with one well-behaved guest. Every answer must be a clear 4xx,
never a 500, and the token must never appear in a log line or a reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from vsock_async import CommandServer, UsageError, listen
from vsock_async.serve.control_api import ControlAPI
from vsock_async.serve.metrics import ServeMetrics

from .hostile import RawGuest, accept_guest, answer_forever, dial_address

TOKEN = "s3cret-t0ken-that-must-never-be-logged"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> dict[str, object]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


@dataclass
class Api:
    port: int
    server: CommandServer
    key: str
    guest: RawGuest

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        content_length: int | None = None,
    ) -> Reply:
        """One HTTP/1.1 request on a fresh connection; the reply's status and body."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            length = len(body) if content_length is None else content_length
            lines.append(f"Content-Length: {length}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            fields = [line.split(":", 1) for line in head.split("\r\n")[1:] if ":" in line]
            headers = {name.strip().lower(): value.strip() for name, value in fields}
            size = headers.get("content-length")
            # Not read to EOF: a server may linger before closing after a refused body.
            payload = await (reader.readexactly(int(size)) if size else reader.read())
        finally:
            writer.close()
        return Reply(int(head.split(" ", 2)[1]), payload, headers)


@pytest_asyncio.fixture
async def api(socket_dir: str) -> AsyncIterator[Api]:
    async with await listen(
        f"unix:{socket_dir}/g.sock", default_timeout=5, protocol="v1"
    ) as server:
        guest, _ = await accept_guest(server, dial_address(server))
        answering = asyncio.create_task(answer_forever(guest))
        control = ControlAPI(server, ServeMetrics(), token=TOKEN)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        await control.start(sock)
        try:
            yield Api(sock.getsockname()[1], server, str(server.guests[0].key), guest)
        finally:
            await control.stop_accepting()
            await control.aclose()
            guest.close()
            answering.cancel()
            await asyncio.gather(answering, return_exceptions=True)


@pytest.fixture(autouse=True)
def no_token_in_logs(caplog: pytest.LogCaptureFixture) -> AsyncIterator[None]:  # type: ignore[misc]
    caplog.set_level(logging.DEBUG)
    yield
    assert TOKEN not in caplog.text


def run_path(api: Api, key: str | None = None) -> str:
    from urllib.parse import quote

    return f"/v1/guests/{quote(key if key is not None else api.key, safe='')}/run"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        f"{TOKEN}",
        f"Bearer {TOKEN.upper()}",
        "Bearer " + "A" * 4_000,
    ],
)
async def test_requests_without_the_right_token_are_refused(
    api: Api, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path, body in [
        ("GET", "/v1/health", b""),
        ("GET", "/v1/guests", b""),
        ("POST", run_path(api), b'{"command": "echo pwned"}'),
        ("GET", f"/v1/health?token={TOKEN}", b""),
    ]:
        reply = await api.request(method, path, body, headers)
        assert reply.status == 401, (method, path, reply)
        assert TOKEN.encode() not in reply.body
    assert not any(b"pwned" in c for c in api.guest.commands)  # nothing reached the guest


@pytest.mark.asyncio
async def test_an_oversized_authorization_header_is_refused(api: Api) -> None:
    reply = await api.request(
        "GET", "/v1/guests", headers={"Authorization": "Bearer " + "A" * 9000}
    )
    assert reply.status in (400, 431), reply


@pytest.mark.asyncio
async def test_the_right_token_works(api: Api) -> None:
    reply = await api.request("POST", run_path(api), b'{"command": "hi"}', AUTH)
    assert reply.status == 200, reply


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"\xff\xfe",
        b"[1, 2]",
        b'"just a string"',
        b"null",
        b'{"command": NaN}',
        b'{"command": "x", "timeout": Infinity}',
        b'{"command": "x", "timeout": 1e999}',
        b'{"command": "x", "timeout": -1}',
        b'{"command": "x", "timeout": -0.001}',
        b'{"command": "x", "timeout": "5"}',
        b'{"command": "x", "timeout": true}',
        b'{"command": "x", "timeout": 1' + b"0" * 400 + b"}",
        b'{"command": 5}',
        b'{"command": "x", "surprise": 1}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"command": ' * 50_000 + b"1" + b"}" * 50_000,
    ],
)
async def test_hostile_bodies_get_a_clear_400(api: Api, body: bytes) -> None:
    reply = await api.request("POST", run_path(api), body, AUTH)
    assert reply.status == 400, (body[:40], reply)
    assert reply.json()["error"]


@pytest.mark.asyncio
async def test_a_wrong_method_is_405_with_the_allowed_ones(api: Api) -> None:
    reply = await api.request("PUT", run_path(api), b"{}", AUTH)
    assert reply.status == 405 and b'"method_not_allowed"' in reply.body
    assert reply.headers["allow"] == "POST"
    reply = await api.request("POST", run_path(api).removesuffix("/run"), b"", AUTH)
    assert reply.status == 405
    assert {m.strip() for m in reply.headers["allow"].split(",")} == {"GET", "HEAD", "DELETE"}


@pytest.mark.asyncio
async def test_huge_declared_body_is_refused_unread(api: Api) -> None:
    reply = await api.request("POST", run_path(api), b"{}", AUTH, content_length=10**12)
    assert reply.status == 413, reply


@pytest.mark.asyncio
async def test_huge_body_is_refused(api: Api) -> None:
    body = json.dumps({"command": "x" * (5 * 1024 * 1024)}).encode()
    reply = await api.request("POST", run_path(api), body, AUTH)
    assert reply.status == 413, reply
    reply = await api.request("POST", run_path(api), b'{"command": "still fine"}', AUTH)
    assert reply.status == 200


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "key", ["nobody", "../../etc/passwd", "a/b", "\0", "é" * 100, "²", "9" * 5000, "9" * 11]
)
async def test_unknown_or_odd_guest_keys_are_404(api: Api, key: str) -> None:
    reply = await api.request("POST", run_path(api, key), b'{"command": "x"}', AUTH)
    assert reply.status in (404, 414, 400), reply
    assert reply.status != 500


@pytest.mark.asyncio
async def test_library_refuses_a_nan_deadline(api: Api) -> None:
    """NaN is not a number of seconds: a NaN deadline would never fire, or fire at once."""
    channel = api.server.channels[0]
    with pytest.raises(UsageError):
        await channel.run("x", timeout=float("nan"))
    assert not channel.closed

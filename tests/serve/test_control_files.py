"""The control API's file routes, end to end: serve and a real agent as child processes, the
routes over the real Unix control socket through the blocking client."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon_process import Daemon, Stack, short_directory, wait_for_guest
from tests.serve.test_control_api import error_of
from vsock_async.errors import ProtocolError
from vsock_async.serve.control_client import ControlClient, guest_path

MiB = 1024 * 1024


@dataclass
class Files:
    daemon: Daemon
    client: ControlClient
    dir: Path
    """A directory in the (same-machine) guest for the test's files."""


@pytest.fixture(scope="module")
def files() -> Iterator[Files]:
    with short_directory() as directory:
        stack = Stack(directory)
        try:
            daemon = stack.daemon("--probe-interval", "none")
            stack.agent(daemon.guest_address)
            client = daemon.client()
            wait_for_guest(client, "vm1")
            guest_dir = directory / "guest"
            guest_dir.mkdir()
            yield Files(daemon, client, guest_dir)
        finally:
            stack.close()


def pieces(data: bytes, size: int = 100_000) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def download(client: ControlClient, path: str | bytes) -> bytes:
    got: list[bytes] = []
    client.get_file("vm1", path, got.append)
    return b"".join(got)


def test_upload_and_download_stream_byte_exact(files: Files) -> None:
    for size in (0, 1, 3 * MiB + 7):
        data = os.urandom(size)
        target = files.dir / f"f{size}"
        answer = files.client.put_file("vm1", str(target), pieces(data), mode=0o600, mtime=1e9)
        assert answer == {"path": str(target), "size": size}
        assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()
        st = target.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o600, 1e9)
        assert download(files.client, str(target)) == data


def test_stat_list_mkdir_symlink_and_remove(files: Files) -> None:
    client, top = files.client, files.dir / "tree"
    assert client.make_directory("vm1", str(top / "a" / "b"), parents=True, mode=0o750)
    assert stat.S_IMODE((top / "a" / "b").stat().st_mode) == 0o750
    raw = os.path.join(os.fsencode(top), b"raw-\xff")
    with open(raw, "wb") as f:
        f.write(b"x")
    client.make_symlink("vm1", b"raw-\xff", str(top / "link"))
    entries = {e["name"]: e for e in client.list_files("vm1", str(top))}
    assert set(entries) == {"a", "raw-\ufffd", "link"}
    assert base64.b64decode(entries["raw-\ufffd"]["name_b64"]) == b"raw-\xff"
    link = entries["link"]
    assert (link["kind"], base64.b64decode(link["target_b64"])) == ("symlink", b"raw-\xff")
    info = client.stat_file("vm1", raw)
    assert (info["kind"], info["size"], info["name"]) == ("file", 1, "raw-\ufffd")
    assert client.stat_file("vm1", str(top / "link"))["kind"] == "file"
    assert client.stat_file("vm1", str(top / "link"), follow_symlinks=False)["kind"] == "symlink"
    assert download(files.client, str(top / "link")) == b"x"
    err = error_of(lambda: client.remove_file("vm1", str(top)))
    assert (err.status, err.code, err.body["errno"]) == (422, "file_error", "ENOTEMPTY")
    client.remove_file("vm1", str(top), recursive=True)
    assert not top.exists()


def test_guest_errors_are_typed_answers(files: Files) -> None:
    client = files.client
    missing = str(files.dir / "missing")
    for call in (
        lambda: client.stat_file("vm1", missing),
        lambda: client.get_file("vm1", missing, lambda piece: None),
        lambda: client.put_file("vm1", missing + "/x", [b"x"], make_parents=False),
    ):
        err = error_of(call)
        assert (err.status, err.code, err.body["errno"]) == (404, "file_not_found", "ENOENT")
        assert err.body["path"].startswith(missing)
    err = error_of(lambda: client.get_file("vm1", str(files.dir), print))
    assert (err.status, err.code, err.body["errno"]) == (422, "file_error", "EISDIR")


@pytest.mark.parametrize(
    "query",
    [
        "",
        "path=relative",
        "path=%2Fa&path_b64=Lw%3D%3D",
        "path_b64=!!",
        "path=%2Fa%00b",
        "path=%2Fa&mode=9",
        "path=%2Fa&make_parents=maybe",
        "path=%2Fa&mtime=yesterday",
        "path=%2Fa&uid=-1",
    ],
)
def test_bad_file_queries_are_400(files: Files, query: str) -> None:
    err = error_of(lambda: files.client.request("PUT", f"{guest_path('vm1')}/files?{query}", b"x"))
    assert (err.status, err.code) == (400, "bad_request")


def test_a_download_cut_short_is_never_taken_for_the_file(files: Files) -> None:
    """The file shrinks while it is read: the guest's digest still matches what it sent, so
    this one completes; a guest whose transfer fails after the first byte cuts the body
    short, which the client reports (checked with the agent gone mid-file)."""
    big = files.dir / "big"
    big.write_bytes(os.urandom(64 * MiB))
    got = 0

    def sink(piece: bytes) -> None:
        nonlocal got
        got += len(piece)
        if got > MiB and big.exists():
            files.client.drop("vm1")  # the guest's connection goes mid-file
            big.unlink()

    with pytest.raises(ProtocolError, match="cut the file short"):
        files.client.get_file("vm1", str(big), sink)
    assert got < 64 * MiB
    wait_for_guest(files.client, "vm1")  # the agent dials again


def test_paths_that_are_not_utf8_go_by_b64(files: Files) -> None:
    name = os.path.join(os.fsencode(files.dir), b"odd-\xfe\n name")
    files.client.put_file("vm1", name, [b"odd"])
    with open(name, "rb") as f:
        assert f.read() == b"odd"
    query = urllib.parse.urlencode({"path_b64": base64.b64encode(name).decode()})
    reply = files.client.request("GET", f"{guest_path('vm1')}/files/stat?{query}")
    assert b'"size": 3' in reply.body

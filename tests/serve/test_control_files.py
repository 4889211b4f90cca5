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

from tests.daemon_process import (
    Daemon,
    Stack,
    serve_with_agent,
    short_directory,
    stack,
    wait_for_guest,
)
from tests.serve.test_control_api import error_of
from vsock_async.errors import ProtocolError
from vsock_async.serve.control_client import ControlClient, guest_path

__all__ = ["stack"]  # the fixture

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
    answer = client.set_attributes("vm1", str(top / "a"), mode=0o2711, mtime=1_500_000_000.25)
    st = (top / "a").stat()
    assert answer == {"path": str(top / "a")}
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o2711, 1_500_000_000_250_000_000)
    client.set_attributes("vm1", raw, mode=0o604)
    assert stat.S_IMODE(os.stat(raw).st_mode) == 0o604
    err = error_of(lambda: client.set_attributes("vm1", str(top / "link"), mode=0o777))
    assert (err.status, err.code, err.body["errno"]) in {
        (422, "file_error", "ELOOP"),
        (422, "file_error", "EINVAL"),
    }
    err = error_of(lambda: client.remove_file("vm1", str(top)))
    assert (err.status, err.code, err.body["errno"]) == (422, "file_error", "ENOTEMPTY")
    client.remove_file("vm1", str(top), recursive=True)
    assert not top.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="owning files by another user needs root")
def test_mkdir_and_symlink_take_an_owner(files: Files) -> None:
    top = files.dir / "owned"
    files.client.make_directory("vm1", str(top), uid=1234, gid=5678)
    files.client.make_symlink("vm1", "nowhere", str(top / "link"), gid=4321)
    assert os.stat(top)[4:6] == (1234, 5678)
    assert os.lstat(top / "link")[4:6] == (0, 4321)


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


@pytest.mark.parametrize(
    "query",
    [
        "path=%2Ftmp",  # nothing to set
        "path=relative&mode=644",
        "path=%2Ftmp&mode=8",
        "path=%2Ftmp&mode=17777",  # above 0o7777: refused by the library
        "path=%2Ftmp&mtime=-1",
        "path=%2Ftmp&mtime=nan",
    ],
)
def test_bad_attribute_changes_are_400_and_change_nothing(files: Files, query: str) -> None:
    before = os.stat("/tmp")
    err = error_of(
        lambda: files.client.request("POST", f"{guest_path('vm1')}/files/attributes?{query}")
    )
    assert (err.status, err.code) == (400, "bad_request")
    after = os.stat("/tmp")
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


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


def file_metrics(client: ControlClient) -> dict[str, float]:
    """The file counters of ``/metrics``, by their line's name and labels."""
    found = {}
    for line in client.metrics().splitlines():
        if line.startswith(("vsock_async_file_operations_total{", "vsock_async_file_bytes_total{")):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def ops(op: str, outcome: str) -> str:
    return f'vsock_async_file_operations_total{{op="{op}",outcome="{outcome}"}}'


def test_metrics_count_file_operations_by_route_and_outcome_and_bytes() -> None:
    with serve_with_agent() as (daemon, directory):
        client = daemon.client()
        before = file_metrics(client)
        assert len(before) == 8 * 4 + 2 and set(before.values()) == {0.0}
        work = directory / "guest"
        work.mkdir()
        sizes = (1000, 0, 2 * MiB + 1)
        for i, size in enumerate(sizes):
            client.put_file("vm1", str(work / f"f{i}"), pieces(os.urandom(size)))
        missing = str(work / "missing" / "x")
        error_of(lambda: client.put_file("vm1", missing, [], make_parents=False))
        for i in (0, 2):
            download(client, str(work / f"f{i}"))
        error_of(lambda: client.get_file("vm1", missing, print))
        client.stat_file("vm1", str(work))
        client.list_files("vm1", str(work))
        client.make_directory("vm1", str(work / "d"))
        error_of(lambda: client.make_directory("vm1", str(work / "d")))
        client.make_symlink("vm1", "f0", str(work / "link"))
        client.set_attributes("vm1", str(work / "d"), mode=0o700)
        error_of(lambda: client.set_attributes("vm1", str(work / "link"), mode=0o700))
        client.remove_file("vm1", str(work / "link"))
        error_of(lambda: client.remove_file("vm1", str(work / "link")))
        counted = file_metrics(client)
        assert {k: v for k, v in counted.items() if v} == {
            ops("put", "ok"): 3,
            ops("put", "file_error"): 1,
            ops("get", "ok"): 2,
            ops("get", "file_error"): 1,
            ops("stat", "ok"): 1,
            ops("list", "ok"): 1,
            ops("mkdir", "ok"): 1,
            ops("mkdir", "file_error"): 1,
            ops("symlink", "ok"): 1,
            ops("attributes", "ok"): 1,
            ops("attributes", "file_error"): 1,
            ops("delete", "ok"): 1,
            ops("delete", "file_error"): 1,
            'vsock_async_file_bytes_total{direction="upload"}': sum(sizes),
            'vsock_async_file_bytes_total{direction="download"}': 1000 + 2 * MiB + 1,
        }
        # A download cut short after its first byte failed, whatever its answer's status.
        big = work / "big"
        big.write_bytes(os.urandom(64 * MiB))

        def sink(piece: bytes) -> None:
            if big.exists():
                client.drop("vm1")
                big.unlink()

        with pytest.raises(ProtocolError, match="cut the file short"):
            client.get_file("vm1", str(big), sink)
        after = file_metrics(client)
        assert after[ops("get", "failed")] == 1 and after[ops("get", "ok")] == 2
        downloaded = 'vsock_async_file_bytes_total{direction="download"}'
        assert after[downloaded] > counted[downloaded]


def test_metrics_count_file_operations_a_v1_guest_refuses(stack: Stack) -> None:
    daemon = stack.daemon("--probe-interval", "none", "--protocol", "v1")
    stack.agent(daemon.guest_address)
    client = daemon.client()
    wait_for_guest(client, "vm1")
    err = error_of(lambda: client.stat_file("vm1", "/"))
    assert (err.status, err.code) == (409, "unsupported")
    counted = file_metrics(client)
    assert {k: v for k, v in counted.items() if v} == {ops("stat", "refused"): 1}

"""``vsock-async cp`` as a child process against a real ``serve`` and a real agent: files and
trees both ways (links as links, odd names), stdin and stdout, into existing directories,
errors and exit statuses."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon_process import (
    LONG,
    Daemon,
    python_m,
    serve_with_agent,
)

ODD = ["with space", "new\nline", "ünï"]
RAW = b"raw-\xff"


@dataclass
class Served:
    daemon: Daemon
    directory: Path

    def cp(self, *args: str | bytes, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*python_m("cp", "--control", f"unix:{self.daemon.control_socket}"), *args],
            input=stdin,
            capture_output=True,
            timeout=LONG,
            check=False,
        )

    def fresh(self, name: str) -> Path:
        path = self.directory / name
        path.mkdir()
        return path


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with serve_with_agent() as (daemon, directory):
        yield Served(daemon, directory)


def tree(root: Path) -> dict[bytes, tuple[str, bytes | int]]:
    """Relative path -> (kind, content, link target or mode), links never followed; a
    directory's kind carries its mtime."""
    found: dict[bytes, tuple[str, bytes | int]] = {}
    base = os.fsencode(root)
    for directory, dirs, names in os.walk(base):
        for name in dirs + names:
            full = os.path.join(directory, name)
            rel = os.path.relpath(full, base)
            if os.path.islink(full):
                found[rel] = ("link", os.readlink(full))
            elif os.path.isdir(full):
                st = os.stat(full)
                found[rel] = (f"dir {st.st_mtime_ns}", stat.S_IMODE(st.st_mode))
            elif not os.path.isfile(full):
                found[rel] = ("other", 0)
            else:
                with open(full, "rb") as f:
                    found[rel] = (oct(stat.S_IMODE(os.stat(full).st_mode)), f.read())
    return found


def test_a_file_goes_in_and_out_keeping_mode_and_mtime(served: Served) -> None:
    work = served.fresh("file")
    local = work / "data.bin"
    local.write_bytes(os.urandom(3 * 1024 * 1024 + 1))
    os.chmod(local, 0o640)
    os.utime(local, (1_000_000_000, 1_000_000_000))
    guest = work / "guest"
    guest.mkdir()
    done = served.cp(str(local), f"vm1:{guest}")  # into an existing directory: its name
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    landed = guest / "data.bin"
    assert landed.read_bytes() == local.read_bytes()
    assert (stat.S_IMODE(landed.stat().st_mode), landed.stat().st_mtime) == (0o640, 1e9)
    back = served.cp(f"vm1:{landed}", str(work / "back.bin"))
    assert back.returncode == 0, back.stderr
    assert (work / "back.bin").read_bytes() == local.read_bytes()
    assert stat.S_IMODE((work / "back.bin").stat().st_mode) == 0o640
    assert [n for n in os.listdir(work) if n.startswith(".vsock_async")] == []


def test_stdin_and_stdout_and_the_only_guest(served: Served) -> None:
    target = served.fresh("pipe") / "from-stdin"
    assert served.cp("-", f":{target}", stdin=b"piped bytes\0\xff").returncode == 0
    assert target.read_bytes() == b"piped bytes\0\xff"
    out = served.cp(f":{target}", "-")
    assert (out.returncode, out.stdout) == (0, b"piped bytes\0\xff")


def test_trees_go_both_ways_links_as_links(served: Served) -> None:
    work = served.fresh("trees")
    src = work / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    for name in ODD:
        (src / name).write_bytes(name.encode())
    with open(os.path.join(os.fsencode(src / "sub"), RAW), "wb") as f:
        f.write(b"raw")
    (src / "sub" / "deeper" / "f").write_bytes(b"deep")
    os.chmod(src / "sub" / "deeper" / "f", 0o600)
    os.symlink("deeper/f", src / "sub" / "link")
    os.symlink("/etc", src / "outside")  # copied as a link, never followed
    os.mkfifo(src / "fifo")
    (src / "private").mkdir(mode=0o700)
    (src / "private" / "f").write_bytes(b"p")
    # Directories keep exact modes, a read-only one (filled all the same) and their mtimes,
    # set after their entries.
    for directory, mode, when in (
        (src / "sub" / "deeper", 0o555, 1_100_000_000),
        (src / "sub", 0o751, 1_200_000_000),
        (src / "private", 0o700, 1_300_000_000),
        (src, 0o750, 1_400_000_000),
    ):
        os.chmod(directory, mode)
        os.utime(directory, (when, when))
    into = served.cp(str(src), f"vm1:{work / 'guest-copy'}")  # made: takes the contents
    assert into.returncode == 0, into.stderr
    assert b"skipped" in into.stderr and b"fifo" in into.stderr
    expected = {k: v for k, v in tree(src).items() if not k.endswith(b"fifo")}
    assert tree(work / "guest-copy") == expected
    top = os.stat(work / "guest-copy")
    assert (stat.S_IMODE(top.st_mode), top.st_mtime) == (0o750, 1_400_000_000)
    out = served.cp(f"vm1:{work / 'guest-copy'}", str(work / "back"))
    assert out.returncode == 0, out.stderr
    assert tree(work / "back") == expected
    (work / "existing").mkdir()
    again = served.cp(f"vm1:{work / 'guest-copy'}", str(work / "existing"))
    assert again.returncode == 0, again.stderr
    assert tree(work / "existing" / "guest-copy") == expected
    # SOURCE/. into an existing guest directory: the entries merged in; the directory keeps
    # its own mode (as with docker cp: `cp . guest:/tmp` leaves /tmp's 1777 be).
    shared = work / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    merged = served.cp(f"{src}/.", f"vm1:{shared}")
    assert merged.returncode == 0, merged.stderr
    assert tree(shared) == expected
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    # SOURCE/. to a guest directory not there yet (a trailing / or not): made, as SOURCE's copy.
    for new in ("new-slash/", "new-plain"):
        made = served.cp(f"{src}/.", f"vm1:{work / new}")
        assert made.returncode == 0, made.stderr
        assert tree(work / new) == expected
        assert stat.S_IMODE((work / new).stat().st_mode) == 0o750
    # ...and the same rule out of the guest: GUEST:DIR/. merges into a local directory.
    local_shared = work / "local-shared"
    local_shared.mkdir()
    os.chmod(local_shared, 0o1777)
    out = served.cp(f"vm1:{work / 'guest-copy'}/.", str(local_shared))
    assert out.returncode == 0, out.stderr
    assert tree(local_shared) == expected
    assert stat.S_IMODE(local_shared.stat().st_mode) == 0o1777


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("a", "b"), b"one side of cp is GUEST:PATH"),
        (("vm1:/a", "vm1:/b"), b"one side of cp is GUEST:PATH"),
        (("vm1:relative", "x"), b"absolute"),
    ],
)
def test_bad_arguments_exit_2(served: Served, args: tuple[str, str], fragment: bytes) -> None:
    result = served.cp(*args)
    assert result.returncode == 2 and fragment in result.stderr


def test_failures_exit_1_with_the_reason_and_leave_nothing(served: Served) -> None:
    work = served.fresh("fail")
    missing = served.cp(f"vm1:{work / 'nope'}", str(work / "local"))
    assert missing.returncode == 1
    assert b"vsock-async cp:" in missing.stderr and b"No such file" in missing.stderr
    assert os.listdir(work) == []
    unknown = served.cp(str(served.directory), "nosuchguest:/x")
    assert unknown.returncode == 1 and b"nosuchguest" in unknown.stderr
    local_missing = served.cp(str(work / "absent"), f"vm1:{work / 'x'}")
    assert local_missing.returncode == 1 and b"absent" in local_missing.stderr
    to_dir = served.cp("-", f"vm1:{work}")
    assert to_dir.returncode == 2 and b"directory" in to_dir.stderr

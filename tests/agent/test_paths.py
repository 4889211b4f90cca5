"""Resolving guest paths under the files root, on a real file system with links of every kind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vsock_async.agent.paths import MAX_PATH, FilesRoot, Resolved


def b(path: Path | str) -> bytes:
    return os.fsencode(path)


def where(resolved: Resolved) -> tuple[bytes, bytes | None]:
    """The directory's path and the name, closing the descriptor."""
    with resolved:
        return b"/" + b"/".join(resolved.parts), resolved.name


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``jail/{sub/f, in-link -> sub, abs-link -> <jail>/sub, out -> ../outside, loop -> loop,
    file-link -> sub/f, chain -> in-link}`` and ``outside/secret``."""
    jail = tmp_path / "jail"
    (jail / "sub").mkdir(parents=True)
    (jail / "sub" / "f").write_bytes(b"f")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"s")
    os.symlink("sub", jail / "in-link")
    os.symlink(jail / "sub", jail / "abs-link")
    os.symlink("../outside", jail / "out")
    os.symlink("loop", jail / "loop")
    os.symlink("sub/f", jail / "file-link")
    os.symlink("in-link", jail / "chain")
    return tmp_path


def test_links_are_followed_in_the_middle_and_at_the_end_only_when_asked(tree: Path) -> None:
    root = FilesRoot("/")
    jail = tree / "jail"
    assert where(root.resolve(b(jail / "in-link" / "f"), follow=True)) == (b(jail / "sub"), b"f")
    assert where(root.resolve(b(jail / "chain" / "f"), follow=False)) == (b(jail / "sub"), b"f")
    assert where(root.resolve(b(jail / "abs-link" / "f"), follow=True)) == (b(jail / "sub"), b"f")
    assert where(root.resolve(b(jail / "file-link"), follow=False)) == (b(jail), b"file-link")
    assert where(root.resolve(b(jail / "file-link"), follow=True)) == (b(jail / "sub"), b"f")
    assert where(root.resolve(b(jail / "in-link"), follow=True)) == (b(jail), b"sub")
    # A last name that does not exist yet is fine (a put creates it).
    assert where(root.resolve(b(jail / "sub" / "new"), follow=True)) == (b(jail / "sub"), b"new")


def test_dot_dot_walks_the_real_parent_and_stops_at_the_top(tree: Path) -> None:
    root = FilesRoot("/")
    jail = tree / "jail"
    # in-link/.. is jail (the link's target's parent), as the kernel resolves it.
    assert where(root.resolve(b(jail / "in-link" / ".." / "sub" / "f"), follow=True)) == (
        b(jail / "sub"),
        b"f",
    )
    assert where(root.resolve(b"/../../" + b(tree)[1:], follow=True)) == (
        b(tree.parent),
        b(tree.name),
    )
    assert where(root.resolve(b"/", follow=True)) == (b"/", None)
    assert where(root.resolve(b(jail) + b"/sub/..", follow=False)) == (b(jail), None)
    assert where(root.resolve(b(jail) + b"//./sub/", follow=False)) == (b(jail), b"sub")


@pytest.mark.parametrize(
    ("path", "follow", "code"),
    [
        ("jail/loop/x", True, errno.ELOOP),
        ("jail/loop", True, errno.ELOOP),
        ("jail/sub/f/x", True, errno.ENOTDIR),
        ("jail/missing/x", True, errno.ENOENT),
    ],
)
def test_what_cannot_be_walked(tree: Path, path: str, follow: bool, code: int) -> None:
    with pytest.raises(OSError) as caught:
        FilesRoot("/").resolve(b(tree / path), follow=follow)
    assert caught.value.errno == code


def test_malformed_paths() -> None:
    root = FilesRoot("/")
    for path, code in ((b"relative", errno.EINVAL), (b"/" + b"a" * MAX_PATH, errno.ENAMETOOLONG)):
        with pytest.raises(OSError) as caught:
            root.resolve(path, follow=True)
        assert caught.value.errno == code


def test_the_root_confines_the_walks_end_wherever_links_lead(tree: Path) -> None:
    jail = tree / "jail"
    root = FilesRoot(str(jail))
    assert where(root.resolve(b(jail / "abs-link" / "f"), follow=True)) == (b(jail / "sub"), b"f")
    assert where(root.resolve(b(jail), follow=True)) == (b(tree), b"jail")  # the root itself
    assert where(root.resolve(b(jail / "out"), follow=False)) == (b(jail), b"out")  # the link
    for path, follow in (
        (jail / "out" / "secret", True),
        (jail / "out", True),
        (jail / ".." / "outside" / "secret", False),
        (tree / "outside", False),
        (jail / "sub" / ".." / "..", False),
        (Path("/"), True),
    ):
        with pytest.raises(PermissionError, match="files root"):
            root.resolve(b(path), follow=follow)


def test_parents_are_made_only_under_the_root(tree: Path) -> None:
    jail = tree / "jail"
    root = FilesRoot(str(jail))
    assert where(root.resolve(b(jail / "a" / "b" / "c"), follow=False, make_parents=True)) == (
        b(jail / "a" / "b"),
        b"c",
    )
    assert (jail / "a" / "b").is_dir()
    with pytest.raises(PermissionError):
        root.resolve(b(tree / "made" / "here"), follow=False, make_parents=True)
    with pytest.raises(PermissionError):
        root.resolve(b(jail / "out" / "made" / "x"), follow=False, make_parents=True)
    assert not (tree / "made").exists() and sorted(os.listdir(tree / "outside")) == ["secret"]
    with pytest.raises(FileNotFoundError):
        root.resolve(b(jail / "x" / "y"), follow=False)


def test_a_directory_moved_out_of_the_root_after_the_walk_is_caught(tree: Path) -> None:
    """The descriptor follows the move; where the directory is now is what counts."""
    jail = tree / "jail"
    root = FilesRoot(str(jail))
    (jail / "sub" / "deeper").mkdir()
    with root.resolve(b(jail / "sub" / "deeper" / "new"), follow=False) as resolved:
        resolved.confirm()
        os.rename(jail / "sub", jail / "moved-inside")
        resolved.confirm()  # still under the root
        os.rename(jail / "moved-inside", tree / "outside" / "sub")
        with pytest.raises(PermissionError, match="moved outside the agent's files root") as out:
            resolved.confirm()
        assert out.value.errno == errno.EACCES
        assert not root.holds(resolved.dir_fd)
    with root.resolve(b(jail), follow=True) as top:  # the root's parent is outside, not moved
        assert root.holds(top.dir_fd) is False
    whole = FilesRoot("/")
    with whole.resolve(b(tree / "outside" / "sub" / "deeper" / "x"), follow=False) as anywhere:
        anywhere.confirm()  # "/" holds everything


def test_the_root_is_an_existing_directory_with_its_links_resolved(tree: Path) -> None:
    os.symlink(tree / "jail", tree / "alias")
    assert FilesRoot(str(tree / "alias")).path == b(tree / "jail")
    with pytest.raises(NotADirectoryError):
        FilesRoot(str(tree / "jail" / "sub" / "f"))
    with pytest.raises(NotADirectoryError):
        FilesRoot(str(tree / "missing"))


def test_no_descriptor_is_left_open(tree: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    root = FilesRoot(str(tree / "jail"))
    for _ in range(50):
        where(root.resolve(b(tree / "jail" / "chain" / ".." / "abs-link" / "f"), follow=True))
        with pytest.raises(OSError):
            root.resolve(b(tree / "jail" / "out" / "secret"), follow=True)
        with pytest.raises(OSError):
            root.resolve(b(tree / "jail" / "loop"), follow=True)
    assert len(os.listdir("/proc/self/fd")) == before

"""Build the VM tier's guest: a Debian cloud kernel and an initramfs holding this machine's Python.

The base initramfs (busybox, the vsock modules, the interpreter running pytest with its
stdlib and shared libraries, and the test dependencies) is cached under
``~/.cache/vsock_async/vm`` keyed by kernel, Python and package versions. Each run appends a
small payload archive with the project's current source, so editing code never needs a
rebuild. Nothing is compressed: under TCG the guest kernel unpacks the 70 MB raw archive in
1.5 s but needs 3.8 s for its zstd form, and the cache can afford the disk space.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import py_compile
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = Path(__file__).resolve().parents[2]
VM_DEPS_SCRIPT = PROJECT / "scripts" / "vm-deps.sh"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# Load order comes from each module's depends= field; vhost_vsock lets a socket bind CID 2
# exactly as on a real host.
VSOCK_MODULES = (
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vsock_loopback",
    "vhost_iotlb",
    "vhost",
    "vhost_vsock",
)
GUEST_DISTRIBUTIONS = ("pytest", "pytest-asyncio", "anyio", "hypothesis")
GUEST_MODULE_DIR = Path("/lib/vsock-modules")
STDLIB_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "tkinter",
        "idlelib",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "site-packages",
        "__pycache__",
    }
)
SKIPPED_EXTENSIONS = re.compile(r"^(_tkinter|_test|_xxtest|xxlimited|xxsubtype)")
PAYLOAD_SKIP_DIRS = frozenset(
    {"__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache"}
)
INIT_SCRIPT = Path(__file__).with_name("init.sh")
CACHED_IMAGES = 4


class VmUnavailable(RuntimeError):
    """QEMU, the kernel or a build tool cannot be had on this machine: the tier cannot run."""


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel: its image and the vsock modules, named so a glob sorts them."""

    release: str
    vmlinuz: Path
    module_dir: Path


@dataclass(frozen=True)
class BaseImage:
    """A cached base initramfs and what the payload and the runner need to know about it."""

    kernel: Kernel
    initramfs: Path
    python: Path
    site_dirs: tuple[str, ...]
    """Where the guest finds the test dependencies: their host sys.path entries, in order."""
    distributions: frozenset[str]
    """Canonical names of the distributions the guest has."""
    built: bool
    """True if this call built it (and perhaps fetched the kernel), False if it was cached."""


def cache_root() -> Path:
    """Where kernels and base images live; VSOCK_ASYNC_VM_CACHE overrides the XDG default."""
    override = os.environ.get("VSOCK_ASYNC_VM_CACHE")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vsock_async" / "vm"


@contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    """Serialise builders: CI may start several pytest sessions on one machine at once."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(args: list[str], *, cwd: Path | None = None) -> str:
    """Run a build command; raise VmUnavailable with its output when it fails."""
    try:
        proc = subprocess.run(
            args, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise VmUnavailable(f"cannot run {args[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise VmUnavailable(
            f"`{' '.join(args)}` failed with exit code {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return proc.stdout


def _can_apt() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def _host_tools_present() -> bool:
    return all(shutil.which(tool) for tool in ("qemu-system-x86_64", "busybox"))


def ensure_host_tools() -> None:
    """Make sure qemu and busybox exist; scripts/vm-deps.sh installs them when it can."""
    if _host_tools_present():
        return
    try:
        _run(["bash", str(VM_DEPS_SCRIPT)])
    except VmUnavailable as exc:
        raise VmUnavailable(f"qemu-system-x86_64 or busybox is missing: {exc}") from None
    if not _host_tools_present():
        raise VmUnavailable(f"qemu-system-x86_64 or busybox still missing after {VM_DEPS_SCRIPT}")


def _kernel_package() -> str:
    """The versioned kernel package the cloud meta-package depends on (refreshing apt once)."""
    for attempt in range(2):
        try:
            depends = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
        except VmUnavailable:
            depends = ""
        found = re.search(r"Depends:\s*(linux-image-\S+)", depends)
        if found:
            return found.group(1)
        if attempt == 0 and _can_apt():
            _run(["apt-get", "update", "-qq"])
    raise VmUnavailable(f"apt-cache knows no {KERNEL_META_PACKAGE}: cannot pick a guest kernel")


def _module_order(paths: dict[str, Path]) -> list[str]:
    """Topologically sort modules by the depends= field of their .modinfo section."""
    depends: dict[str, list[str]] = {}
    for name, path in paths.items():
        found = re.search(rb"depends=([\w,-]*)", path.read_bytes())
        depends[name] = [d for d in (found.group(1).decode().split(",") if found else []) if d]
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for dep in depends[name]:
            if dep not in depends:
                raise VmUnavailable(f"module {name} needs {dep}, which the guest does not carry")
            visit(dep)
        order.append(name)

    for name in VSOCK_MODULES:
        visit(name)
    return order


def fetch_kernel(root: Path) -> Kernel:
    """Download and unpack the cloud kernel once; later calls reuse the cached copy."""
    try:
        package = _kernel_package()
    except VmUnavailable:
        cached = sorted(root.glob("kernel-*/vmlinuz"), key=lambda p: p.stat().st_mtime)
        if not cached:
            raise
        package = cached[-1].parent.name.removeprefix("kernel-")
    target = root / f"kernel-{package}"
    if (target / "vmlinuz").exists():
        return _kernel_from(target)
    with tempfile.TemporaryDirectory(dir=root) as tmp_name:
        tmp = Path(tmp_name)
        try:
            _run(["apt-get", "download", package], cwd=tmp)
        except VmUnavailable:
            if not _can_apt():
                raise
            _run(["apt-get", "update", "-qq"])
            _run(["apt-get", "download", package], cwd=tmp)
        (deb,) = tmp.glob("*.deb")
        _run(["dpkg-deb", "-x", str(deb), str(tmp / "x")])
        (vmlinuz,) = (tmp / "x" / "boot").glob("vmlinuz-*")
        release = vmlinuz.name.removeprefix("vmlinuz-")
        modules = {
            path.name.removesuffix(".ko"): path
            for path in (tmp / "x" / "lib" / "modules" / release).rglob("*.ko")
            if path.name.removesuffix(".ko") in VSOCK_MODULES
        }
        missing = set(VSOCK_MODULES) - set(modules)
        if missing:
            raise VmUnavailable(f"{package} lacks the modules {sorted(missing)}")
        staged = tmp / "kernel"
        (staged / "modules").mkdir(parents=True)
        shutil.copy(vmlinuz, staged / "vmlinuz")
        for index, name in enumerate(_module_order(modules)):
            shutil.copy(modules[name], staged / "modules" / f"{index:02d}-{name}.ko")
        (staged / "release").write_text(release)
        staged.rename(target)
    return _kernel_from(target)


def _kernel_from(directory: Path) -> Kernel:
    return Kernel(
        release=(directory / "release").read_text().strip(),
        vmlinuz=directory / "vmlinuz",
        module_dir=directory / "modules",
    )


class CpioWriter:
    """Write a cpio "newc" archive, the format the kernel unpacks as an initramfs.

    Parent directories are emitted before their contents because the kernel's unpacker
    does not create them.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._inode = 1
        self._dirs: set[str] = {"/"}

    def _header(self, name: str, mode: int, size: int, mtime: int, rdev: tuple[int, int]) -> None:
        encoded = name.lstrip("/").encode() + b"\0"
        fields = (
            self._inode,
            mode,
            0,
            0,
            2 if stat.S_ISDIR(mode) else 1,
            mtime,
            size,
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        self._inode += 1
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        self._out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))

    def _parents(self, path: str) -> None:
        parent = os.path.dirname(path)
        if parent not in self._dirs:
            self.directory(parent)

    def directory(self, path: str, mode: int = 0o755) -> None:
        if path in self._dirs:
            return
        self._parents(path)
        self._dirs.add(path)
        self._header(path, stat.S_IFDIR | mode, 0, 0, (0, 0))

    def data(self, path: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        self._parents(path)
        self._header(path, stat.S_IFREG | mode, len(data), mtime, (0, 0))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def file(self, path: str, source: Path) -> None:
        """Add a copy of source, keeping its permission bits and mtime (pyc checks use it)."""
        info = source.stat()
        self.data(path, source.read_bytes(), stat.S_IMODE(info.st_mode), int(info.st_mtime))

    def symlink(self, path: str, target: str) -> None:
        self._parents(path)
        encoded = target.encode()
        self._header(path, stat.S_IFLNK | 0o777, len(encoded), 0, (0, 0))
        self._out.write(encoded + b"\0" * (-len(encoded) % 4))

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(path)
        self._header(path, stat.S_IFCHR | mode, 0, 0, (major, minor))

    def close(self) -> None:
        self._header("TRAILER!!!", 0, 0, 0, (0, 0))


def _shared_libraries(binaries: Iterable[Path]) -> set[Path]:
    """Every library ldd resolves for the binaries, ld-linux included, at its reported path."""
    libraries: set[Path] = set()
    for binary in binaries:
        proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
        for line in proc.stdout.splitlines():
            found = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if found:
                libraries.add(Path(found.group(1)))
    return libraries


def _stripped(source: Path, scratch: Path) -> Path:
    """A copy of a shared object without symbols: libpython shrinks from 23 MB to 4 MB."""
    target = scratch / f"{hashlib.sha256(str(source).encode()).hexdigest()[:16]}-{source.name}"
    proc = subprocess.run(
        ["strip", "--strip-unneeded", "-o", str(target), str(source)],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        shutil.copy(source, target)
    shutil.copymode(source, target)
    return target


def _distribution_closure(roots: Collection[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions the roots need, following requirements without extras."""
    wanted = {canonicalize_name(root) for root in roots}
    seen: dict[str, importlib.metadata.Distribution] = {}
    pending = list(roots)
    while pending:
        name = canonicalize_name(pending.pop())
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            if name in wanted:
                raise VmUnavailable(f"the guest needs {name}, which is not installed") from None
            continue
        seen[name] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return sorted(seen.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


def _fresh_pyc(source: Path, cached: Path) -> bool:
    """True if cached is bytecode for source as it is now (the import system's own check)."""
    try:
        header = cached.read_bytes()[:16]
    except OSError:
        return False
    info = source.stat()
    expected = (
        importlib.util.MAGIC_NUMBER
        + (0).to_bytes(4, "little")
        + (int(info.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
        + (info.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    )
    return header == expected


class _PythonTree:
    """Adds Python files to an archive at their own paths, with valid bytecode for each source."""

    def __init__(self, cpio: CpioWriter, scratch: Path) -> None:
        self._cpio = cpio
        self._scratch = scratch
        self._compiled = 0

    def add(self, source: Path) -> None:
        self._cpio.file(str(source), source)
        if source.suffix != ".py":
            return
        cached = importlib.util.cache_from_source(str(source))
        pyc = Path(cached)
        if not _fresh_pyc(source, pyc):
            self._compiled += 1
            pyc = self._scratch / f"{self._compiled}.pyc"
            try:
                py_compile.compile(str(source), cfile=str(pyc), doraise=True)
            except py_compile.PyCompileError:
                return
        self._cpio.file(cached, pyc)


def _stdlib_files(stdlib: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [
            d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith("config-")
        ]
        for filename in filenames:
            if not SKIPPED_EXTENSIONS.match(filename) and not filename.endswith((".pyc", ".exe")):
                yield Path(dirpath, filename)


def _interpreter() -> tuple[Path, Path]:
    """The real interpreter binary behind sys.executable (a venv's python is a symlink) and
    its stdlib directory."""
    return Path(os.path.realpath(sys.executable)), Path(sysconfig.get_path("stdlib"))


def _image_key(kernel: Kernel, dists: list[importlib.metadata.Distribution]) -> str:
    python, _ = _interpreter()
    recipe = {
        "kernel": kernel.release,
        "python": [sys.version, str(python)],
        "distributions": [(d.metadata["Name"], d.version, str(d.locate_file(""))) for d in dists],
        "busybox": os.path.realpath(shutil.which("busybox") or ""),
        "builder": hashlib.sha256(
            Path(__file__).read_bytes() + INIT_SCRIPT.read_bytes()
        ).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return f"base-{kernel.release}-py{sys.version_info[0]}.{sys.version_info[1]}-{digest}"


def _write_base(
    cpio: CpioWriter, kernel: Kernel, scratch: Path, dists: list[importlib.metadata.Distribution]
) -> None:
    python, stdlib = _interpreter()
    busybox = Path(os.path.realpath(shutil.which("busybox") or "busybox"))
    for directory in ("/dev", "/proc", "/sys", "/root", "/etc", "/run", "/vmrun"):
        cpio.directory(directory)
    cpio.directory("/tmp", 0o1777)
    cpio.char_device("/dev/console", 5, 1)
    cpio.file("/init", INIT_SCRIPT)
    cpio.file("/bin/busybox", busybox)
    applets = _run([str(busybox), "--list"]).split()
    for applet in applets:
        if applet != "busybox":
            cpio.symlink(f"/bin/{applet}", "busybox")
    for module in sorted(kernel.module_dir.iterdir()):
        cpio.file(str(GUEST_MODULE_DIR / module.name), module)
    cpio.data("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.data("/etc/group", b"root:x:0:\n")

    tree = _PythonTree(cpio, scratch)
    extensions = [python, busybox]
    for source in _stdlib_files(stdlib):
        if source.suffix == ".so":
            extensions.append(source)
            cpio.file(str(source), _stripped(source, scratch))
        else:
            tree.add(source)
    for dist in dists:
        for record in dist.files or []:
            if ".." in record.parts or record.suffix == ".pyc":
                continue
            source = Path(str(dist.locate_file(record)))
            if source.is_file():
                if source.suffix == ".so":
                    extensions.append(source)
                tree.add(source)
    cpio.file(str(python), _stripped(python, scratch))
    for library in sorted(_shared_libraries(extensions)):
        cpio.file(str(library), _stripped(Path(os.path.realpath(library)), scratch))


def _prune(root: Path) -> None:
    """Keep the few base images used last (each run touches its own): every change to the
    builder or the packages makes a new 70 MB image."""
    images = sorted(root.glob("base-*.cpio"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[CACHED_IMAGES:]:
        old.unlink(missing_ok=True)


def base_image() -> BaseImage:
    """The cached base image for this kernel and interpreter, built first if need be."""
    ensure_host_tools()
    root = cache_root()
    with _cache_lock(root):
        kernel = fetch_kernel(root)
        dists = _distribution_closure(GUEST_DISTRIBUTIONS)
        image = root / f"{_image_key(kernel, dists)}.cpio"
        built = not image.exists()
        if built:
            staged = image.with_suffix(f".{os.getpid()}.tmp")
            try:
                with tempfile.TemporaryDirectory(dir=root) as scratch, open(staged, "wb") as out:
                    cpio = CpioWriter(out)
                    _write_base(cpio, kernel, Path(scratch), dists)
                    cpio.close()
                staged.rename(image)
            finally:
                staged.unlink(missing_ok=True)
        os.utime(image)
        _prune(root)
    names = frozenset(canonicalize_name(dist.metadata["Name"]) for dist in dists)
    return BaseImage(kernel, image, _interpreter()[0], _site_dirs(dists), names, built)


def _site_dirs(dists: list[importlib.metadata.Distribution]) -> tuple[str, ...]:
    found = {str(dist.locate_file("")) for dist in dists}
    ordered = [entry for entry in sys.path if entry in found]
    return (*ordered, *sorted(found - set(ordered)))


def _project_files(project: Path, extra_dirs: Iterable[str] = ()) -> Iterator[Path]:
    yield project / "pyproject.toml"
    for top in ("vsock_async", "tests", *extra_dirs):
        for dirpath, dirnames, filenames in os.walk(project / top):
            dirnames[:] = [d for d in dirnames if d not in PAYLOAD_SKIP_DIRS]
            for filename in filenames:
                if not filename.endswith(".pyc"):
                    yield Path(dirpath, filename)


def write_initrd(
    base: BaseImage,
    project: Path,
    run_script: str,
    target: Path,
    *,
    extra_dirs: Iterable[str] = (),
) -> None:
    """Concatenate the cached base and a payload archive holding /vmrun/run.sh and the project
    at its own absolute path (so guest tracebacks and node ids match the host's), compiled:
    every agent process the tests start would otherwise compile the package again.
    ``extra_dirs`` names more top-level project directories to carry (``benchmarks``)."""
    shutil.copyfile(base.initramfs, target)
    with open(target, "ab") as out, tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        cpio = CpioWriter(out)
        cpio.data("/vmrun/run.sh", run_script.encode(), 0o755)
        tree = _PythonTree(cpio, Path(scratch))
        for source in _project_files(project, extra_dirs):
            if source.is_file():
                tree.add(source)
        cpio.close()

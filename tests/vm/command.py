"""Run one Python command inside the VM tier's guest and hand back its standard output.

For payloads that are not pytest, such as the AF_VSOCK benchmarks (``python -m benchmarks.vm``):
the same image, project payload and QEMU boot as the tests, with the command's stdout sent to
the report port and its stderr to the console.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import image, runner

__all__ = ["CommandRun", "run_python"]


@dataclass(frozen=True)
class CommandRun:
    """How the command ended in the guest, what it printed, and how the boot went."""

    stdout: str
    exit_status: int | None
    """None when the guest never reported one (see ``failure`` and ``console_tail``)."""
    failure: str | None
    accel: str
    seconds: float
    console_tail: str
    workdir: Path | None
    """Kept when asked to, or when the run failed; None once removed."""


def _script(base: image.BaseImage, args: Sequence[str]) -> str:
    path = ":".join((*base.site_dirs, str(image.PROJECT)))
    command = [str(base.python), *args]
    return "\n".join(
        [
            f"cd {shlex.quote(str(image.PROJECT))} || exit 70",
            f"export PYTHONPATH={shlex.quote(path)} PYTHONUTF8=1",
            f"exec {shlex.join(command)} >/dev/ttyS1",
            "",
        ]
    )


def _split_report(text: str) -> tuple[str, int | None]:
    """The command's output, and the exit status the guest's init appends as its last line."""
    body, _, last = text.rstrip("\n").rpartition("\n")
    try:
        record = json.loads(last)
    except ValueError:
        return text, None
    if isinstance(record, dict) and record.get("event") == "exit":
        return body + "\n" if body else "", int(record["status"])
    return text, None


def run_python(
    args: Sequence[str],
    *,
    extra_dirs: Iterable[str] = (),
    memory_mib: int = runner.GUEST_MEMORY_MIB,
    timeout: float = 600.0,
    keep: bool = False,
) -> CommandRun:
    """Boot the guest, run ``python ARGS`` from the project root there, power off.

    ``extra_dirs`` are project directories to carry besides ``vsock_async`` and ``tests``.
    Raises ``image.VmUnavailable`` when QEMU or the kernel cannot be had here.
    """
    base = image.base_image()
    workdir = Path(tempfile.mkdtemp(prefix="vsock_async-vm-"))
    initrd = workdir / "initrd"
    image.write_initrd(base, image.PROJECT, _script(base, args), initrd, extra_dirs=extra_dirs)
    boot = runner.boot(base.kernel.vmlinuz, initrd, workdir, timeout=timeout, memory_mib=memory_mib)
    report = boot.report.read_bytes().decode(errors="replace") if boot.report.exists() else ""
    stdout, status = _split_report(report)
    console = boot.console.read_text(errors="replace") if boot.console.exists() else ""
    failure = boot.failure
    if failure is None and status is None:
        failure = "the guest powered off without reporting the command's exit status"
    if failure is None and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return CommandRun(
        stdout=stdout,
        exit_status=status,
        failure=failure,
        accel=boot.accel,
        seconds=boot.seconds,
        console_tail="\n".join(console.splitlines()[-60:]),
        workdir=workdir if failure is not None or keep else None,
    )

"""Boot the VM tier's guest under QEMU with no network and no vsock device, under a hard deadline.

Without a vsock device the guest's only transport is vsock_loopback, so every AF_VSOCK
connection made inside it stays inside it. The console (ttyS0) and the report port (ttyS1)
are written to files in the work dir, with the QEMU command line (qemu.sh) to boot it again
by hand.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# Messages after which QEMU stops the guest and waits instead of exiting.
QEMU_STUCK_MARKERS = ("KVM internal error", "emulation failure", "VM is paused")
KERNEL_ARGS = "console=ttyS0 quiet loglevel=4 panic=-1 i8042.noaux i8042.nokbd"
# The test, the agent and the server each hold a large output once or twice; the initramfs
# alone needs about 200 MB.
GUEST_MEMORY_MIB = 1024
# The test process and the agent it talks to run at once.
GUEST_CPUS = 2


@dataclass(frozen=True)
class BootResult:
    """How a boot ended (``failure`` says why if it fell short) and where its output went."""

    failure: str | None
    accel: str
    seconds: float
    console: Path
    report: Path


def kvm_usable() -> bool:
    """Decide statically, never by trying: a paravirtual KVM (kvm_pvm) crashes stock kernels
    and then QEMU pauses instead of exiting."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    hardware = any(
        line.startswith("flags") and ({"vmx", "svm"} & set(line.split()))
        for line in cpuinfo.splitlines()
    )
    return (
        hardware
        and os.access("/dev/kvm", os.R_OK | os.W_OK)
        and not Path("/sys/module/kvm_pvm").exists()
    )


def qemu_command(
    kernel: Path, initrd: Path, workdir: Path, accel: str, memory_mib: int = GUEST_MEMORY_MIB
) -> list[str]:
    options = [
        ("-display", "none"),
        ("-nic", "none"),
        ("-machine", "pc"),
        ("-accel", accel),
        ("-cpu", "host" if accel == "kvm" else "max"),
        ("-m", str(memory_mib)),
        ("-smp", str(GUEST_CPUS)),
        ("-kernel", str(kernel)),
        ("-initrd", str(initrd)),
        ("-append", KERNEL_ARGS),
        ("-serial", f"file:{workdir / 'console.log'}"),
        ("-serial", f"file:{workdir / 'report.jsonl'}"),
    ]
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    flags = ["-nodefaults", "-no-user-config", "-no-reboot"]
    return [qemu, *flags, *(word for option in options for word in option)]


def boot(
    kernel: Path,
    initrd: Path,
    workdir: Path,
    *,
    timeout: float,
    memory_mib: int = GUEST_MEMORY_MIB,
    stop: threading.Event | None = None,
) -> BootResult:
    """Run the guest to power-off; kill QEMU (our child, by PID) at the deadline, as soon
    as its stderr says it is stuck, or once ``stop`` is set."""
    accel = "kvm" if kvm_usable() else "tcg"
    command = qemu_command(kernel, initrd, workdir, accel, memory_mib)
    (workdir / "qemu.sh").write_text(shlex.join(command) + "\n")
    started = time.monotonic()
    stuck = threading.Event()
    stderr_lines: list[str] = []
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )

    def watch_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr_lines.append(line)
            if any(marker in line for marker in QEMU_STUCK_MARKERS):
                stuck.set()

    watcher = threading.Thread(target=watch_stderr, daemon=True)
    watcher.start()
    failure = None
    while proc.poll() is None:
        if stuck.is_set():
            failure = "QEMU reported an error and stopped the guest"
        elif time.monotonic() - started > timeout:
            failure = f"the guest did not power off within {timeout:.0f} s"
        elif stop is not None and stop.is_set():
            failure = "stopped before the guest powered off"
        if failure:
            proc.kill()
            break
        stuck.wait(0.05)
    proc.wait()
    watcher.join(timeout=5)
    (workdir / "qemu-stderr.log").write_text("".join(stderr_lines))
    if failure is None and proc.returncode != 0:
        failure = f"QEMU exited with code {proc.returncode}: {''.join(stderr_lines)[-2000:]}"
    return BootResult(
        failure=failure,
        accel=accel,
        seconds=time.monotonic() - started,
        console=workdir / "console.log",
        report=workdir / "report.jsonl",
    )

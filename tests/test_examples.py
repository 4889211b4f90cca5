"""The examples as a user runs them: the "Try it without a VM" lines of docs/transports.md
exactly as written (in a fresh directory instead of /tmp/demo), and their errors."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.daemon_process import LONG, short_directory

REPO = Path(__file__).resolve().parents[1]


def try_it_lines() -> list[str]:
    """The commands of the first sh block under "Try it without a VM", comments left out."""
    section = (REPO / "docs" / "transports.md").read_text().split("## Try it without a VM")[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def run_until(argv: list[str], wanted: str) -> str:
    """Run a server until its output holds ``wanted``, then Ctrl-C it; all it printed."""
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(LONG, proc.kill)
    watchdog.start()
    assert proc.stdout is not None
    seen = ""
    try:
        for line in proc.stdout:
            seen += line
            if wanted in line:
                proc.send_signal(signal.SIGINT)
        assert proc.wait() == 0, seen
    finally:
        watchdog.cancel()
    return seen


def test_try_it_without_a_vm_works_as_written() -> None:
    jobs: list[subprocess.Popen[bytes]] = []
    outputs: list[str] = []
    with short_directory() as demo:
        try:
            for line in try_it_lines():
                background = line.endswith("&")
                argv = shlex.split(line.removesuffix("&").replace("/tmp/demo", str(demo)))
                if argv[0] == "python":
                    argv[0] = sys.executable
                if background:
                    jobs.append(subprocess.Popen(argv, cwd=REPO, stderr=subprocess.DEVNULL))
                elif argv == ["kill", "%1"]:
                    job = jobs.pop()
                    job.terminate()
                    assert job.wait(LONG) == 0
                elif argv[1:2] == ["examples/host_listen.py"]:  # a server: until Ctrl-C
                    outputs.append(run_until(argv, "exited 0"))
                else:
                    done = subprocess.run(
                        argv, cwd=REPO, capture_output=True, text=True, timeout=LONG
                    )
                    assert done.returncode == 0, (line, done.stderr)
                    outputs.append(done.stdout)
        finally:
            for job in jobs:
                job.kill()
                job.wait()
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, check=True).stdout
    _, listened, connected = outputs  # mkdir, host_listen.py, host_connect.py
    assert "'uname -a' exited 0\n" + uname in listened
    assert listened.endswith("closed; socket files removed\n")
    assert connected == uname


@pytest.mark.parametrize("example", ["host_listen.py", "host_connect.py"])
def test_a_bad_address_is_one_line_and_exit_2(example: str) -> None:
    command = ["--", "true"] if example == "host_connect.py" else []
    result = subprocess.run(
        [sys.executable, f"examples/{example}", "bogus://x", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=LONG,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"{example}: error: 'bogus://x' is not an address")
    assert result.stderr.count("\n") == 1, result.stderr

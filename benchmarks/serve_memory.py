"""One-off measurement: ``serve``'s peak memory for one run answering 64 MiB + 64 MiB.

``python -m benchmarks.serve_memory [--mib N]``

For each result form (JSON with base64, raw) it starts a fresh real
``serve`` process and a v1 guest process that answers every command but the
probe (and the v2 hello, which it runs as ``:``, as a v1 shell does) with N MiB
of stdout and N MiB of stderr; once the guest is probed it
reads serve's RSS, runs one command through the control API (the answer is
read and dropped in pieces), and reports serve's peak RSS (``VmHWM``) above
that RSS. docs/security.md quotes the figures. Not part of the benchmark
suite: memory, not speed, and one run tells it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from vsock_async.serve.control_client import ControlClient

from ._harness import REPO, fresh_dir, read_status_kib, reset_peak_rss

MiB = 1024 * 1024

GUEST = """
import socket, sys, time
from vsock_async.protocol import CommandDecoder, result_frame_parts

path, size = sys.argv[1], int(sys.argv[2])
output = b"x" * size
sock = socket.socket(socket.AF_UNIX)
for _ in range(500):
    try:
        sock.connect(path)
        break
    except (FileNotFoundError, ConnectionRefusedError):
        time.sleep(0.02)
decoder = CommandDecoder()
while data := sock.recv(65536):
    decoder.receive_data(data)
    while (event := decoder.next_event()) is not None:
        if event.command == b":" or event.command.startswith(b": vsock_async.hello "):
            sock.sendall(b"\\0" * 9)  # the probe, and the v2 hello as a v1 shell runs it
        else:
            for part in result_frame_parts(output, output, 0):
                sock.sendall(part)
"""


@contextlib.contextmanager
def _child(args: list[str], log: str) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read_and_drop(control_path: str, raw: bool, body: bytes) -> int:
    """POST a run and read its answer in pieces; the answer's length."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(control_path)
        head = (
            "POST /v1/guests/vm/run" + ("?raw=1" if raw else "") + " HTTP/1.1\r\n"
            "Host: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        total = 0
        while data := sock.recv(1 << 20):
            total += len(data)
        return total


def measure(raw: bool, mib: int, agent: bool = False) -> tuple[int, int]:
    """Serve's peak RSS above its RSS before the run, and the answer's size, in bytes.

    ``agent``: the real agent instead of the v1 guest, so the run goes over protocol v2.
    """
    with fresh_dir() as directory:
        guest_path = os.path.join(directory, "g.sock")
        control_path = os.path.join(directory, "c.sock")
        log = os.path.join(directory, "log")
        serve_args = ["-m", "vsock_async", "serve", "--listen", f"vm=unix:{guest_path}"]
        serve_args += ["--control", f"unix:{control_path}", "--probe-interval", "none"]
        serve_args += ["--log-level", "warning"]
        if agent:
            guest = ["-m", "vsock_async", "agent", "--connect", f"unix:{guest_path}"]
            command = f"head -c {mib * MiB} /dev/zero; head -c {mib * MiB} /dev/zero >&2"
        else:
            guest, command = ["-c", GUEST, guest_path, str(mib * MiB)], "big"
        with _child(serve_args, log) as serve, _child(guest, log):
            client = ControlClient(f"unix:{control_path}", timeout=30)
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.guest("vm", wait=30)["last_probe"] is not None:
                        break
                except Exception:
                    if time.monotonic() > deadline or serve.poll() is not None:
                        raise
                time.sleep(0.05)
            reset_peak_rss(serve.pid)
            before = read_status_kib("VmRSS", serve.pid)
            size = _read_and_drop(control_path, raw, json.dumps({"command": command}).encode())
            peak = read_status_kib("VmHWM", serve.pid)
    return (peak - before) * 1024, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB on each stream (default 64)")
    args = parser.parse_args()
    result = 2 * args.mib * MiB
    print(f"serve, one run answering {args.mib} MiB + {args.mib} MiB ({sys.version.split()[0]})")
    for agent in (False, True):
        for raw in (False, True):
            extra, size = measure(raw, args.mib, agent)
            form = "raw " if raw else "JSON"
            over = "v2, the real agent" if agent else "v1, a v1 guest"
            print(
                f"  {over}, {form} form: answer {size / MiB:6.1f} MiB, serve's peak RSS"
                f" +{extra / MiB:6.1f} MiB = {extra / result:.2f}x the result"
            )


if __name__ == "__main__":
    main()

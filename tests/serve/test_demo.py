"""``vsock-async demo`` runs the real serve and agent on this machine and exits 0."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.daemon_process import LONG, python_m


def test_demo_exits_0_and_shows_what_happened() -> None:
    result = subprocess.run(
        python_m("demo"), capture_output=True, text=True, timeout=3 * LONG, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for expected in [
        "serve          pid ",
        "agent          pid ",
        "GET /v1/guests/demo: 1 connection(s), protocol v2",
        "hello from the guest",
        "-> exit code 42",
        "stderr        this goes to stderr",
        "[it's one argument]",
        "stdout        3 bytes: b'\\x00\\x01\\xff'",
        "HTTP 504 command_timeout",
        "the connection carries on",
        "demo still has 1 connection(s)",
        "POST /v1/guests/demo/probe: ok",
        "vsock_async_commands_timed_out_total 1",
        "SIGTERM: agent exited 0, serve exited 0",
    ]:
        assert expected in out, f"{expected!r} missing from:\n{out}"
    assert "Traceback" not in result.stderr
    # Its own directory, named in its output: another demo may be running at the same time.
    dialed = re.search(r"guests dial unix:(\S+)", out)
    assert dialed is not None, out
    directory = Path(dialed[1]).parent
    assert directory.name.startswith("vsock-async-demo-")
    assert not directory.exists()

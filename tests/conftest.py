"""Shared fixtures. The safety guard is set before anything else runs, for this process and
every process it starts: no test may connect an AF_VSOCK socket on this machine."""

from __future__ import annotations

import os

os.environ["VSOCK_ASYNC_FORBID_VSOCK_CONNECT"] = "1"

pytest_plugins = ["tests.vm.plugin"]

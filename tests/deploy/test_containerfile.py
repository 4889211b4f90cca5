"""deploy/Containerfile: the image runs ``serve`` with options the CLI accepts, as a user of
its own, and its HEALTHCHECK asks serve's real health route (run here against a real serve:
no container engine runs in the suite)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.daemon_process import LONG, Stack, stack
from tests.deploy.containerfile import entrypoint, exec_form, final_stage, instructions, only
from tests.deploy.serve_options import DEPLOY, serve_options, start_as_deployed

__all__ = ["stack"]

REPO = DEPLOY.parent
ENTRYPOINT = ["python", "-m", "vsock_async"]
HEALTH_URL = re.compile(r"http://127\.0\.0\.1:(\d+)(/[^'\"]*)")


def command() -> list[str]:
    """The final image's CMD: the options given to its ENTRYPOINT."""
    return exec_form(only(final_stage(), "CMD"))


def healthcheck() -> list[str]:
    """The HEALTHCHECK's command."""
    options, _, check = only(final_stage(), "HEALTHCHECK").partition(" CMD ")
    assert options.startswith("--"), options
    return exec_form(check.strip())


def test_the_image_runs_serve_with_options_the_cli_accepts() -> None:
    assert entrypoint() == ENTRYPOINT
    _, config = serve_options(command())
    assert config.metrics is not None, "the HEALTHCHECK and Prometheus need --metrics"
    assert config.metrics.host == "0.0.0.0", "reachable from outside the container"
    assert only(final_stage(), "STOPSIGNAL") == "SIGTERM"
    assert str(config.metrics.port) in only(final_stage(), "EXPOSE").split()


def test_the_image_runs_as_a_user_of_its_own() -> None:
    user = only(final_stage(), "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit(), user
    assert f"--uid {uid} " in only(final_stage(), "RUN")


def test_the_build_copies_what_the_ignore_file_lets_through() -> None:
    """BuildKit sends only what Containerfile.dockerignore lets through: each source that the
    build copies from the tree must be listed there, and exist."""
    let_through = {
        line[1:]
        for line in (DEPLOY / "Containerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = [
        source
        for keyword, arguments in instructions()
        if keyword == "COPY" and not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    ]
    assert copied
    for source in copied:
        assert source.rstrip("/") in let_through, source
        assert (REPO / source).exists(), source


def test_the_healthcheck_asks_serve_s_health_route(stack: Stack) -> None:
    _, config = serve_options(command())
    assert config.metrics is not None
    check = healthcheck()
    assert check[0] == ENTRYPOINT[0]
    (url,) = HEALTH_URL.finditer(" ".join(check))
    assert (int(url[1]), url[2]) == (config.metrics.port, "/v1/health")

    started = start_as_deployed(stack, command())
    stand_in = started.url(config.metrics.port, url[2])
    run = [sys.executable, *(word.replace(url[0], stand_in) for word in check[1:])]

    healthy = subprocess.run(run, capture_output=True, text=True, timeout=LONG)
    assert healthy.returncode == 0, healthy.stderr
    assert started.daemon.stop() == 0
    unhealthy = subprocess.run(run, capture_output=True, text=True, timeout=LONG)
    assert unhealthy.returncode != 0

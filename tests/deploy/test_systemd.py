"""deploy/systemd: the unit runs a ``serve`` command the CLI accepts, its sandbox leaves serve
the sockets and paths it uses, its stop timeout covers the drain, and systemd's own tools
accept the unit, the user and the directory files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_process import LONG, Stack, stack
from tests.deploy.serve_options import (
    DEPLOY,
    is_loopback,
    serve_options,
    start_as_deployed,
    stop_timeout_outlasts_the_drain,
    unix_paths,
)
from vsock_async.addresses import TcpAddress, VsockAddress
from vsock_async.cli import EXIT_USAGE
from vsock_async.serve.config import ServeConfig

__all__ = ["stack"]

SYSTEMD = DEPLOY / "systemd"
UNIT = SYSTEMD / "vsock-async.service"
ENVIRONMENT = SYSTEMD / "serve.env"
SYSUSERS = SYSTEMD / "sysusers.conf"
TMPFILES = SYSTEMD / "tmpfiles.conf"
OPTIONS = "SERVE_OPTIONS"

Section = list[tuple[str, str]]


def read_unit(text: str) -> dict[str, Section]:
    """A unit file's sections, each its (key, value) lines in order, repeated keys kept (as
    systemd keeps them), lines ending in a backslash joined to the next."""
    sections: dict[str, Section] = {}
    entries: Section | None = None
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped[0] in "#;"):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        if logical.startswith("["):
            entries = sections.setdefault(logical.strip("[]"), [])
        else:
            key, sep, value = logical.partition("=")
            assert sep and entries is not None, f"not a setting: {logical!r}"
            entries.append((key.strip(), value.strip()))
        logical = ""
    return sections


def values(section: Section, key: str) -> list[str]:
    """Every value given to ``key``, in order."""
    return [value for name, value in section if name == key]


def value(section: Section, key: str) -> str:
    """The value of a single-valued ``key``: the last one given, as systemd takes it."""
    given = values(section, key)
    assert given, f"the unit sets no {key}="
    return given[-1]


def read_environment(text: str) -> tuple[dict[str, str], list[str]]:
    """An EnvironmentFile's variables, and the values of the commented ``#SERVE_OPTIONS=``
    lines (the examples it offers). systemd would also unquote values and join lines ending in
    a backslash: the file uses neither, so this reads it as systemd does."""
    variables: dict[str, str] = {}
    examples: list[str] = []
    for line in text.splitlines():
        if line.startswith(f"#{OPTIONS}="):
            examples.append(line.partition("=")[2])
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        key, sep, given = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        variables[key.strip()] = given.strip()
    for given in [*variables.values(), *examples]:
        assert not set(given) & set("\"'\\"), f"quotes or backslashes: {given!r}"
    return variables, examples


def command_line(exec_start: str, environment: dict[str, str]) -> list[str]:
    """ExecStart= as systemd runs it: ``$NAME`` is split into words, ``${NAME}`` is one word.
    Quotes, escapes, specifiers and prefixes would change the parse: the unit uses none."""
    assert not set(exec_start) & set("\"'%\\"), exec_start
    assert exec_start[0] == "/", f"ExecStart= takes an absolute path and no prefix: {exec_start}"
    words: list[str] = []
    for word in exec_start.split():
        if word.startswith("${"):
            words.append(environment.get(word[2:-1], ""))
        elif word.startswith("$"):
            words += environment.get(word[1:], "").split()
        else:
            words.append(word)
    return words


def seconds(text: str) -> float | None:
    """A systemd time span as the unit writes it (plain seconds, ``Ns``, or ``infinity``)."""
    if text == "infinity":
        return None
    return float(text.removesuffix("s"))


@pytest.fixture(scope="module")
def service() -> Section:
    return read_unit(UNIT.read_text())["Service"]


def configurations(service: Section) -> dict[str, ServeConfig]:
    """serve's configuration under the unit: with no serve.env (it is optional), with the one
    shipped, and with each example it offers instead."""
    environment_file = value(service, "EnvironmentFile")
    assert environment_file.startswith("-"), "serve.env is optional: EnvironmentFile=-PATH"
    assert Path(environment_file[1:]).name == ENVIRONMENT.name
    variables, examples = read_environment(ENVIRONMENT.read_text())
    assert examples, "serve.env offers an example for hybrid vsock"
    cases = {"no serve.env": {}, "serve.env": variables}
    cases |= {f"serve.env example {n}": {OPTIONS: e} for n, e in enumerate(examples, 1)}
    found = {}
    for name, environment in cases.items():
        argv = command_line(value(service, "ExecStart"), environment)
        python, module = argv[0], argv[1:3]
        assert os.path.isabs(python) and Path(python).name.startswith("python"), argv
        assert module == ["-m", "vsock_async"], argv
        found[name] = serve_options(argv[3:])[1]
    return found


def test_exec_start_runs_serve_with_options_the_cli_accepts(service: Section) -> None:
    found = configurations(service)
    assert any(isinstance(s.address, VsockAddress) for s in found["serve.env"].listeners), (
        "serve.env listens on vsock (QEMU)"
    )
    assert all(
        not isinstance(s.address, VsockAddress)
        for name, config in found.items()
        if "example" in name
        for s in config.listeners
    ), "the examples are for hybrid vsock (Firecracker, Cloud Hypervisor)"


def test_the_sandbox_leaves_serve_the_paths_it_writes(service: Section) -> None:
    runtime = Path("/run") / value(service, "RuntimeDirectory")
    assert value(service, "RuntimeDirectoryMode") == "0700"
    assert value(service, "ProtectSystem") == "strict"
    writable = [
        Path(p.removeprefix("-")) for v in values(service, "ReadWritePaths") for p in v.split()
    ]
    for name, config in configurations(service).items():
        assert not isinstance(config.control, TcpAddress), name
        assert Path(config.control.path).parent == runtime, name
        for path in unix_paths(config):
            directory = Path(path).parent
            assert directory == runtime or any(directory.is_relative_to(w) for w in writable), (
                f"{name}: serve could not create {path} under ProtectSystem=strict"
            )


def test_the_sandbox_allows_the_sockets_serve_opens(service: Section) -> None:
    families = value(service, "RestrictAddressFamilies").split()
    assert "AF_UNIX" in families
    assert values(service, "CapabilityBoundingSet") == [""], "no capability at all"
    assert value(service, "IPAddressDeny") == "any"
    assert value(service, "IPAddressAllow") == "localhost"
    for name, config in configurations(service).items():
        addresses = [s.address for s in config.listeners] + [config.control]
        addresses += [config.metrics] if config.metrics else []
        for address in addresses:
            if isinstance(address, VsockAddress):
                assert "AF_VSOCK" in families, name
                assert address.port > 1023, f"{name}: port {address.port} needs a capability"
            if isinstance(address, TcpAddress):
                assert {"AF_INET", "AF_INET6"} <= set(families), name
                assert is_loopback(address), f"{name}: IPAddressAllow=localhost refuses {address}"
                assert address.port > 1023, f"{name}: port {address.port} needs a capability"


def test_the_stop_timeout_leaves_serve_its_drain(service: Section) -> None:
    assert value(service, "KillSignal") == "SIGTERM"
    timeout = seconds(value(service, "TimeoutStopSec"))
    for name, config in configurations(service).items():
        assert stop_timeout_outlasts_the_drain(config, timeout), (name, config.grace, timeout)
    assert str(EXIT_USAGE) in value(service, "RestartPreventExitStatus").split()


def test_the_unit_s_command_starts_serve_and_its_metrics_answer(
    service: Section, stack: Stack
) -> None:
    variables, _ = read_environment(ENVIRONMENT.read_text())
    argv = command_line(value(service, "ExecStart"), variables)
    started = start_as_deployed(stack, argv[3:])
    (port,) = started.ports
    client = started.client(port)
    assert client.health()["status"] == "ok"
    assert "vsock_async_guests_connected 0" in client.metrics().splitlines()


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found: install systemd (scripts/vm-deps.sh does, as root)")
    return found


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, service: Section) -> None:
    """verify also checks that ExecStart='s program exists: the interpreter running the tests
    stands in for the one docs/deploy.md installs."""
    analyze = tool("systemd-analyze")
    python = command_line(value(service, "ExecStart"), {})[0]
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(python, sys.executable))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=LONG
    )
    assert result.returncode == 0, result.stderr
    assert UNIT.name not in result.stderr, result.stderr


def test_systemd_analyze_security_rates_the_sandbox_ok() -> None:
    """Exposure 2.0 at most (systemd calls up to 3.9 "OK"; the unit scores 1.3): dropping one
    of the sandboxing lines shows here."""
    analyze = tool("systemd-analyze")
    usage = subprocess.run([analyze, "--help"], capture_output=True, text=True, timeout=LONG)
    if "--offline" not in usage.stdout:
        pytest.skip("this systemd-analyze cannot rate a unit file offline (systemd < 250)")
    threshold = "--threshold=20"  # in tenths
    result = subprocess.run(
        [analyze, "security", "--offline=yes", threshold, str(UNIT)],
        capture_output=True,
        text=True,
        timeout=LONG,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_user_and_the_vmm_directory_are_made_as_the_unit_expects(
    tmp_path: Path, service: Section
) -> None:
    sysusers, tmpfiles = tool("systemd-sysusers"), tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles needs root to give the directory its group")
    (tmp_path / "etc").mkdir()
    for command in (
        [sysusers, f"--root={tmp_path}", str(SYSUSERS)],
        [tmpfiles, "--create", f"--root={tmp_path}", str(TMPFILES)],
    ):
        result = subprocess.run(command, capture_output=True, text=True, timeout=LONG)
        assert result.returncode == 0, result.stderr
    users = [line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()]
    groups = [line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()]
    gids = {fields[0]: int(fields[2]) for fields in groups}
    user, group = value(service, "User"), value(service, "Group")
    assert [(u[0], int(u[3])) for u in users] == [(user, gids[group])]
    for directory in values(service, "ReadWritePaths"):
        made = (tmp_path / directory.removeprefix("-").lstrip("/")).stat()
        assert made.st_gid == gids[group]
        assert made.st_mode & 0o070 == 0o070, "the VMM and serve share it through the group"

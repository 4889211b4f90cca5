"""The ``serve`` options a deployment file gives: parsed by the CLI's own parser, checked as
``serve`` checks them, and started for real with their addresses moved into the test."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon_process import LONG, Daemon, Stack, free_tcp_port
from vsock_async._sockets import listen_path
from vsock_async.addresses import HybridVsockAddress, TcpAddress, UnixAddress, parse_address
from vsock_async.cli import build_parser, serve_config
from vsock_async.serve.config import ServeConfig, parse_listen_spec
from vsock_async.serve.control_client import ControlClient

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

STOP_MARGIN = 5.0
"""Seconds a stop timeout must leave after ``--grace``: once the drain ends, serve closes its
guests' connections and the control API (aiohttp waits up to 1 s for its connections)."""

_MOVED = ("--listen", "--control", "--metrics")


def serve_options(argv: Sequence[str]) -> tuple[argparse.Namespace, ServeConfig]:
    """``argv`` (``serve`` and its options) parsed and checked as ``serve`` would at startup."""
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit:
        pytest.fail(f"the CLI refuses these options (its message is above): {list(argv)}")
    assert args.subcommand == "serve", argv
    return args, serve_config(args)


def unix_paths(config: ServeConfig) -> list[str]:
    """Every socket file serve creates: its hvsock:/unix: listeners' and the control socket."""
    paths = [
        listen_path(spec.address)
        for spec in config.listeners
        if isinstance(spec.address, UnixAddress | HybridVsockAddress)
    ]
    if not isinstance(config.control, TcpAddress):
        paths.append(config.control.path)
    return paths


def is_loopback(address: TcpAddress) -> bool:
    """Whether only this machine can reach ``address``."""
    return address.host == "localhost" or ipaddress.ip_address(address.host).is_loopback


def stop_timeout_outlasts_the_drain(config: ServeConfig, timeout: float | None) -> bool:
    """Whether a stop timeout (None: none) leaves serve its whole drain and the close after it."""
    if timeout is None:
        return True
    return config.grace is not None and timeout >= config.grace + STOP_MARGIN


@dataclass
class Started:
    """serve started with a deployment file's options."""

    daemon: Daemon
    ports: dict[int, int]
    """Each ``--metrics`` port the file names, and the loopback port standing in for it."""

    def url(self, port: int, path: str) -> str:
        """The URL of ``path`` on the stand-in for the file's ``port``."""
        return f"http://127.0.0.1:{self.ports[port]}{path}"

    def client(self, port: int) -> ControlClient:
        """A client of the stand-in for the file's ``port``."""
        return ControlClient(f"tcp://127.0.0.1:{self.ports[port]}", timeout=LONG)


def start_as_deployed(stack: Stack, argv: Sequence[str]) -> Started:
    """Start serve with ``argv``'s options, its listeners, control socket and metrics port
    moved into the test's directory and onto free loopback ports (the file names the host's
    own); every other option as the file gives it. Returns once the control API answers."""
    assert argv[0] == "serve", argv
    moved: list[str] = []
    ports: dict[int, int] = {}
    words = iter(argv[1:])
    for word in words:
        if word.partition("=")[0] in _MOVED and "=" in word:
            pytest.fail(f"write {word!r} as two words: the tests move its address")
        if word not in _MOVED:
            moved.append(word)
            continue
        value = next(words)
        if word == "--listen":
            label = parse_listen_spec(value).label
            address = f"unix:{stack.directory}/guest{len(moved)}.sock"
            moved += [word, f"{label}={address}" if label else address]
        elif word == "--control":
            moved += [word, f"unix:{stack.directory}/control.sock"]
        else:
            original = parse_address(value)
            assert isinstance(original, TcpAddress), value
            ports[original.port] = free_tcp_port()
            moved += [word, f"tcp://127.0.0.1:{ports[original.port]}"]
    return Started(stack.daemon(*moved), ports)


__all__ = [
    "DEPLOY",
    "STOP_MARGIN",
    "Started",
    "is_loopback",
    "serve_options",
    "start_as_deployed",
    "stop_timeout_outlasts_the_drain",
    "unix_paths",
]

"""deploy/kubernetes/daemonset.yaml: the container runs ``serve`` with options the CLI
accepts, every socket it makes lies on a hostPath seen at the same path by the node, the
Prometheus annotations and the probes name serve's real metrics port and routes (asked here of
a real serve started with those options), and the pod is locked down."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
import yaml

from tests.daemon_process import LONG, Stack, stack
from tests.deploy.containerfile import entrypoint
from tests.deploy.serve_options import (
    DEPLOY,
    is_loopback,
    serve_options,
    start_as_deployed,
    stop_timeout_outlasts_the_drain,
    unix_paths,
)
from vsock_async.addresses import VsockAddress
from vsock_async.serve.config import ServeConfig

__all__ = ["stack"]

MANIFEST = DEPLOY / "kubernetes" / "daemonset.yaml"
HEALTH = "/v1/health"
METRICS = "/metrics"


@pytest.fixture(scope="module")
def daemonset() -> dict[str, Any]:
    (document,) = yaml.safe_load_all(MANIFEST.read_text())
    assert (document["apiVersion"], document["kind"]) == ("apps/v1", "DaemonSet")
    return dict(document)


def pod(daemonset: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = daemonset["spec"]["template"]["spec"]
    return spec


def serve_container(daemonset: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod(daemonset)["containers"]
    return dict(container)


def config_of(daemonset: dict[str, Any]) -> ServeConfig:
    """serve's configuration in the container: the image's ENTRYPOINT runs its args."""
    container = serve_container(daemonset)
    assert "command" not in container, "the image's ENTRYPOINT runs python -m vsock_async"
    assert entrypoint()[1:] == ["-m", "vsock_async"]
    return serve_options(container["args"])[1]


def metrics_port(daemonset: dict[str, Any]) -> int:
    config = config_of(daemonset)
    assert config.metrics is not None, "probes and Prometheus need --metrics"
    assert not is_loopback(config.metrics), "probes and Prometheus come from outside the pod"
    return config.metrics.port


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def test_the_selector_picks_the_pods_it_makes(daemonset: dict[str, Any]) -> None:
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_container_runs_serve_with_options_the_cli_accepts(daemonset: dict[str, Any]) -> None:
    config = config_of(daemonset)
    assert config.listeners
    image = serve_container(daemonset)["image"]
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and "/" not in tag, f"pin the image: {image}"


def test_every_socket_serve_makes_is_on_a_host_path_the_node_sees_the_same(
    daemonset: dict[str, Any],
) -> None:
    """The VMM and the node's clients name these paths from the node: same path both sides."""
    volumes = {v["name"]: v for v in pod(daemonset)["volumes"]}
    mounts = serve_container(daemonset)["volumeMounts"]
    shared = []
    for mount in mounts:
        host_path = volumes[mount["name"]].get("hostPath")
        if host_path is not None:
            assert host_path["path"] == mount["mountPath"], mount
            assert not mount.get("readOnly", False), f"serve creates sockets in {mount}"
            shared.append(mount["mountPath"])
    for path in unix_paths(config_of(daemonset)):
        directory = path.rpartition("/")[0]
        assert directory in shared, f"{path} is not on a hostPath volume"


def test_prometheus_scrapes_serve_s_metrics_port(daemonset: dict[str, Any]) -> None:
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert all(isinstance(v, str) for v in annotations.values()), "annotations are strings"
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port(daemonset))
    assert annotations["prometheus.io/path"] == METRICS
    ports = [p["containerPort"] for p in serve_container(daemonset)["ports"]]
    assert metrics_port(daemonset) in ports


def test_the_probes_ask_serve_s_health_route(daemonset: dict[str, Any]) -> None:
    container = serve_container(daemonset)
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == HEALTH, probe
        assert container_port(container, get["port"]) == metrics_port(daemonset), probe


def test_the_routes_the_manifest_names_answer_on_a_real_serve(
    daemonset: dict[str, Any], stack: Stack
) -> None:
    container = serve_container(daemonset)
    port = metrics_port(daemonset)
    started = start_as_deployed(stack, container["args"])
    paths = {container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
    paths.add(daemonset["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
    for path in paths:
        with urllib.request.urlopen(started.url(port, path), timeout=LONG) as answer:
            assert answer.status == 200, path
            body = answer.read().decode()
        if path == METRICS:
            assert "vsock_async_guests_connected 0" in body.splitlines()
        else:
            assert json.loads(body)["status"] == "ok", path


def test_the_pod_is_locked_down(daemonset: dict[str, Any]) -> None:
    spec = pod(daemonset)
    container = serve_container(daemonset)
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert spec["automountServiceAccountToken"] is False
    vsock = any(isinstance(s.address, VsockAddress) for s in config_of(daemonset).listeners)
    seccomp = spec["securityContext"]["seccompProfile"]["type"]
    # The runtimes' default profiles refuse socket(AF_VSOCK): vsock:// needs a profile of yours.
    assert seccomp == ("Localhost" if vsock else "RuntimeDefault")
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def test_the_termination_grace_leaves_serve_its_drain(daemonset: dict[str, Any]) -> None:
    grace = pod(daemonset)["terminationGracePeriodSeconds"]
    assert stop_timeout_outlasts_the_drain(config_of(daemonset), grace)

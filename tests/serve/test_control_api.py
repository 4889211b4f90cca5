"""The control API of ``serve``, end to end: the daemon and a real agent as child processes,
every endpoint over the real Unix control socket, the errors and their codes, and the
OpenAPI document checked against the routes the code serves."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon_process import (
    LONG,
    Daemon,
    Stack,
    eventually,
    short_directory,
    stack,
    wait_for_guest,
)
from vsock_async.serve.control_client import (
    RAW_RESULT_TYPE,
    ControlClient,
    ControlError,
    decode_raw_result,
)

__all__ = ["stack"]

DOCS = Path(__file__).resolve().parents[2] / "docs"
ALL_BYTES = bytes(range(256))
PRINTF_ALL_BYTES = "printf '" + "".join(f"\\{b:03o}" for b in range(256)) + "'"


@dataclass
class Api:
    daemon: Daemon
    client: ControlClient
    directory: Path

    def gate(self, name: str) -> tuple[str, Path]:
        """A command that waits until the returned file exists (so a test decides when it ends)."""
        marker = self.directory / name
        return f"while [ ! -e {marker} ]; do sleep 0.01; done; echo released", marker

    def connections(self, n: int) -> None:
        eventually(lambda: _connections(self.client) == n, f"guest vm1 holding {n} connections")


def _connections(client: ControlClient) -> int:
    try:
        return int(client.guest("vm1")["connections"])
    except ControlError:
        return 0


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    with short_directory() as directory:
        stack = Stack(directory)
        try:
            daemon = stack.daemon("--max-command", "4K", "--probe-interval", "none")
            # One process at a time per connection: "busy" and 409 as on v1.
            stack.agent(daemon.guest_address, "--connections", "2", "--max-streams", "1")
            client = daemon.client()
            wait_for_guest(client, "vm1")
            result = Api(daemon, client, directory)
            result.connections(2)
            yield result
        finally:
            stack.close()


def error_of(call: Any) -> ControlError:
    with pytest.raises(ControlError) as info:
        call()
    return info.value


# -- health, guests -------------------------------------------------------------------------


def test_health(api: Api) -> None:
    health = api.client.health()
    assert health["status"] == "ok"
    assert health["guests"] == 1
    assert health["listeners"] == [api.daemon.guest_address]
    assert health["uptime"] >= 0


def test_list_and_get_guests(api: Api) -> None:
    api.connections(2)
    (listed,) = api.client.guests()
    assert listed["key"] == "vm1"
    assert listed["cid"] is None
    assert listed["connections"] == 2
    assert listed["busy_connections"] == 0
    assert listed["busy"] is False
    assert (listed["protocol"], listed["running"]) == ("v2", 0)
    assert listed["listener"] == api.daemon.guest_address
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", listed["connected_at"])
    assert listed["last_probe"] is not None
    single = api.client.guest("vm1")
    assert single["key"] == "vm1" and single["connections"] == 2


def test_unknown_guest_is_404_also_after_waiting(api: Api) -> None:
    err = error_of(lambda: api.client.guest("nope"))
    assert (err.status, err.code) == (404, "guest_not_found")
    assert "nope" in err.message
    err = error_of(lambda: api.client.guest("nope", wait=0.05))
    assert (err.status, err.code) == (404, "guest_not_found")
    for call in (
        lambda: api.client.run("nope", "true"),
        lambda: api.client.probe("nope"),
        lambda: api.client.drop("nope"),
    ):
        assert error_of(call).status == 404


def test_wait_for_a_connected_guest_answers_at_once(api: Api) -> None:
    assert api.client.guest("vm1", wait=LONG)["key"] == "vm1"


# -- run ------------------------------------------------------------------------------------


def run_json(api: Api, body: dict[str, Any], query: str = "") -> dict[str, Any]:
    reply = api.client.request("POST", f"/v1/guests/vm1/run{query}", body, wait_forever=True)
    assert reply.headers["content-type"].startswith("application/json")
    result: dict[str, Any] = json.loads(reply.body)
    return result


def test_run_returns_base64_output_exit_code_and_duration(api: Api) -> None:
    result = run_json(api, {"command": "printf out; printf err >&2; exit 3"})
    assert base64.b64decode(result["stdout"]) == b"out"
    assert base64.b64decode(result["stderr"]) == b"err"
    assert result["exit_code"] == 3
    assert result["timed_out"] is False
    assert result["duration"] >= 0


def test_run_argv_cwd_and_env(api: Api) -> None:
    result = run_json(api, {"command": ["printf", "%s|", "it's one", "*"]})
    assert base64.b64decode(result["stdout"]) == b"it's one|*|"
    result = run_json(
        api, {"command": "pwd; echo $GREETING", "cwd": "/", "env": {"GREETING": "hi there"}}
    )
    assert base64.b64decode(result["stdout"]) == b"/\nhi there\n"


def test_binary_output_round_trips_in_json_and_raw_forms(api: Api) -> None:
    result = run_json(api, {"command": PRINTF_ALL_BYTES})
    assert base64.b64decode(result["stdout"]) == ALL_BYTES

    outcome = api.client.run("vm1", PRINTF_ALL_BYTES + " >&2; exit 7")
    assert (outcome.stdout, outcome.stderr, outcome.exit_code) == (b"", ALL_BYTES, 7)

    for query, accept, content_type in [
        ("?raw=1", "application/json", RAW_RESULT_TYPE),
        ("", "application/octet-stream", "application/octet-stream"),
    ]:
        reply = api.client.request(
            "POST", f"/v1/guests/vm1/run{query}", {"command": PRINTF_ALL_BYTES}, accept=accept
        )
        assert reply.headers["content-type"] == content_type
        assert decode_raw_result(reply.body) == (ALL_BYTES, b"", 0)
        assert reply.headers["vsock-async-exit-code"] == "0"
        assert reply.headers["vsock-async-stdout-length"] == "256"
        assert reply.headers["vsock-async-stderr-length"] == "0"
        assert float(reply.headers["vsock-async-duration"]) >= 0


def test_large_output_in_the_json_form_decodes_byte_exactly(api: Api) -> None:
    """The JSON form is written piece by piece; the pieces must join into valid base64."""
    n_out, n_err = 3 * 1024 * 1024 + 1, 1024 * 1024 + 2
    command = f"yes 0123456789 | head -c {n_out}; yes abc | head -c {n_err} >&2"
    reply = api.client.request(
        "POST", "/v1/guests/vm1/run", {"command": command}, wait_forever=True
    )
    assert int(reply.headers["content-length"]) == len(reply.body)
    result = json.loads(reply.body)
    assert base64.b64decode(result["stdout"], validate=True) == (b"0123456789\n" * n_out)[:n_out]
    assert base64.b64decode(result["stderr"], validate=True) == (b"abc\n" * n_err)[:n_err]
    assert (result["exit_code"], result["timed_out"]) == (0, False)


@pytest.mark.parametrize(
    ("query", "raw"),
    [
        ("?raw=1", True),
        ("?raw=true", True),
        ("?raw=YES", True),
        ("?raw=On", True),
        ("?raw=0", False),
        ("?raw=false", False),
        ("?raw=no", False),
        ("?raw=OFF", False),
        ("", False),
    ],
)
def test_raw_is_a_boolean(api: Api, query: str, raw: bool) -> None:
    reply = api.client.request("POST", f"/v1/guests/vm1/run{query}", {"command": "echo hi"})
    expected = RAW_RESULT_TYPE if raw else "application/json"
    assert reply.headers["content-type"].startswith(expected)


def test_raw_that_is_not_a_boolean_is_400(api: Api) -> None:
    err = error_of(
        lambda: api.client.request("POST", "/v1/guests/vm1/run?raw=garbage", {"command": "true"})
    )
    assert (err.status, err.code) == (400, "bad_request")
    assert "raw" in err.message and "garbage" in err.message


def test_output_cut_by_the_agent_is_flagged_in_both_forms(stack: Stack) -> None:
    daemon = stack.daemon("--probe-interval", "none", "--protocol", "v1")
    stack.agent(daemon.guest_address, "--max-output", "1000")
    client = daemon.client()
    wait_for_guest(client, "vm1")
    command = {"command": "head -c 5000 /dev/zero; echo err >&2"}
    result = json.loads(client.request("POST", "/v1/guests/vm1/run", command).body)
    assert len(base64.b64decode(result["stdout"])) == 1000
    assert (result["stdout_truncated"], result["stderr_truncated"]) == (True, False)
    assert result["exit_signal"] is None  # protocol v1 cannot tell
    reply = client.request("POST", "/v1/guests/vm1/run?raw=1", command)
    assert reply.headers["vsock-async-stdout-truncated"] == "1"
    assert reply.headers["vsock-async-stderr-truncated"] == "0"
    assert "vsock-async-exit-signal" not in reply.headers
    outcome = client.run("vm1", command["command"])
    assert (outcome.stdout_truncated, outcome.stderr_truncated) == (True, False)
    assert outcome.exit_signal is None
    result = json.loads(client.request("POST", "/v1/guests/vm1/run", {"command": "true"}).body)
    assert (result["stdout_truncated"], result["stderr_truncated"]) == (False, False)


def test_output_cut_on_v2_and_the_exit_signal_are_reported(stack: Stack) -> None:
    daemon = stack.daemon("--probe-interval", "none", "--max-stdout", "1000")
    stack.agent(daemon.guest_address)
    client = daemon.client()
    assert wait_for_guest(client, "vm1")["protocol"] == "v2"
    result = json.loads(
        client.request("POST", "/v1/guests/vm1/run", {"command": "head -c 5000 /dev/zero"}).body
    )
    assert len(base64.b64decode(result["stdout"])) == 1000 and result["stdout_truncated"]
    killed = client.run("vm1", "kill -TERM $$")
    assert (killed.exit_code, killed.exit_signal) == (143, 15)


def test_timeout_is_504_with_the_partial_facts(api: Api) -> None:
    api.connections(2)
    err = error_of(lambda: api.client.run("vm1", "sleep 5", timeout=0.05))
    assert (err.status, err.code) == (504, "command_timeout")
    assert err.body["timed_out"] is True
    assert err.body["exit_code"] is None
    assert base64.b64decode(err.body["stdout"]) == b""
    assert base64.b64decode(err.body["stderr"]) == b""
    assert err.body["duration"] >= 0.05
    assert err.message == "command 'sleep 5' timed out after 0.05 s"
    api.connections(2)  # that connection was closed; the agent dials again


def test_busy_guest_is_409_when_asked_not_to_wait(api: Api) -> None:
    api.connections(2)
    command, marker = api.gate("busy-go")
    outcomes: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(api.client.run("vm1", command).stdout))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    try:
        eventually(
            lambda: api.client.guest("vm1")["busy_connections"] == 2, "both connections busy"
        )
        assert api.client.guest("vm1")["busy"] is True
        err = error_of(lambda: api.client.run("vm1", "true", wait=False))
        assert (err.status, err.code) == (409, "guest_busy")
    finally:
        marker.touch()
        for thread in threads:
            thread.join(LONG)
    assert outcomes == [b"released\n", b"released\n"]
    assert api.client.run("vm1", "echo free", wait=False).stdout == b"free\n"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"command": "true", "timeout": -1}', "timeout"),
        (b'{"command": "true", "timeout": "5"}', "timeout"),
        (b'{"command": "true", "timeout": NaN}', "not valid JSON"),
        (b'{"command": "true", "tiemout": 5}', "tiemout"),
        (b'{"command": ""}', "command"),
        (b"{}", "command"),
        (b'{"command": ["ls", 3]}', "command"),
        (b'{"command": []}', "command"),
        (b'{"command": "true", "wait": "no"}', "wait"),
        (b'{"command": "true", "env": {"BAD NAME": "x"}}', "BAD NAME"),
        (b'{"command": "true", "env": ["x"]}', "env"),
        (b'{"command": "true", "cwd": ""}', "cwd"),
    ],
)
def test_bad_run_requests_are_400(api: Api, body: bytes, fragment: str) -> None:
    err = error_of(lambda: api.client.request("POST", "/v1/guests/vm1/run", body))
    assert (err.status, err.code) == (400, "bad_request")
    assert fragment in err.message


def test_bad_probe_and_wait_parameters_are_400(api: Api) -> None:
    err = error_of(lambda: api.client.request("POST", "/v1/guests/vm1/probe", {"timeout": -2}))
    assert (err.status, err.code) == (400, "bad_request")
    err = error_of(lambda: api.client.request("GET", "/v1/guests/vm1?wait=soon"))
    assert (err.status, err.code) == (400, "bad_request")


def test_size_limits(api: Api) -> None:
    # serve --max-command 4K: a longer command is refused, a larger body is refused unread
    err = error_of(lambda: api.client.run("vm1", "echo " + "x" * 5000))
    assert (err.status, err.code) == (400, "command_too_large")
    big = json.dumps({"command": "x" * 200_000}).encode()
    err = error_of(lambda: api.client.request("POST", "/v1/guests/vm1/run", big))
    assert (err.status, err.code) == (413, "body_too_large")
    assert api.client.run("vm1", "echo still fine").stdout == b"still fine\n"


def test_unknown_route_and_method(api: Api) -> None:
    err = error_of(lambda: api.client.request("GET", "/v2/nothing"))
    assert (err.status, err.code) == (404, "not_found")
    err = error_of(lambda: api.client.request("PUT", "/v1/guests"))
    assert (err.status, err.code) == (405, "method_not_allowed")


# -- probe, metrics, drop --------------------------------------------------------------------


def test_probe(api: Api) -> None:
    before = api.client.guest("vm1")["last_probe"]
    result = api.client.probe("vm1")
    assert result["ok"] is True and result["key"] == "vm1" and result["duration"] >= 0
    assert api.client.guest("vm1")["last_probe"] >= before


def test_metrics_in_prometheus_text_format(api: Api) -> None:
    api.client.run("vm1", "exit 1")
    text = api.client.metrics()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) vsock_async_\w+ .+", line), line
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    assert values["vsock_async_guests_connected"] == 1
    assert values["vsock_async_connections_open"] >= 1
    assert values["vsock_async_commands_total"] >= 1
    assert values["vsock_async_commands_failed_total"] >= 1
    assert values["vsock_async_probes_total"] >= 1
    assert values["vsock_async_bytes_sent_total"] > 0
    assert values["vsock_async_bytes_received_total"] > 0
    count = values["vsock_async_exchange_duration_seconds_count"]
    assert values['vsock_async_exchange_duration_seconds_bucket{le="+Inf"}'] == count >= 2
    assert "# TYPE vsock_async_exchange_duration_seconds histogram" in text


def test_drop_closes_the_guest_connections_and_the_agent_comes_back(api: Api) -> None:
    api.connections(2)
    assert api.client.drop("vm1") == {"key": "vm1", "connections_closed": 2}
    api.connections(2)
    assert api.client.run("vm1", "echo back").stdout == b"back\n"


# -- the OpenAPI document ---------------------------------------------------------------------


def test_openapi_document_matches_the_routes() -> None:
    from vsock_async.host.server import CommandServer
    from vsock_async.serve.control_api import ControlAPI
    from vsock_async.serve.metrics import ServeMetrics

    spec = yaml.safe_load((DOCS / "openapi.yaml").read_text())
    assert spec["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in {"get", "post", "put", "delete", "patch"}
    }
    app = ControlAPI(CommandServer(), ServeMetrics()).app
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert documented == served


def test_openapi_error_codes_match_the_code() -> None:
    from vsock_async.serve.control_api import ERROR_STATUS

    spec = yaml.safe_load((DOCS / "openapi.yaml").read_text())
    error = spec["components"]["schemas"]["Error"]["properties"]["error"]
    assert set(error["properties"]["code"]["enum"]) == set(ERROR_STATUS)


def test_openapi_raw_values_match_the_parser() -> None:
    from vsock_async.serve.control_api import BOOLEAN_WORDS

    spec = yaml.safe_load((DOCS / "openapi.yaml").read_text())
    (raw,) = spec["paths"]["/v1/guests/{key}/run"]["post"]["parameters"]
    assert raw["name"] == "raw"
    assert set(raw["schema"]["enum"]) == set(BOOLEAN_WORDS)

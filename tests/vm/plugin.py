"""pytest side of the VM tier: one QEMU boot runs every selected ``@pytest.mark.vm`` test.

On the host, vm-marked items are never run natively (they would connect AF_VSOCK on this
machine). As the test loop starts, a thread boots a guest that runs all of them in one pytest
session, alongside the host tests, and streams a JSON line per report out of its report port;
each host item waits for that run, then replays the reports of its guest twin. Inside the
guest (``VSOCK_ASYNC_IN_VM=1``, set by the guest's init) the tests simply run and this plugin
only writes that report stream.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
import termios
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import pytest
from _pytest.reports import CollectReport, TestReport
from _pytest.terminal import TerminalReporter
from packaging.utils import canonicalize_name

from . import image, runner

REPORT_FIELD_LIMIT = 64 * 1024
CONSOLE_TAIL_LINES = 60
DEFAULT_TIMEOUT = 300.0
GUEST_SKIPPED_PLUGINS = frozenset({"_hypothesis_pytestplugin"})


def in_vm() -> bool:
    """True only inside the tier's guest, whose init sets the variable and whose payload
    carries /vmrun/run.sh: the variable alone must not lift the safety guard on a host."""
    return os.environ.get("VSOCK_ASYNC_IN_VM") == "1" and Path("/vmrun/run.sh").is_file()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vm", "real-kernel VM tier (tests marked vm)")
    group.addoption(
        "--no-vm",
        action="store_true",
        help="skip tests marked vm instead of booting the QEMU guest for them",
    )
    group.addoption(
        "--vm-keep",
        action="store_true",
        help="keep the VM work dir (initrd, console and report logs); "
        "it is always kept when the VM run itself fails",
    )
    group.addoption(
        "--vm-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"hard deadline for the whole VM run (default {DEFAULT_TIMEOUT:.0f})",
    )


def pytest_configure(config: pytest.Config) -> None:
    if in_vm():
        # tests/conftest.py sets the guard for host runs; inside the guest connecting is the point.
        os.environ.pop("VSOCK_ASYNC_FORBID_VSOCK_CONNECT", None)
        config.pluginmanager.register(GuestReporter(os.environ["VSOCK_ASYNC_VM_REPORT"]))
    else:
        config.pluginmanager.register(HostVmTier(config), "vsock-async-vm-host")


def _clip(text: str) -> str:
    if len(text) <= REPORT_FIELD_LIMIT:
        return text
    return text[:REPORT_FIELD_LIMIT] + f"\n[... {len(text) - REPORT_FIELD_LIMIT} chars clipped]"


class GuestReporter:
    """Writes every test and collection report to the report port as one JSON line."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY)
        self._emit({"event": "pytest-ready", "uptime": _uptime()})

    def _emit(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record) + "\n").encode()
        while data:
            data = data[os.write(self._fd, data) :]

    def pytest_runtest_logreport(self, report: TestReport) -> None:
        longrepr: Any = report.longrepr
        if not (isinstance(longrepr, tuple) or longrepr is None):
            longrepr = _clip(report.longreprtext)
        record = {
            "event": "report",
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "longrepr": longrepr,
            "sections": [(title, _clip(text)) for title, text in report.sections],
            "duration": report.duration,
        }
        if hasattr(report, "wasxfail"):
            record["wasxfail"] = report.wasxfail
        self._emit(record)

    def pytest_collectreport(self, report: CollectReport) -> None:
        if report.failed:
            self._emit(
                {
                    "event": "collect",
                    "nodeid": report.nodeid,
                    "longrepr": _clip(report.longreprtext),
                }
            )

    def pytest_unconfigure(self) -> None:
        self._emit({"event": "pytest-done", "uptime": _uptime()})
        if os.isatty(self._fd):
            termios.tcdrain(self._fd)
        os.close(self._fd)


@dataclass
class GuestRun:
    """What came back from one boot: reports per node id, and why the run fell short if it did."""

    reports: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    collect_errors: list[str] = field(default_factory=list)
    exit_status: int | None = None
    problem: str | None = None
    uptimes: dict[str, float] = field(default_factory=dict)
    summary: str = ""


class HostVmTier:
    """Host-side half: boots the guest once, then replays guest reports on the host items."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self._items: dict[str, pytest.Item] = {}
        self._run: GuestRun | None = None
        self._unavailable: str | None = None
        self._skipped_by_option = 0
        self._booting: Future[GuestRun] | None = None
        self._stop = threading.Event()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Runs after -m/-k deselection, so only the tests really selected go to the guest."""
        selected = [item for item in items if item.get_closest_marker("vm") is not None]
        if self._config.getoption("no_vm"):
            self._skipped_by_option = len(selected)
            for item in selected:
                item.add_marker(pytest.mark.skip(reason="VM tier skipped (--no-vm)"))
            return
        self._items = {item.nodeid: item for item in selected}

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> None:
        """Start the boot in a thread: QEMU is a separate process, so under emulation the
        guest's tests take a core while the host tests run here, not minutes after them."""
        if not self._items or session.config.option.collectonly or session.testsfailed:
            return
        booting: Future[GuestRun] = Future()

        def boot() -> None:
            try:
                booting.set_result(self._boot_guest())
            except BaseException as exc:
                booting.set_exception(exc)

        self._booting = booting
        threading.Thread(target=boot, name="vm-tier-boot", daemon=True).start()

    def pytest_unconfigure(self) -> None:
        """A run that ends first (``-x``, Ctrl-C) stops the guest: QEMU is our child."""
        if self._booting is not None and not self._booting.done():
            self._stop.set()
            with contextlib.suppress(Exception):
                self._booting.exception(timeout=30)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        if item.nodeid not in self._items:
            return None
        if self._run is None:
            self._run = self._booting.result() if self._booting else self._boot_guest()
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in self._replay(item, self._run):
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _boot_guest(self) -> GuestRun:
        started = time.monotonic()
        try:
            base = image.base_image()
        except image.VmUnavailable as exc:
            self._unavailable = f"QEMU guest unavailable on this machine: {exc}"
            return GuestRun(problem=self._unavailable)
        keep = bool(self._config.getoption("vm_keep"))
        workdir = Path(tempfile.mkdtemp(prefix="vsock_async-vm-"))
        initrd = workdir / "initrd"
        image.write_initrd(base, image.PROJECT, self._guest_script(base), initrd)
        boot = runner.boot(
            base.kernel.vmlinuz,
            initrd,
            workdir,
            timeout=float(self._config.getoption("vm_timeout")),
            stop=self._stop,
        )
        run = _parse_report(boot.report)
        if boot.failure and run.problem is None:
            run.problem = boot.failure
        if run.problem is None and run.exit_status is None:
            run.problem = "the guest powered off without reporting pytest's exit status"
        prepared = time.monotonic() - started - boot.seconds
        built = f"image built in {prepared:.1f} s" if base.built else "image cached"
        run.summary = (
            f"{len(self._items)} tests in one boot, {boot.accel}, kernel "
            f"{base.kernel.release}, {built}, VM run {boot.seconds:.1f} s"
        )
        if {"pytest-ready", "pytest-done"} <= run.uptimes.keys():
            ready, done = run.uptimes["pytest-ready"], run.uptimes["pytest-done"]
            run.summary += f" (guest pytest ready at {ready:.1f} s, tests {done - ready:.1f} s)"
        # A boot stopped because the pytest run ended first has nothing to look at.
        if keep or (run.problem is not None and not self._stop.is_set()):
            keep = True
            run.summary += f"; work dir kept: {workdir}"
        if run.problem is not None:
            run.problem += f"\n--- guest console ({boot.console}), last lines ---\n" + _tail(
                boot.console
            )
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        return run

    def _guest_script(self, base: image.BaseImage) -> str:
        """The payload's run.sh: run exactly the selected node ids, from the same rootdir.

        The host's entry-point plugins are named with -p and autoloading is off: pytest
        rewrites the asserts of every module of an autoloaded plugin's package (all of
        hypothesis and anyio), which under emulation costs more than the tests themselves.
        Hypothesis' plugin is left out: its report header alone imports all of hypothesis
        (4 s under emulation), and ``@given`` tests run without it.
        """
        rootdir = str(self._config.rootpath)
        option = self._config.option
        args = ["-p", "no:cacheprovider", f"--rootdir={rootdir}", "-v" * max(1, option.verbose)]
        for plugin, dist in self._config.pluginmanager.list_plugin_distinfo():
            if (
                isinstance(plugin, ModuleType)
                and plugin.__name__ not in GUEST_SKIPPED_PLUGINS
                and canonicalize_name(dist.project_name) in base.distributions
            ):
                args += ["-p", plugin.__name__]
        if option.tbstyle != "auto":
            args.append(f"--tb={option.tbstyle}")
        if option.showlocals:
            args.append("--showlocals")
        command = [str(base.python), "-m", "pytest", *args, "--", *self._items]
        return "\n".join(
            [
                f"cd {shlex.quote(rootdir)} || exit 70",
                f"export PYTHONPATH={shlex.quote(':'.join((*base.site_dirs, str(image.PROJECT))))}",
                "export PYTHONUTF8=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1",
                f"exec {shlex.join(command)}",
                "",
            ]
        )

    def _replay(self, item: pytest.Item, run: GuestRun) -> list[TestReport]:
        keywords: dict[str, Literal[1]] = dict.fromkeys(item.keywords, 1)

        def report(when: Any, outcome: Any, longrepr: Any, **extra: Any) -> TestReport:
            return TestReport(
                item.nodeid, item.location, keywords, outcome, longrepr, when, **extra
            )

        if self._unavailable is not None:
            path, lineno, _ = item.location
            where = (
                str(self._config.rootpath / path),
                (lineno or 0) + 1,
                f"Skipped: {self._unavailable}",
            )
            return [report("setup", "skipped", where), report("teardown", "passed", None)]
        reports = []
        for record in run.reports.get(item.nodeid, []):
            longrepr = record["longrepr"]
            extra = {"wasxfail": record["wasxfail"]} if "wasxfail" in record else {}
            reports.append(
                report(
                    record["when"],
                    record["outcome"],
                    tuple(longrepr) if isinstance(longrepr, list) else longrepr,
                    sections=[tuple(section) for section in record["sections"]],
                    duration=record["duration"],
                    **extra,
                )
            )
        phases = [r.when for r in reports]
        if "teardown" not in phases:
            missing = next(when for when in ("setup", "call", "teardown") if when not in phases)
            if run.collect_errors:
                why = "the guest could not collect the tests:\n" + "\n".join(run.collect_errors)
            else:
                why = run.problem or f"guest pytest exited with status {run.exit_status}"
            reports.append(
                report(
                    missing,
                    "failed",
                    f"VM tier: no {missing} report from the guest for this test;\n{why}",
                )
            )
        return reports

    def pytest_terminal_summary(self, terminalreporter: TerminalReporter) -> None:
        if self._unavailable is not None:
            terminalreporter.write_sep("!", "VM TIER DID NOT RUN", red=True, bold=True)
            terminalreporter.write_line(self._unavailable, red=True, bold=True)
        elif self._skipped_by_option:
            terminalreporter.write_sep("-", "VM tier", yellow=True)
            terminalreporter.write_line(
                f"--no-vm given: {self._skipped_by_option} vm tests skipped", yellow=True
            )
        elif self._run is not None:
            terminalreporter.write_sep("-", "VM tier")
            terminalreporter.write_line(self._run.summary)


def _parse_report(path: Path) -> GuestRun:
    run = GuestRun()
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            run.problem = f"the report stream holds a garbled line: {line[:200]!r}"
            continue
        if record["event"] == "report":
            run.reports[record["nodeid"]].append(record)
        elif record["event"] == "collect":
            run.collect_errors.append(f"{record['nodeid']}: {record['longrepr']}")
        elif record["event"] == "exit":
            run.exit_status = record["status"]
        elif "uptime" in record:
            run.uptimes[record["event"]] = record["uptime"]
    return run


def _uptime() -> float:
    """Seconds since the guest kernel started: where a VM run spends its time."""
    with open("/proc/uptime") as uptime:
        return float(uptime.read().split()[0])


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no console log)"
    return "\n".join(lines[-CONSOLE_TAIL_LINES:])

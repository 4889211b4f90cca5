"""``make_venv`` of scripts/_python.sh, run by bash on throw-away directories: a virtualenv of
another Python version is rebuilt, and pip runs only when something it installs changed.

pip and uv are not what is tested: the virtualenvs are made without pip (fast, offline) and get
a stand-in ``pip`` module that records each call and installs nothing but, when asked for uv, a
stand-in ``uv`` that records its calls too (or fails then, with FAKE_PIP_NO_UV set).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_PIP = """import os, sys
with open(sys.argv[0] + ".calls", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[-1] == "uv":
    if os.environ.get("FAKE_PIP_NO_UV"):
        sys.exit(1)
    uv = os.path.join(os.path.dirname(sys.executable), "uv")
    with open(uv, "w") as f:
        f.write('#!/bin/sh\\necho "$*" >> "$0.calls"\\n')
    os.chmod(uv, 0o755)
"""


def find_python(minor: int) -> str:
    found = subprocess.run(
        ["bash", "-c", f". scripts/_python.sh && find_python {minor}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not found:
        pytest.skip(f"CPython 3.{minor} not found")
    return found


def venv_maker(tmp_path: Path, python: str) -> Path:
    """A PYTHON for make_venv: it makes virtualenvs without pip, then adds the stand-in pip."""
    wrapper = tmp_path / f"python-{Path(python).name}"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2" = "-m venv" ]; then\n'
        f'    "{python}" -m venv --without-pip "$3" || exit 1\n'
        '    site=$("$3/bin/python" -c'
        " \"import sysconfig; print(sysconfig.get_path('purelib'))\")\n"
        '    mkdir -p "$site/pip" && touch "$site/pip/__init__.py"\n'
        f"    cat > \"$site/pip/__main__.py\" <<'EOF'\n{FAKE_PIP}EOF\n"
        "    exit 0\n"
        "fi\n"
        f'exec "{python}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def make_venv(project: Path, python: Path, venv: Path, extras: str, *, no_uv: bool = False) -> str:
    """Run make_venv; its stderr."""
    script = f'set -euo pipefail; . "{REPO}/scripts/_python.sh"; make_venv "$@"'
    args = [str(python), str(venv), extras]
    env = {**os.environ, "FAKE_PIP_NO_UV": "1"} if no_uv else None
    return subprocess.run(
        ["bash", "-c", script, "_", *args],
        cwd=project,
        check=True,
        timeout=60,
        env=env,
        capture_output=True,
        text=True,
    ).stderr


def pip_calls(venv: Path) -> list[str]:
    (calls,) = venv.glob("lib/python3.*/site-packages/pip/__main__.py.calls") or [None]
    return calls.read_text().splitlines() if calls is not None else []


def uv_calls(venv: Path) -> list[str]:
    calls = venv / "bin/uv.calls"
    return calls.read_text().splitlines() if calls.exists() else []


GET_UV = "install --quiet --disable-pip-version-check uv"


def uv_install(venv: Path, extras: str) -> str:
    return f"pip install --quiet --python {venv}/bin/python --compile-bytecode -e .[{extras}]"


def venv_version(venv: Path) -> str:
    return subprocess.run(
        [venv / "bin/python", "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "x"\n')
    return project


def test_a_venv_of_another_python_version_is_rebuilt(tmp_path: Path, project: Path) -> None:
    py311, py313 = find_python(11), find_python(13)
    venv = tmp_path / "venv"
    make_venv(project, venv_maker(tmp_path, py313), venv, "test")
    assert venv_version(venv) == "3.13"
    make_venv(project, venv_maker(tmp_path, py311), venv, "test")
    assert venv_version(venv) == "3.11"
    assert pip_calls(venv) == [GET_UV]
    assert uv_calls(venv) == [uv_install(venv, "test")]


def test_the_install_runs_only_when_something_changed(tmp_path: Path, project: Path) -> None:
    python = venv_maker(tmp_path, find_python(sys.version_info[1]))
    venv = tmp_path / "venv"
    make_venv(project, python, venv, "serve")
    make_venv(project, python, venv, "serve")
    assert len(uv_calls(venv)) == 1  # nothing changed: no install
    make_venv(project, python, venv, "test")  # another extra: installed beside the first
    assert uv_calls(venv)[-1] == uv_install(venv, "serve,test")
    make_venv(project, python, venv, "serve")  # already there
    assert len(uv_calls(venv)) == 2
    with (project / "pyproject.toml").open("a") as f:
        f.write('version = "2"\n')
    make_venv(project, python, venv, "serve")
    assert len(uv_calls(venv)) == 3
    assert pip_calls(venv) == [GET_UV]  # uv came once


def test_pip_installs_when_uv_cannot_be_had(tmp_path: Path, project: Path) -> None:
    python = venv_maker(tmp_path, find_python(sys.version_info[1]))
    venv = tmp_path / "venv"
    err = make_venv(project, python, venv, "serve", no_uv=True)
    assert "uv could not be had, pip installs instead" in err
    assert pip_calls(venv) == [GET_UV, "install --quiet --disable-pip-version-check -e .[serve]"]
    assert not (venv / "bin/uv").exists()


def test_a_venv_left_broken_is_rebuilt(tmp_path: Path, project: Path) -> None:
    python = venv_maker(tmp_path, find_python(sys.version_info[1]))
    venv = tmp_path / "venv"
    make_venv(project, python, venv, "serve")
    shutil.rmtree(next(venv.glob("lib/python3.*")))
    (venv / "bin/python").unlink()
    make_venv(project, python, venv, "serve")
    assert venv_version(venv) == f"3.{sys.version_info[1]}"
    assert uv_calls(venv) == [uv_install(venv, "serve")]


# -- vm-deps.sh ---------------------------------------------------------------------------------

INSTALL = "install -y -qq --no-install-recommends"


def vm_deps(
    tmp_path: Path, present: list[str], uid: int, apt_fails_on: str = ""
) -> tuple[int, str, list[str]]:
    """Run scripts/vm-deps.sh where only ``present`` commands exist and ``id -u`` says ``uid``;
    a stand-in apt-get records its calls and fails on the package ``apt_fails_on``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    calls = tmp_path / "apt-calls"
    stubs = {name: "exit 0" for name in present}
    stubs["id"] = f"echo {uid}"
    stubs["apt-get"] = (
        f'echo "$*" >> {calls}\n'
        f'case "$*" in *" {apt_fails_on}"*) [ -n "{apt_fails_on}" ] && exit 100;; esac\nexit 0'
    )
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run(
        [bash, str(REPO / "scripts/vm-deps.sh")],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return (
        result.returncode,
        result.stderr,
        calls.read_text().splitlines() if calls.exists() else [],
    )


def test_vm_deps_installs_systemd_for_the_deploy_checks_and_survives_without_it(
    tmp_path: Path,
) -> None:
    vm_tier = ["qemu-system-x86_64", "busybox"]
    status, err, calls = vm_deps(tmp_path / "a", vm_tier, uid=0, apt_fails_on="systemd")
    assert status == 0
    assert calls == ["update -qq", f"{INSTALL} systemd"]
    assert "tests/deploy skips its systemd checks" in err

    status, _, calls = vm_deps(tmp_path / "b", ["busybox"], uid=0)
    assert status == 0
    assert calls == ["update -qq", f"{INSTALL} qemu-system-x86", f"{INSTALL} systemd"]

    status, _, calls = vm_deps(tmp_path / "c", vm_tier, uid=1000)  # not root: nothing to do
    assert (status, calls) == (0, [])

    status, err, _ = vm_deps(tmp_path / "d", ["busybox"], uid=1000)
    assert status == 1 and "qemu-system-x86" in err

    status, _, calls = vm_deps(tmp_path / "e", [*vm_tier, "systemd-analyze"], uid=0)
    assert (status, calls) == (0, [])

"""The built wheel, installed into a fresh virtualenv outside the checkout, works from any directory.

Builds the wheel from a copy of the checkout's sources (so that no build/ or egg-info lands in the checkout),
installs it (with its runtime dependencies, through pip's cache) into a new virtualenv, then runs the
installed ``plantstream`` command from an unrelated working directory: ``validate`` on the demo topology and
``services status`` against the local services this checkout runs (their state directory passed through
``PLANTSTREAM_LOCAL_DIR``). Nothing may be written next to the installed code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "connectors", "localservices")
BUILD_TIMEOUT = 600.0
INSTALL_TIMEOUT = 600.0
RUN_TIMEOUT = 120.0


def _checkout_local_dir() -> Path:
    """The state directory of the running services: $PLANTSTREAM_LOCAL_DIR (make and conftest set it), else
    the checkout's .local/."""
    override = os.environ.get("PLANTSTREAM_LOCAL_DIR", "").strip()
    return Path(override).expanduser().resolve() if override else REPO / ".local"


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment for the installed command: nothing that would put the checkout on its path, and no
    state directory unless given (port overrides, PLANTSTREAM_*_PORT, are kept)."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PLANTSTREAM_LOCAL_DIR")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "COLUMNS": "200", "NO_COLOR": "1", **extra})
    return env


def _run(
    cmd: Sequence[str | Path], *, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    print(f"$ {' '.join(str(c) for c in cmd)}  ({time.monotonic() - started:.1f}s, exit {proc.returncode})")
    return proc


def _ok(proc: subprocess.CompletedProcess[str], what: str) -> str:
    assert proc.returncode == 0, (
        f"{what} failed (exit {proc.returncode})\n--- stdout ---\n{proc.stdout[-4000:]}\n"
        f"--- stderr ---\n{proc.stderr[-4000:]}"
    )
    return proc.stdout + proc.stderr


def _copy_sources(dest: Path) -> Path:
    """The checkout without its virtualenv, state, VCS and build leftovers."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        top = Path(directory).resolve() == REPO
        return {
            n
            for n in names
            if n == "__pycache__"
            or n.endswith(".egg-info")
            or (top and (n.startswith(".") or n in ("build", "dist")))
        }

    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)
    return dest


def _snapshot(root: Path) -> set[str]:
    """Files under ``root``, bytecode caches aside (Python may write those on import)."""
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    }


@dataclass
class Installed:
    venv: Path
    site_packages: Path
    bin: Path
    workdir: Path
    wheel: Path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    env = _clean_env()

    src = _copy_sources(base / "src")
    wheels = base / "wheels"
    proc = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, src],
        cwd=base,
        env=env,
        timeout=BUILD_TIMEOUT,
    )
    _ok(proc, "pip wheel")
    built = sorted(wheels.glob("plantstream-*.whl"))
    assert len(built) == 1, f"expected one plantstream wheel in {wheels}, found {built}"
    wheel = built[0]
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert "localservices/pom.xml" in names, "pom.xml is not package data in the wheel"
    assert "localservices/harness.py" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names), "tests or bench shipped in the wheel"

    venv = base / "venv"
    _ok(_run([sys.executable, "-m", "venv", venv], cwd=base, env=env, timeout=RUN_TIMEOUT), "python -m venv")
    py = venv / "bin" / "python"
    # Runtime dependencies come from PyPI (or pip's cache); no extras.
    install = [py, "-m", "pip", "install", "-q", wheel]
    _ok(_run(install, cwd=base, env=env, timeout=INSTALL_TIMEOUT), "pip install of the wheel")

    out = _ok(
        _run(
            [py, "-c", "import json, sysconfig; print(json.dumps(sysconfig.get_paths()['purelib']))"],
            cwd=base,
            env=env,
            timeout=RUN_TIMEOUT,
        ),
        "locating site-packages",
    )
    site_packages = Path(json.loads(out.strip().splitlines()[-1]))
    workdir = base / "elsewhere"
    workdir.mkdir()
    return Installed(venv=venv, site_packages=site_packages, bin=venv / "bin", workdir=workdir, wheel=wheel)


def test_installed_from_the_wheel_not_the_checkout(installed: Installed) -> None:
    code = (
        "import json, importlib.resources, pipeline, connectors, localservices\n"
        "from localservices import harness\n"
        "print(json.dumps({'modules': [m.__file__ for m in (pipeline, connectors, localservices)],\n"
        "  'pom': str(importlib.resources.files('localservices') / 'pom.xml'),\n"
        "  'local_dir': str(harness.local_dir())}))\n"
    )
    xdg = installed.workdir.parent / "xdg-state"
    proc = _run(
        [installed.bin / "python", "-c", code],
        cwd=installed.workdir,
        env=_clean_env(XDG_STATE_HOME=str(xdg)),
        timeout=RUN_TIMEOUT,
    )
    info = json.loads(_ok(proc, "importing the installed packages").strip().splitlines()[-1])
    for module_file in info["modules"]:
        assert Path(module_file).resolve().is_relative_to(installed.site_packages.resolve()), module_file
    pom = Path(info["pom"])
    assert pom.is_file(), f"{pom} missing"
    assert pom.resolve().parent == (installed.site_packages / "localservices").resolve()
    # Without PLANTSTREAM_LOCAL_DIR the state goes to the per-user directory, never next to the code.
    assert Path(info["local_dir"]) == xdg / "plantstream"
    assert not xdg.exists(), "computing local_dir() created it"


def test_validate_from_any_directory(installed: Installed) -> None:
    demo = (REPO / "topologies" / "demo.yaml").resolve()
    before = _snapshot(installed.site_packages)
    proc = _run(
        [installed.bin / "plantstream", "validate", demo],
        cwd=installed.workdir,
        env=_clean_env(),
        timeout=RUN_TIMEOUT,
    )
    output = _ok(proc, "plantstream validate")
    assert "is valid" in output, output
    assert _snapshot(installed.site_packages) == before, "validate wrote into site-packages"
    assert not (installed.workdir / ".local").exists()


def test_services_status_sees_the_checkout_services(
    installed: Installed, services_env: dict[str, str]
) -> None:
    """``services_env`` makes sure the checkout's Kafka and PostgreSQL are up (idempotent: reuses them)."""
    local = _checkout_local_dir()
    before = _snapshot(installed.site_packages)
    proc = _run(
        [installed.bin / "plantstream", "services", "status"],
        cwd=installed.workdir,
        env=_clean_env(PLANTSTREAM_LOCAL_DIR=str(local)),
        timeout=RUN_TIMEOUT,
    )
    output = _ok(proc, "plantstream services status")
    assert "kafka" in output and "postgres" in output, output
    # It looked in the checkout's state directory: the log paths it lists are there, and it recognises the
    # running Kafka as its own (the pid from the checkout's pid file).
    assert str(local / "kafka" / "kafka.log") in output, output
    kafka_pid = (local / "kafka" / "kafka.pid").read_text().split()[0]
    kafka_row = next(line for line in output.splitlines() if "kafka" in line and "kafka.log" in line)
    assert kafka_pid in kafka_row.split(), f"kafka pid {kafka_pid} not reported: {kafka_row!r}"

    assert not (installed.site_packages / ".local").exists(), "state written into site-packages"
    assert not (installed.venv / ".local").exists()
    assert not (installed.workdir / ".local").exists()
    assert _snapshot(installed.site_packages) == before, "services status wrote into site-packages"

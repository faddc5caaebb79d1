"""Start simulated devices as child processes and wait until they answer (for `simulate`, tests, bench)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO
from urllib.parse import urlparse


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _spawn(module: str, args: list[str], log: Path | None) -> subprocess.Popen[bytes]:
    out: IO[bytes] | int = subprocess.DEVNULL
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT)


def start_opcua_plant(
    endpoint: str, *, args: list[str] | None = None, log: Path | None = None, timeout: float = 30.0
) -> subprocess.Popen[bytes]:
    """The simulated plant at ``endpoint``; returns once its TCP port accepts connections."""
    proc = _spawn("connectors.sim.opcua_plant", ["--endpoint", endpoint, *(args or [])], log)
    url = urlparse(endpoint)
    host, port = url.hostname or "127.0.0.1", url.port or 4840
    deadline = time.monotonic() + timeout
    while not _tcp_open(host, port):
        if proc.poll() is not None:
            raise RuntimeError(f"the simulated OPC UA plant exited with {proc.returncode} (log: {log})")
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(
                f"the simulated OPC UA plant did not listen on {host}:{port} in {timeout:.0f}s"
            )
        time.sleep(0.1)
    return proc


def start_bacnet_ahu(
    address: str,
    instance: int,
    *,
    args: list[str] | None = None,
    log: Path | None = None,
    timeout: float = 30.0,
) -> subprocess.Popen[bytes]:
    """The simulated air-handling unit; returns once it says it is ready (a line on stdout)."""
    cmd = [
        sys.executable,
        "-m",
        "connectors.sim.bacnet_ahu",
        "--address",
        address,
        "--instance",
        str(instance),
        "--ready-line",
        *(args or []),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    lines: list[bytes] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(b"READY"):
            _drain(proc, log)
            return proc
    stop(proc)
    raise RuntimeError(
        "the simulated BACnet device did not start: " + b"".join(lines[-20:]).decode(errors="replace")
    )


def _drain(proc: subprocess.Popen[bytes], log: Path | None) -> None:
    """Keep reading the child's output so it never blocks on a full pipe."""
    import threading

    def pump() -> None:
        assert proc.stdout is not None
        fh = None
        if log is not None:
            try:
                log.parent.mkdir(parents=True, exist_ok=True)
                fh = open(log, "ab")  # noqa: SIM115 - closed below
            except OSError:
                fh = None  # still drain the pipe, or the child blocks on a full one
        try:
            for line in proc.stdout:
                if fh is not None:
                    fh.write(line)
                    fh.flush()
        finally:
            if fh is not None:
                fh.close()

    threading.Thread(target=pump, name="sim-output", daemon=True).start()


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it does not go."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

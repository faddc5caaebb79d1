"""Private instances of the local services for tests that stop, restart or break them.

The shared services (``make services-up``) stay untouched: each private set has its own state directory and
free ports, and is started and stopped through ``plantstream services`` in a child process, as a user would.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from connectors.common.spool import scan
from pipeline.core import codec
from pipeline.core.records import validate_batch

# Which environment variable gives each private port (see localservices.harness.ports_from_env).
_PORTS = {
    "kafka": ("PLANTSTREAM_KAFKA_PORT", "PLANTSTREAM_KAFKA_CONTROLLER_PORT", "PLANTSTREAM_KAFKA_SASL_PORT"),
    "postgres": ("PLANTSTREAM_PG_PORT",),
    "mosquitto": ("PLANTSTREAM_MQTT_PORT",),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Private:
    """``names`` on free ports under ``root``; :meth:`down` / :meth:`up` stop and start one of them."""

    def __init__(self, root: Path, names: list[str]) -> None:
        self.root, self.names = root, names
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PLANTSTREAM_")}
        self.env["PLANTSTREAM_LOCAL_DIR"] = str(root)
        for name in names:
            for var in _PORTS[name]:
                self.env[var] = str(free_port())

    def _services(self, verb: str, *names: str, timeout: float = 180) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "services", verb, *names],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"services {verb} {names}: {done.stdout[-1500:]}{done.stderr[-1500:]}"

    def up(self, *names: str) -> None:
        self._services("up", *(names or self.names))

    def down(self, *names: str) -> None:
        self._services("down", *(names or self.names))

    def connection(self) -> dict[str, str]:
        """PLANTSTREAM_KAFKA, PLANTSTREAM_PG_DSN, PLANTSTREAM_MQTT_URL of the private set."""
        from localservices import harness

        saved = dict(os.environ)
        try:
            os.environ.update({k: v for k, v in self.env.items() if k.startswith("PLANTSTREAM_")})
            return harness.connection_env()
        finally:
            os.environ.clear()
            os.environ.update(saved)


@contextmanager
def private(tmp: Path, *names: str) -> Iterator[Private]:
    services = Private(tmp, list(names))
    services.up()
    try:
        yield services
    finally:
        services.down()


def child_env(**over: str) -> dict[str, str]:
    """The test's environment with the given PLANTSTREAM_* settings: a topology's addresses are overridden
    by PLANTSTREAM_KAFKA, PLANTSTREAM_PG_DSN and PLANTSTREAM_MQTT_URL: a child must get the private ones."""
    env = dict(os.environ)
    env.update(over)
    return env


def spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``plantstream ARGS`` as a child process, its output in ``log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def deploy(topo_file: Path, env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "deploy", str(topo_file)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]


# -- what the scenarios share ------------------------------------------------------------------------


def spooled(d: Path) -> set[tuple[str, int]]:
    """(series, ts) of every reading in the spool at ``d`` from its cursor on."""
    out: set[tuple[str, int]] = set()
    for rec in scan(d) if d.exists() else []:
        b = validate_batch(codec.loads(rec.value))[0]
        out |= {(f"{b['site']}/{b['device']}/{r['point']}", r["ts"]) for r in b["readings"]}
    return out


def spool_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("seg-*.log")) if d.exists() else 0


def terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def replayed_then_drained(proc: subprocess.Popen[bytes], log: Path, spool: Path) -> None:
    """A restarted connector sent what its predecessor left in the spool (its log and its spool_resent
    counter say so); a clean stop then leaves nothing behind: Kafka has every record."""
    from tests.conftest import wait_for

    assert "sending them (again)" in log.read_text()
    wait_for(
        lambda: re.search(r"spool_resent=[1-9]", log.read_text()) is not None,
        30,
        "the spool_resent counter in the source's stats line",
    )
    terminate(proc)
    assert proc.returncode == 0
    assert spooled(spool) == set()


def readings_rows(dsn: str, schema: str) -> list[tuple[str, int, float]]:
    """(series, ts ms, value) of every row of the sink's ``readings`` table (none before it exists)."""
    with psycopg.connect(dsn) as conn:
        try:
            rows = conn.execute(
                f"SELECT series, (extract(epoch FROM time) * 1000)::bigint, value FROM {schema}.readings"
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return []
    return [(r[0], int(r[1]), float(r[2])) for r in rows]

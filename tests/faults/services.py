"""Private instances of the local services for tests that stop, restart or break them.

The shared services (``make services-up``) stay untouched: each private set has its own state directory and
free ports, and is started and stopped through ``plantstream services`` in a child process, as a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import yaml
from asyncua import ua
from asyncua.common.node import Node
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion

from connectors.common.spool import scan
from connectors.sim.opcua_plant import PlantOptions, PlantServer
from pipeline.core import codec
from pipeline.core.records import now_ms, validate_batch
from pipeline.topology import Topology, validate_data
from tests.conftest import wait_for

Key = tuple[str, int]  # (site/device/point, ts ms)

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


def deployed(topo: dict[str, Any], tmp_path: Path, env: dict[str, str]) -> tuple[Path, Topology]:
    """``topo`` written to a file in ``tmp_path`` and deployed; the file and its validated topology."""
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topo))
    deploy(topo_file, env)
    return topo_file, validate_data(topo)


def kill_halfway(kafka: Private, proc: subprocess.Popen[bytes], outage: float) -> tuple[int, int, float]:
    """Kafka stopped, and ``proc`` SIGKILLed halfway through the ``outage``: (stopped at, killed at) in
    epoch ms, and the monotonic time the outage ends."""
    kafka.down("kafka")
    down = now_ms()
    ends = time.monotonic() + outage
    time.sleep(outage / 2)  # the outage itself, half of it before the kill
    killed = now_ms()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return down, killed, ends


def spooled_values(d: Path) -> dict[Key, float]:
    """(series, ts) → value of every reading in the spool at ``d`` from its cursor on."""
    out: dict[Key, float] = {}
    for rec in scan(d) if d.exists() else []:
        b = validate_batch(codec.loads(rec.value))[0]
        out.update({(f"{b['site']}/{b['device']}/{r['point']}", r["ts"]): r["value"] for r in b["readings"]})
    return out


def spooled(d: Path) -> set[Key]:
    """(series, ts) of every reading in the spool at ``d`` from its cursor on."""
    return set(spooled_values(d))


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


def replayed_then_drained(proc: subprocess.Popen[bytes], log: Path, spools: dict[str, Path]) -> None:
    """A restarted connector sent what its predecessor left in each source's spool (``spools``: source id →
    directory; its log and each source's spool_resent counter say so); a clean stop then leaves nothing
    behind: Kafka has every record."""

    def resent(source: str) -> bool:
        return re.search(rf"source {source}: .*spool_resent=[1-9]", log.read_text()) is not None

    for source in spools:
        assert re.search(rf"spool {source}: \d+ record\(s\) .*sending them \(again\)", log.read_text()), (
            source
        )
        wait_for(
            partial(resent, source), 30, f"the spool_resent counter in the stats line of source {source}"
        )
    terminate(proc)
    assert proc.returncode == 0
    assert {s: spooled(d) for s, d in spools.items()} == {s: set() for s in spools}


def readings_table(dsn: str, schema: str) -> list[tuple[str, int, float, str]]:
    """(series, ts ms, value, quality) of every row of the sink's ``readings`` (none before it exists)."""
    with psycopg.connect(dsn) as conn:
        try:
            rows = conn.execute(
                "SELECT series, (extract(epoch FROM time) * 1000)::bigint, value, quality "
                f'FROM "{schema}".readings'
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return []
    return [(str(s), int(ts), float(v), str(q)) for s, ts, v, q in rows]


def readings_rows(dsn: str, schema: str) -> list[tuple[str, int, float]]:
    """(series, ts ms, value) of every row of the sink's ``readings`` table (none before it exists)."""
    return [(s, ts, v) for s, ts, v, _ in readings_table(dsn, schema)]


def read_to_end(bootstrap: str, topic: str) -> list[bytes]:
    """Every record of ``topic``, read up to the end offsets it has now (a wait on offsets, not on time)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"read-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        parts = sorted(c.list_topics(topic, timeout=30).topics[topic].partitions)
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in parts}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out: list[bytes] = []

        def at_end() -> bool:
            for m in c.consume(1000, 0.2):
                if m.error() is None:
                    out.append(m.value() or b"")
            # The position skips transaction markers, which the last message offset would not.
            pos = c.position([TopicPartition(topic, p) for p in parts])
            return all(tp.offset >= ends[tp.partition] or ends[tp.partition] == 0 for tp in pos)

        wait_for(at_end, 60, f"the end of {topic}", interval=0)
        return out
    finally:
        c.close()


def raw_keys(bootstrap: str, topic: str) -> set[Key]:
    """(series, ts) of every reading in telemetry.raw (``topic``)."""
    out: set[Key] = set()
    for value in read_to_end(bootstrap, topic):
        b = validate_batch(codec.loads(value))[0]
        out |= {(f"{b['site']}/{b['device']}/{r['point']}", r["ts"]) for r in b["readings"]}
    return out


class Plant:
    """The simulated OPC UA plant in a thread of this process; ``writes`` is every (series, ts) → value it
    produced, series as the connector names them under site ``s``. The plant keeps nothing for a client
    that missed a value: this record is what the source could have accepted."""

    def __init__(self, endpoint: str) -> None:
        self.server = PlantServer(PlantOptions(endpoint=endpoint, loops=1, tanks=4, rate=5.0))
        self.writes: dict[Key, Any] = {}
        self.lock = threading.Lock()
        write = self.server._write

        async def recorded(
            node: Node, value: Any, vtype: ua.VariantType, source_ts: datetime, status: Any = None
        ) -> None:
            await write(node, value, vtype, source_ts, status)
            path = str(node.nodeid.Identifier).split("/")  # Plant/Tanks/TK101/Temperature
            with self.lock:
                # The connector's rule (connectors/opcua/mapping.py ms): epoch milliseconds, truncated.
                key = (f"s/{path[-2]}/{path[-1]}", int(source_ts.timestamp() * 1000))
                self.writes[key] = value

        self.server._write = recorded  # type: ignore[method-assign]
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self._serve(),), daemon=True
        )
        self.thread.start()
        wait_for(lambda: len(self.written(0, now_ms())) > 0, 30, "the simulated plant ticking")

    async def _serve(self) -> None:
        await self.server.serve(self.stop)

    def written(self, since: int, until: int) -> set[Key]:
        """(series, ts) of the tank temperatures written in [since, until]."""
        with self.lock:
            return {w for w in self.writes if since <= w[1] <= until and w[0].endswith("/Temperature")}

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


class Publisher:
    """QoS 1, 40 messages a second to ``ROOT/site/devN/temp``, each a reading with its own timestamp and
    the value ``ts % 1000``. A message counts as accepted once the broker acknowledged it (PUBACK); one that
    was not is published again (after a reconnect)."""

    def __init__(self, url: str, root: str) -> None:
        host, _, port = url.removeprefix("mqtt://").rstrip("/").partition(":")
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{root}", clean_session=False)
        self.c.reconnect_delay_set(0.2, 2)  # type: ignore[arg-type]  # a float sleep; the stubs say int
        self.c.connect(host, int(port or 1883))
        self.c.loop_start()
        self.root = root
        self.accepted: set[Key] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _send(self, topic: str, payload: str) -> bool:
        """Publish until the broker acknowledges (True) or the publisher stops (False)."""
        while not self.stop.is_set():
            info = self.c.publish(topic, payload, 1)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                with contextlib.suppress(RuntimeError, ValueError):  # not connected: publish again
                    info.wait_for_publish(3)
                if info.is_published():
                    return True
            time.sleep(0.2)  # not connected or not acknowledged: publish it again
        return False

    def _run(self) -> None:
        ts = int(time.time() * 1000) - 60_000  # in the recent past: nothing is judged late or future
        while not self.stop.is_set():
            for dev in range(4):
                ts += 1
                if self._send(f"{self.root}/site/dev{dev}/temp", f'{{"value": {ts % 1000}, "ts": {ts}}}'):
                    self.accepted.add((f"site/dev{dev}/temp", ts))
            self.stop.wait(0.1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.c.loop_stop()
        self.c.disconnect()

"""MQTT, OPC UA and BACnet sources through one Kafka outage and a SIGKILL of their connector, checked down to
the tables.

One ``plantstream connect`` in a child process runs the three sources against a private Kafka (the shared
one is not touched), each with its spool on and ``max_bytes`` 16 MiB: an MQTT source on the shared
Mosquitto (topics under a root of this run, a QoS 1 publisher), an OPC UA source on a simulated plant
running in this process, and a BACnet source polling two simulated air-handling units over UDP on loopback
once a second. A ``plantstream worker`` writes ``readings`` and ``agg_1m`` into a fresh schema of the shared
PostgreSQL. Kafka is stopped, the connector is SIGKILLed halfway through the outage and started again, then
Kafka returns.

What each source accepted:

- MQTT: every message Mosquitto acknowledged to the publisher (PUBACK). The connector's session outlives it,
  so the broker keeps for it what it had not acknowledged itself: exactly these readings, with their values,
  end up in ``readings``;
- OPC UA: the plant keeps nothing for a client that missed a value, so the spool alone stands between the
  outage and lost readings. Every value the plant wrote while a connector was subscribed (a margin of 2 s at
  either end; nobody received what it wrote between the kill and the restart) was accepted, and every
  reading in ``readings`` is one the plant wrote, with its value;
- BACnet: a device keeps nothing either; what the connector accepted is what it spooled, read from the
  directory after the kill and again just before Kafka returns (the records from the cursor on). The spool at
  the kill must hold a poll of every point about every second of the outage until then.

Afterwards, for all three: ``readings`` holds every accepted reading and equals telemetry.raw, one row per
series and timestamp, and only the sources' own series; ``agg_1m`` equals pandas over ``readings``, every
minute of it (the connector is stopped cleanly at the end, so the worker closes the last minutes after
``idle_timeout``), the minutes of the outage and of the kill included; telemetry.dlq is empty (nothing here
is bad input, and a reading the spool sends twice is a duplicate, not a late one). Each spool stayed within
``max_bytes`` (sampled throughout), the restarted connector sent what its predecessor left, and its clean
stop leaves every spool empty.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml

from connectors.bacnet.client import BacnetClient
from connectors.common.spool import MIB
from connectors.sim import launch
from connectors.sim.opcua_plant import NAMESPACE
from pipeline.core import codec
from pipeline.core.records import now_ms
from pipeline.topology import load
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import agg_rows, stop
from tests.faults.conftest import length
from tests.faults.services import (
    Key,
    Plant,
    Private,
    Publisher,
    child_env,
    deploy,
    kill_halfway,
    raw_keys,
    read_to_end,
    readings_table,
    replayed_then_drained,
    spawn,
    spool_bytes,
    spooled_values,
)
from tests.reference import compare, expected_aggregates

pytestmark = pytest.mark.integration

MAX_BYTES = 16 * MIB
SOURCES = ("mq", "plant", "bms")
ZONES = 4  # zone temperatures per unit: 32 points each
UNITS = {1001: ("127.0.0.2", "ahu1"), 1002: ("127.0.0.4", "ahu2")}
MQTT_SERIES = {f"site/dev{d}/temp" for d in range(4)}  # what the publisher sends
MARGIN_MS = 2000  # a poll or a publishing interval in flight, at the edges of an interval
MAX_GAP_MS = 5000  # BACnet polls are once a second: a longer hole in the spool is a lost poll, not a slow one


class SpoolPeaks:
    """The largest size each spool reached, sampled every 0.2 s in a thread while the scenario runs."""

    def __init__(self, spools: dict[str, Path]) -> None:
        self.spools = spools
        self.peak = dict.fromkeys(spools, 0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            for source, d in self.spools.items():
                try:
                    size = spool_bytes(d)
                except FileNotFoundError:  # a segment deleted between listing and measuring
                    continue
                self.peak[source] = max(self.peak[source], size)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


async def _point_names(address: str, instance: int) -> set[str]:
    """The objectNames of a unit's analog, binary and multi-state objects, asked of the unit itself."""
    client = BacnetClient(f"127.0.0.5/24:{launch.free_udp_port('127.0.0.5')}", 599_002)
    try:
        items = await client.read(address, f"device,{instance}", "object-list")
        names: set[str] = set()
        for kind, number in items:
            if str(kind).startswith(("analog-", "binary-", "multi-state-")):
                names.add(str(await client.read(address, f"{kind},{number}", "object-name")))
        return names
    finally:
        client.close()


def gaps(keys: set[Key], series: set[str], since: int, until: int) -> dict[str, int]:
    """Per series, the longest stretch of [since, until] without a reading (ms), where over MAX_GAP_MS."""
    out: dict[str, int] = {}
    for s in series:
        ts = sorted(t for k, t in keys if k == s and since <= t <= until)
        worst = max(b - a for a, b in pairwise([since, *ts, until]))
        if worst > MAX_GAP_MS:
            out[s] = worst
    return out


def set_up(log: Path) -> bool:
    """The connector logged in ``log`` reads all three sources: both BACnet units' points known (``device
    ahu1 (1001 at …): 32 points, max APDU …``), the plant's four temperatures subscribed, the MQTT topics
    subscribed."""
    text = log.read_text()
    return (
        len(re.findall(r"\): \d+ points, max APDU", text)) >= len(UNITS)
        and "subscribed to 4 node(s)" in text
        and "source mq: subscribed to" in text
    )


def test_three_sources_through_a_kafka_outage_and_a_kill_reach_the_tables(
    kafka: Private, namespace: dict[str, str], tmp_path: Path
) -> None:
    tag = namespace["tag"]
    schema = namespace["schema"]
    dsn = namespace["PLANTSTREAM_PG_DSN"]
    mqtt_url = namespace["PLANTSTREAM_MQTT_URL"]
    root = namespace["mqtt_root"]
    bootstrap = kafka.connection()["PLANTSTREAM_KAFKA"]
    device_port = launch.free_udp_port("127.0.0.2")
    client_port = launch.free_udp_port("127.0.0.3")
    endpoint = f"opc.tcp://127.0.0.1:{launch.free_tcp_port()}/plant"
    spools = {s: tmp_path / "spool" / s for s in SOURCES}
    topo: dict[str, Any] = {
        "name": f"outage{tag}",
        "prefix": namespace["prefix"],
        "broker": {"bootstrap": bootstrap, "partitions": 2},
        "sources": [
            # The same client_id after the restart: the broker kept the session's messages meanwhile.
            {"id": "mq", "type": "mqtt", "url": mqtt_url, "client_id": f"c-{tag}",
             "topics": [{"filter": f"{root}/+/+/+", "template": f"{root}/{{site}}/{{device}}/{{point}}"}],
             "spool": {"dir": str(spools["mq"]), "max_bytes": MAX_BYTES}},
            {"id": "plant", "type": "opcua", "endpoint": endpoint, "site": "s",
             "publishing_interval": "200ms",
             "browse": [{"root": f"nsu={NAMESPACE};s=Plant/Tanks", "include": "Temperature",
                         "sampling_interval": "100ms", "queue_size": 100}],
             "spool": {"dir": str(spools["plant"]), "max_bytes": MAX_BYTES}},
            {"id": "bms", "type": "bacnet", "local_address": f"127.0.0.3/24:{client_port}", "site": "hq",
             "defaults": {"interval": "1s"},
             "devices": [{"instance": i, "address": f"{host}:{device_port}", "name": name}
                         for i, (host, name) in UNITS.items()],
             "spool": {"dir": str(spools["bms"]), "max_bytes": MAX_BYTES}},
        ],
        # idle_timeout is longer than the connector takes to reconnect after the outage (librdkafka and the
        # spool's sender back off up to 10 s): the worker must not close a device's windows while its readings
        # are still on the way. Shorter than the default (30 s): the last minutes close that much sooner.
        "aggregates": {"grace": "10s", "idle_timeout": "20s", "checkpoint_interval": "1s"},
        "sinks": [
            {"id": "pg", "type": "postgres", "dsn": dsn, "schema": schema, "timescaledb": "off",
             "topics": ["agg_1m", "readings"], "batch_delay": "200ms"}
        ],
    }  # fmt: skip
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topo))
    # The private broker for every child; the shared PostgreSQL and Mosquitto are passed through.
    env = child_env(PLANTSTREAM_KAFKA=bootstrap, PLANTSTREAM_MQTT_URL=mqtt_url)
    deploy(topo_file, env)
    topology = load(topo_file, env)

    units = [
        launch.start_bacnet_ahu(
            f"{host}/8:{device_port}",
            instance,
            args=["--zones", str(ZONES), "--name", name.upper()],
            log=tmp_path / f"{name}.log",
        )
        for instance, (host, name) in UNITS.items()
    ]
    plant: Plant | None = None
    pub: Publisher | None = None
    peaks: SpoolPeaks | None = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        points = {
            name: asyncio.run(_point_names(f"{host}:{device_port}", instance))
            for instance, (host, name) in UNITS.items()
        }
        assert all(len(p) == 28 + ZONES for p in points.values()), points
        bacnet_series = {f"hq/{name}/{p}" for name, ps in points.items() for p in ps}
        plant = Plant(endpoint)
        opcua_series = {s for s, _ in plant.written(0, now_ms())}
        assert len(opcua_series) == 4, opcua_series
        series = {"mq": MQTT_SERIES, "plant": opcua_series, "bms": bacnet_series}

        worker = spawn(
            ["worker", str(topo_file), "--app-id", f"out-{tag}", "--metrics", "off", "--loglevel", "info"],
            tmp_path / "worker.log",
            env,
        )
        procs.append(worker)
        args = ["connect", str(topo_file), "--metrics", "off"]
        logs = [tmp_path / "connect1.log", tmp_path / "connect2.log"]
        proc = spawn(args, logs[0], env)
        procs.append(proc)
        wait_for(lambda: set_up(logs[0]), 60, "the connector to set up its three sources")
        subscribed = now_ms()  # no earlier than the plant's subscription
        # The connector subscribed before anything is published: QoS 1 then keeps every message for it.
        pub = Publisher(mqtt_url, root)
        peaks = SpoolPeaks(spools)

        def by_source(keys: set[Key]) -> dict[str, set[Key]]:
            return {src: {k for k in keys if k[0] in ss} for src, ss in series.items()}

        def worker_up() -> None:
            # A worker that exited fails the scenario now rather than at the end of a long wait.
            assert worker.poll() is None, (
                f"the worker exited: {(tmp_path / 'worker.log').read_text()[-1500:]}"
            )

        def every_series_in_table() -> bool:
            worker_up()
            have = {s for s, *_ in readings_table(dsn, schema)}
            return set().union(*series.values()) <= have

        wait_for(every_series_in_table, 90, "every series of the three sources in readings before the outage")

        outage = length(20, 600)
        down, killed, ends = kill_halfway(kafka, proc, outage)
        at_kill = {s: spooled_values(d) for s, d in spools.items()}
        # Every poll of the BACnet units and every value the plant wrote during the outage until the kill
        # was in the first connector's spool; the MQTT source acknowledged messages from its spool.
        assert gaps(set(at_kill["bms"]), bacnet_series, down + MARGIN_MS, killed - MARGIN_MS) == {}
        assert {s for s, _ in at_kill["bms"]} == bacnet_series
        lost = plant.written(down + MARGIN_MS, killed - MARGIN_MS) - set(at_kill["plant"])
        assert lost == set(), sorted(lost)[:10]
        assert at_kill["mq"], "MQTT messages taken into the spool during the outage"

        proc = spawn(args, logs[1], env)
        procs.append(proc)
        wait_for(lambda: set_up(logs[1]), 60, "the connector again")
        resubscribed = now_ms()
        time.sleep(max(0.0, ends - time.monotonic()))  # the rest of the outage
        before_up = {s: spooled_values(d) for s, d in spools.items()}
        kafka.up("kafka")
        for s in SOURCES:
            # Nothing the first connector left was dropped by the second, which spooled its own readings.
            assert set(at_kill[s]) <= set(before_up[s]), s
            assert set(before_up[s]) - set(at_kill[s]), f"the second connector spooled readings of {s}"
        assert {k for k in set(before_up["bms"]) - set(at_kill["bms"]) if k[1] > killed}, (
            "polls after the kill"
        )
        spooled = {**at_kill["mq"], **at_kill["plant"], **at_kill["bms"]}
        for s in SOURCES:
            spooled.update(before_up[s])

        def missing(want: set[Key]) -> set[Key]:
            worker_up()
            return want - {(s, ts) for s, ts, *_ in readings_table(dsn, schema)}

        wait_for(lambda: not missing(set(spooled)), 180, f"all {len(spooled)} spooled readings in readings")
        pub.close()  # the messages flowed through the recovery too; now what the broker acknowledged is known
        acknowledged = set(pub.accepted)
        wait_for(lambda: not missing(acknowledged), 60, f"all {len(acknowledged)} MQTT messages in readings")
        stopped = now_ms()
        # The second connector sent what the first left; a clean stop leaves every spool empty.
        replayed_then_drained(proc, logs[1], spools)
        peaks.close()
        assert all(0 < p <= MAX_BYTES for p in peaks.peak.values()), peaks.peak

        # The readings table converges on telemetry.raw: the same (series, ts), no more, no fewer.
        in_raw = raw_keys(bootstrap, topology.raw_topic)
        wait_for(
            lambda: {(s, ts) for s, ts, *_ in readings_table(dsn, schema)} == in_raw,
            120,
            "readings equal to telemetry.raw",
        )
        rows = readings_table(dsn, schema)
        values = {(s, ts): v for s, ts, v, _ in rows}
        assert len(values) == len(rows), "one row per series and timestamp"
        got = by_source(set(values))
        assert {src: {s for s, _ in keys} for src, keys in got.items()} == series, "only the sources' own"
        # MQTT: exactly the acknowledged messages, with the values published.
        assert {k: values[k] for k in got["mq"]} == {k: float(k[1] % 1000) for k in acknowledged}
        # OPC UA: every value written while a connector was subscribed, and nothing the plant did not write.
        heard = plant.written(subscribed + MARGIN_MS, killed - MARGIN_MS)
        heard |= plant.written(resubscribed + MARGIN_MS, stopped - MARGIN_MS)
        assert heard - got["plant"] == set(), sorted(heard - got["plant"])[:10]
        assert {k: values[k] for k in got["plant"]} == {k: float(plant.writes[k]) for k in got["plant"]}
        # Every spooled reading of every source, with its value.
        assert {k: values.get(k) for k in spooled} == spooled

        # The devices went quiet with the connector: the worker closes the last minutes after idle_timeout.
        expected = expected_aggregates(rows)

        def all_windows() -> bool:
            return set(expected) <= set(agg_rows(dsn, schema))

        try:
            wait_for(all_windows, 120, f"{len(expected)} windows in agg_1m")
        except AssertionError:
            have = agg_rows(dsn, schema)
            raise AssertionError(
                f"{len(have)} of {len(expected)} windows; missing {sorted(set(expected) - set(have))[:10]}"
            ) from None
        problems = compare(agg_rows(dsn, schema), expected)
        assert problems == [], "\n".join(problems[:30])
        # The minutes of the outage and of the kill are among them, rows present or not.
        assert {ws for _, ws in expected} >= {down // 60_000 * 60_000, killed // 60_000 * 60_000}

        dlq = [codec.loads(v) for v in read_to_end(bootstrap, topology.dlq_topic)]
        assert [d.get("reason") for d in dlq][:10] == []
        assert worker.poll() is None, "the worker must have waited out the outage, not exited"
    finally:
        if pub is not None and not pub.stop.is_set():
            pub.close()
        if peaks is not None:
            peaks.close()
        stop(procs, 30)
        if plant is not None:
            plant.close()
        for u in units:
            launch.stop(u)

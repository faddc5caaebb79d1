"""The BACnet source through a Kafka outage and a SIGKILL of the connector, checked down to the tables.

Two simulated air-handling units answer over real UDP on loopback; ``plantstream connect`` polls them once a
second in a child process with its spool on, against a private Kafka (the shared one is not touched), and a
``plantstream worker`` writes ``readings`` and ``agg_1m`` into a fresh schema of the shared PostgreSQL. Kafka
is stopped, the connector is SIGKILLed halfway through the outage and started again, then Kafka returns.

A BACnet device keeps nothing for a client that missed it, so what the connector accepted is what it spooled:
every record in the spool read from the directory after the kill and again just before Kafka returns (the
records from the cursor on). The first connector's spool at the kill must hold a poll of every point about
every second of the outage until then. Afterwards, down to the database:

- ``readings`` holds every accepted reading, exactly what telemetry.raw holds, and only series of the units'
  own points; one row per series and timestamp;
- ``agg_1m`` equals pandas over the rows of ``readings``, every minute of it (the connector is stopped
  cleanly at the end, so the worker closes the last minutes after ``idle_timeout``): the minutes around the
  kill, where some polls never happened, included;
- telemetry.dlq is empty: nothing in this run is bad input, and a reading sent twice by the spool after the
  kill is a duplicate, not a late reading.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
import uuid
from itertools import pairwise
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from connectors.bacnet.client import BacnetClient
from connectors.common.spool import MIB
from connectors.sim import launch
from pipeline.core import codec
from pipeline.core.records import now_ms, validate_batch
from pipeline.topology import load
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import agg_rows, stop
from tests.faults.conftest import length
from tests.faults.services import (
    Private,
    child_env,
    deploy,
    replayed_then_drained,
    spawn,
    spool_bytes,
    spooled,
)
from tests.reference import compare, expected_aggregates

pytestmark = pytest.mark.integration

MAX_BYTES = 16 * MIB
ZONES = 4  # zone temperatures per unit: 32 points each
UNITS = {1001: ("127.0.0.2", "ahu1"), 1002: ("127.0.0.4", "ahu2")}
SITE = "hq"
MARGIN_MS = 2000  # a poll in flight, at the edges of an interval
MAX_GAP_MS = 5000  # polls are once a second: a longer hole in the spool is a lost poll, not a slow one

Key = tuple[str, int]  # (site/device/point, ts)


def table_rows(dsn: str, schema: str) -> list[tuple[str, int, float, str]]:
    """(series, ts ms, value, quality) of every row of ``readings``."""
    with psycopg.connect(dsn) as conn:
        try:
            rows = conn.execute(
                "SELECT series, (extract(epoch FROM time) * 1000)::bigint, value, quality "
                f'FROM "{schema}".readings'
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return []
    return [(str(s), int(ts), float(v), str(q)) for s, ts, v, q in rows]


def table_keys(dsn: str, schema: str) -> set[Key]:
    return {(s, ts) for s, ts, _, _ in table_rows(dsn, schema)}


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
    out: set[Key] = set()
    for value in read_to_end(bootstrap, topic):
        b = validate_batch(codec.loads(value))[0]
        out |= {(f"{b['site']}/{b['device']}/{r['point']}", r["ts"]) for r in b["readings"]}
    return out


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
        edges = [since, *ts, until]
        worst = max(b - a for a, b in pairwise(edges))
        if worst > MAX_GAP_MS:
            out[s] = worst
    return out


def test_bacnet_readings_through_a_kafka_outage_and_a_kill_reach_the_tables(
    kafka: Private, namespace: dict[str, str], tmp_path: Path
) -> None:
    tag = namespace["tag"]
    schema = namespace["schema"]
    dsn = namespace["PLANTSTREAM_PG_DSN"]
    bootstrap = kafka.connection()["PLANTSTREAM_KAFKA"]
    device_port = launch.free_udp_port("127.0.0.2")
    client_port = launch.free_udp_port("127.0.0.3")
    spool_path = tmp_path / "spool"
    topo: dict[str, Any] = {
        "name": f"spoolbac{tag}",
        "prefix": namespace["prefix"],
        "broker": {"bootstrap": bootstrap, "partitions": 2},
        "sources": [
            {"id": "bms", "type": "bacnet", "local_address": f"127.0.0.3/24:{client_port}", "site": SITE,
             "defaults": {"interval": "1s"},
             "devices": [{"instance": i, "address": f"{host}:{device_port}", "name": name}
                         for i, (host, name) in UNITS.items()],
             "spool": {"dir": str(spool_path), "max_bytes": MAX_BYTES}}
        ],
        # idle_timeout (the default, 30 s) is longer than the connector takes to reconnect after the outage
        # (librdkafka and the spool's sender back off up to 10 s each): the worker must not close the units'
        # windows while their readings are still on the way.
        "aggregates": {"grace": "10s", "idle_timeout": "30s", "checkpoint_interval": "1s"},
        "sinks": [
            {"id": "pg", "type": "postgres", "dsn": dsn, "schema": schema, "timescaledb": "off",
             "topics": ["agg_1m", "readings"], "batch_delay": "200ms"}
        ],
    }  # fmt: skip
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topo))
    # The private broker for every child; PLANTSTREAM_PG_DSN (the shared cluster) is passed through.
    env = child_env(PLANTSTREAM_KAFKA=bootstrap)
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
    procs: list[subprocess.Popen[bytes]] = []
    try:
        points = {
            name: asyncio.run(_point_names(f"{host}:{device_port}", instance))
            for instance, (host, name) in UNITS.items()
        }
        assert all(len(p) == 28 + ZONES for p in points.values()), points
        series = {f"{SITE}/{name}/{p}" for name, ps in points.items() for p in ps}

        worker = spawn(
            ["worker", str(topo_file), "--app-id", f"bacout-{tag}", "--metrics", "off", "--loglevel", "info"],
            tmp_path / "worker.log",
            env,
        )
        procs.append(worker)
        args = ["connect", str(topo_file), "--source", "bms", "--metrics", "off"]
        logs = [tmp_path / "connect1.log", tmp_path / "connect2.log"]

        def set_up(log: Path) -> bool:
            # "source bms: device ahu1 (1001 at …): 32 points, …": both units read and their points known.
            return len(re.findall(r"\): \d+ points, max APDU", log.read_text())) >= len(UNITS)

        proc = spawn(args, logs[0], env)
        procs.append(proc)
        wait_for(lambda: set_up(logs[0]), 60, "the connector to set up both units")

        def both_units_in_table() -> bool:
            have = {s for s, _ in table_keys(dsn, schema)}
            return series <= have

        wait_for(both_units_in_table, 90, "every point of both units in readings before the outage")

        kafka.down("kafka")
        down = now_ms()
        outage = length(20, 600)
        ends = time.monotonic() + outage
        time.sleep(outage / 2)  # the outage itself, half of it before the kill
        killed = now_ms()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        at_kill = spooled(spool_path)
        max_spool = spool_bytes(spool_path)
        # Every poll of the first connector during the outage was in its spool when it was killed.
        assert gaps(at_kill, series, down + MARGIN_MS, killed - MARGIN_MS) == {}
        assert {s for s, _ in at_kill} == series

        proc = spawn(args, logs[1], env)
        procs.append(proc)
        wait_for(lambda: set_up(logs[1]), 60, "the connector again")
        time.sleep(max(0.0, ends - time.monotonic()))  # the rest of the outage
        before_up = spooled(spool_path)
        max_spool = max(max_spool, spool_bytes(spool_path))
        kafka.up("kafka")
        assert at_kill <= before_up  # nothing the first connector left was dropped by the second
        assert {k for k in before_up - at_kill if k[1] > killed}, "the second connector spooled its own polls"
        accepted = at_kill | before_up

        def missing() -> set[Key]:
            return accepted - table_keys(dsn, schema)

        wait_for(lambda: not missing(), 180, f"all {len(accepted)} accepted readings in the readings table")
        assert max_spool <= MAX_BYTES
        replayed_then_drained(proc, logs[1], spool_path)  # the second connector sent what the first left
        in_raw = raw_keys(bootstrap, topology.raw_topic)
        assert accepted <= in_raw

        # The readings table converges on telemetry.raw: the same (series, ts), no more, no fewer.
        wait_for(lambda: table_keys(dsn, schema) == in_raw, 120, "readings equal to telemetry.raw")
        rows = table_rows(dsn, schema)
        assert {s for s, *_ in rows} == series, "only (and all) the units' own points"
        with psycopg.connect(dsn) as conn:
            counts = conn.execute(
                f'SELECT series, count(*), count(DISTINCT time) FROM "{schema}".readings GROUP BY series'
            ).fetchall()
        assert [c for c in counts if c[1] != c[2]] == []
        # The units went quiet with the connector: the worker closes the last minutes after idle_timeout.
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
        stop(procs, 30)
        for u in units:
            launch.stop(u)

"""The InfluxDB sink on the real InfluxDB 1.x beside the PostgreSQL sink, from the same input: both equal
pandas; a field-type conflict sends the refused points to the DLQ with the server's message; an outage
(15 s; 60 s in make faults) loses nothing and doubles nothing, and no input is committed while InfluxDB is
away."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from connectors.common.producer import TelemetryProducer
from pipeline.deploy import deploy
from pipeline.topology import validate_data
from pipeline.worker import build_worker
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import agg_rows, read_dlq
from tests.faults.conftest import length
from tests.integration.test_event_time import interleave, minute_now, send, series_of
from tests.reference import FIELDS, compare, expected_aggregates

pytestmark = pytest.mark.integration


@pytest.fixture
def influx(services_env: dict[str, str], namespace: dict[str, str]):
    from localservices import harness as services

    services.up(("influxdb",), progress=lambda m: None)
    url = services.connection_env()["PLANTSTREAM_INFLUX_URL"]
    db = f"t_{namespace['tag']}"
    yield url, db
    q(url, db, f'DROP DATABASE "{db}"')


def q(url: str, db: str, query: str) -> Any:
    body = urllib.parse.urlencode({"db": db, "q": query, "epoch": "ms"}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/query", data=body), timeout=10) as r:
        return json.loads(r.read())


def influx_aggs(url: str, db: str) -> dict[tuple[str, int], dict[str, Any]]:
    res = q(url, db, "SELECT * FROM agg_1m")["results"][0]
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for s in res.get("series", []):
        cols = s["columns"]
        for v in s["values"]:
            row = dict(zip(cols, v, strict=True))
            key = (f"{row['site']}/{row['device']}/{row['point']}", int(row["time"]))
            out[key] = {f: row.get(f) for f in FIELDS}
    return out


def topology(ns: dict[str, str], url: str, db: str) -> Any:
    return validate_data(
        {
            "name": f"ifx{ns['tag']}",
            "prefix": ns["prefix"],
            "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 2},
            "aggregates": {"grace": "10s", "idle_timeout": "2s", "checkpoint_interval": "300ms"},
            "sinks": [
                {
                    "id": "pg",
                    "type": "postgres",
                    "dsn": ns["PLANTSTREAM_PG_DSN"],
                    "schema": ns["schema"],
                    "batch_delay": "100ms",
                },
                {
                    "id": "ifx",
                    "type": "influx",
                    "url": url,
                    "database": db,
                    "topics": ["agg_1m", "readings"],
                    "batch_delay": "100ms",
                },
            ],
        }
    )


def test_influx_and_postgres_from_one_topology_equal_pandas(namespace, influx):
    ns = namespace
    url, db = influx
    topo = topology(ns, url, db)
    deploy(topo, say=lambda m: None)
    start = minute_now() - 180_000
    streams = [series_of("d1", start, 180), series_of("d2", start, 180, points="xyz")]
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    for b in interleave(*streams):
        send(producer, b, per=len(b))
    assert producer.flush(30) == 0
    worker = build_worker(topo, f"ifx-{ns['tag']}")
    worker.start()
    try:
        expected = expected_aggregates([r for s in streams for r in s])
        wait_for(lambda: len(influx_aggs(url, db)) >= len(expected), 120, f"{len(expected)} points in agg_1m")
        wait_for(
            lambda: len(agg_rows(ns["PLANTSTREAM_PG_DSN"], ns["schema"])) >= len(expected), 60, "PostgreSQL"
        )
        assert compare(influx_aggs(url, db), expected) == []
        assert compare(agg_rows(ns["PLANTSTREAM_PG_DSN"], ns["schema"]), expected) == []
        n = q(url, db, "SELECT count(value) FROM readings")["results"][0]["series"][0]["values"][0][1]
        assert n == sum(len(s) for s in streams)
    finally:
        worker.stop()


def test_a_field_type_conflict_goes_to_the_dlq_with_the_servers_message(namespace, influx):
    ns = namespace
    url, db = influx
    topo = topology(ns, url, db)
    deploy(topo, say=lambda m: None)
    start = minute_now() - 180_000
    # 'count' already exists as a float in this shard: InfluxDB refuses the sink's integer counts.
    body = f"agg_1m,site=site,device=other,point=p count=1.5 {start}".encode()
    req = urllib.request.Request(f"{url}/write?db={db}&precision=ms", data=body)
    assert urllib.request.urlopen(req, timeout=10).status == 204
    stream = series_of("d1", start, 150, points="a")
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    send(producer, stream)
    assert producer.flush(30) == 0
    worker = build_worker(topo, f"ifx-{ns['tag']}")
    worker.start()
    try:
        expected = expected_aggregates(stream)
        wait_for(
            lambda: len(agg_rows(ns["PLANTSTREAM_PG_DSN"], ns["schema"])) >= len(expected), 60, "PostgreSQL"
        )
        dl = read_dlq(ns["PLANTSTREAM_KAFKA"], f"{ns['prefix']}telemetry.dlq", len(expected), 60)
        refused = [x for x in dl if x["source"] == "ifx"]
        assert len(refused) == len(expected)
        assert all("field type conflict" in x["reason"] for x in refused), refused[0]["reason"]
        assert all(json.loads(x["payload"])["series"] == "site/d1/a" for x in refused)
    finally:
        worker.stop()


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return [max(tp.offset, 0) for tp in got]  # nothing committed yet (an empty partition): 0
    finally:
        c.close()


def ends(bootstrap: str, topic: str, partitions: int) -> list[int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "ends", "enable.auto.commit": False})
    try:
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)]
    finally:
        c.close()


@pytest.mark.faults  # also in make faults, where the outage lasts 60 s
def test_an_influxdb_outage_loses_nothing_and_doubles_nothing(namespace, influx):
    from localservices import harness as services

    ns = namespace
    url, db = influx
    topo = topology(ns, url, db)
    deploy(topo, say=lambda m: None)
    start = minute_now() - 600_000
    before = [series_of("d1", start, 120), series_of("d2", start, 120, points="xyz")]
    during = [series_of("d1", start + 120_000, 120), series_of("d2", start + 120_000, 120, points="xyz")]
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    for b in interleave(*before):
        send(producer, b, per=len(b))
    assert producer.flush(30) == 0
    app = f"out-{ns['tag']}"
    worker = build_worker(topo, app)
    worker.start()
    group = f"{app}-sink-ifx-readings"
    try:
        n_before = sum(len(s) for s in before)
        wait_for(lambda: n_readings(url, db) >= n_before, 60, "the first readings in InfluxDB")
        highs = ends(topo.broker.bootstrap, topo.raw_topic, 2)
        wait_for(
            lambda: committed(topo.broker.bootstrap, group, topo.raw_topic, 2) == highs, 30, "the commit"
        )
        services.down(("influxdb",), progress=lambda m: None)
        outage_start = time.monotonic()
        for b in interleave(*during):
            send(producer, b, per=len(b))
        assert producer.flush(30) == 0
        assert sum(ends(topo.broker.bootstrap, topo.raw_topic, 2)) > sum(highs)
        outage = length(15, 60)
        wait_for(lambda: time.monotonic() - outage_start >= outage, outage + 10, "the outage", interval=1)
        # Nothing acknowledged, nothing committed: a crash now would read the same input again.
        assert committed(topo.broker.bootstrap, group, topo.raw_topic, 2) == highs
        assert worker.alive()
        services.up(("influxdb",), progress=lambda m: None)
        everything = [r for s in before + during for r in s]
        expected = expected_aggregates(everything)
        wait_for(lambda: n_readings(url, db) >= len(everything), 120, f"{len(everything)} readings")
        wait_for(lambda: len(influx_aggs(url, db)) >= len(expected), 120, f"{len(expected)} minutes")
        assert n_readings(url, db) == len(everything)
        assert compare(influx_aggs(url, db), expected) == []
        wait_for(
            lambda: (
                committed(topo.broker.bootstrap, group, topo.raw_topic, 2)
                == ends(topo.broker.bootstrap, topo.raw_topic, 2)
            ),
            30,
            "the commit after the outage",
        )
    finally:
        services.up(("influxdb",), progress=lambda m: None)
        worker.stop()


def n_readings(url: str, db: str) -> int:
    try:
        res = q(url, db, "SELECT count(value) FROM readings")["results"][0]
    except OSError:
        return 0
    return int(res["series"][0]["values"][0][1]) if res.get("series") else 0

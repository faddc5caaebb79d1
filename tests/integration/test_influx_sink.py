"""The InfluxDB sink on the real InfluxDB 1.x beside the PostgreSQL sink, from the same input: both equal
pandas; a field-type conflict sends the refused points to the DLQ with the server's message."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from typing import Any

import pytest

from connectors.common.producer import TelemetryProducer
from pipeline.deploy import deploy
from pipeline.topology import validate_data
from pipeline.worker import build_worker
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import agg_rows, read_dlq
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

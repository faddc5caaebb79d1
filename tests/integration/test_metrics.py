"""/metrics and /health of the processes on the real Kafka, PostgreSQL and Mosquitto: a worker in-process
(readings in, dead letters by reason, lag, checkpoints, sink rows), its health degrading while a sink
cannot reach its database, ``plantstream connect --metrics`` with an MQTT source, and the API's request
counters."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from connectors.common.producer import TelemetryProducer
from pipeline.core.metrics import MetricsServer, start_server
from pipeline.deploy import deploy, ensure_topics
from pipeline.topology import Topology, validate_data
from pipeline.worker import Worker, build_worker, observe
from tests.conftest import REPO, wait_for
from tests.integration.test_event_time import minute_now, send, series_of
from tests.integration.test_mqtt_source import publish

pytestmark = pytest.mark.integration


def scrape(base: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(got: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return got.get((name, frozenset(labels.items())), 0.0)


def topo_for(ns: dict[str, str], dsn: str | None = None, **worker_metrics: Any) -> Topology:
    return validate_data(
        {
            "name": f"met{ns['tag']}",
            "prefix": ns["prefix"],
            "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 1},
            "aggregates": {"grace": "10s", "idle_timeout": "2s", "checkpoint_interval": "300ms"},
            "metrics": {"worker": {"listen": "127.0.0.1:0", **worker_metrics}},
            "sinks": [
                {
                    "id": "pg",
                    "type": "postgres",
                    "dsn": dsn or ns["PLANTSTREAM_PG_DSN"],
                    "schema": ns["schema"],
                    "topics": ["agg_1m"],
                    "batch_delay": "100ms",
                }
            ],
        }
    )


class Served:
    """A worker built in-process with its metrics server on a free port."""

    def __init__(self, topo: Topology, app_id: str) -> None:
        self.worker: Worker = build_worker(topo, app_id)
        self.observed = observe(self.worker)
        server = start_server(
            topo.metrics.worker.listen, self.observed.registry, self.observed.health, "worker"
        )
        assert isinstance(server, MetricsServer) and server.port > 0
        self.server = server
        self.worker.start()

    @property
    def base(self) -> str:
        return self.server.url

    def close(self) -> None:
        self.worker.stop()
        self.server.close()
        self.observed.close()


def test_worker_metrics_count_what_was_sent_and_health_is_ok(namespace: dict[str, str]) -> None:
    ns = namespace
    topo = topo_for(ns)
    deploy(topo, say=lambda m: None)
    served = Served(topo, f"met-{ns['tag']}")
    try:
        start = minute_now() - 240_000
        good = series_of("d1", start, 120)  # 240 readings over two minutes
        producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
        send(producer, good, per=20)
        # After the device's clock passed the first minute and the grace: late.
        late = [("site/d1/a", start + 1000 + i, 1.0, "good") for i in range(5)]
        send(producer, late, per=5)
        # Two readings the validation refuses, in a batch with one good one.
        send(
            producer,
            [
                ("site/d2/a", start + 1000, 1.0, "good"),
                ("site/d2/a", start + 2000, 2.0, "superb"),
                ("site/d2/b", start + 3000, 2.0, "so-so"),
            ],
            per=3,
        )
        assert producer.flush(30) == 0
        raw = Producer({"bootstrap.servers": topo.broker.bootstrap})
        raw.produce(topo.raw_topic, b"not json", b"site/d3")
        assert raw.flush(30) == 0

        expected = {
            "readings_in": len(good) + 1,
            "late": 5,
            "invalid": 2,
            "malformed": 1,
            "lag": 0,
            "sink_rows": 5,  # two minutes of d1/a and d1/b, one of d2/a, once closed (idle timeout 2 s)
        }
        seen: list[Any] = [None]

        def counted() -> Any:
            got = scrape(served.base)
            seen[0] = {
                "readings_in": value(got, "plantstream_readings_in_total", stage="aggregation"),
                "late": value(got, "plantstream_dlq_total", stage="aggregation", reason="late"),
                "invalid": value(got, "plantstream_dlq_total", stage="aggregation", reason="invalid"),
                "malformed": value(got, "plantstream_dlq_total", stage="aggregation", reason="malformed"),
                "lag": value(got, "plantstream_consumer_lag", stage="aggregation", partition="0"),
                "sink_rows": value(got, "plantstream_sink_rows_total", sink="pg", table="agg_1m"),
            }
            return got if seen[0] == expected else None

        try:
            got = wait_for(counted, 60, "readings, dead letters by reason, lag 0 and sink rows in /metrics")
        except AssertionError:
            raise AssertionError(f"expected {expected}, last seen {seen[0]}") from None
        assert value(got, "plantstream_late_readings_total") == 5
        assert value(got, "plantstream_aggregates_out_total", stage="aggregation") == 5
        assert value(got, "plantstream_messages_total", stage="aggregation") == len(good) // 20 + 1 + 1 + 1
        assert value(got, "plantstream_sink_batch_seconds_count", sink="pg", table="agg_1m") >= 1
        assert value(got, "plantstream_stage_up", stage="sink pg/agg_1m") == 1
        assert value(got, "plantstream_consumer_lag", stage="sink pg/agg_1m", partition="0") == 0
        # Checkpoints keep coming every 300 ms: far below the health limit (30 s).
        assert 0 <= value(got, "plantstream_checkpoint_age_seconds", stage="aggregation") < 30
        health = httpx.get(f"{served.base}/health", timeout=10)
        assert health.status_code == 200, health.text
        checks = health.json()["checks"]
        assert health.json()["status"] == "ok"
        assert set(checks) == {"stage aggregation", "stage sink pg/agg_1m"}
        assert checks["stage aggregation"]["partitions"] == [0]
    finally:
        served.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once the socket is closed


def test_health_degrades_while_a_sink_cannot_reach_its_database(namespace: dict[str, str]) -> None:
    ns = namespace
    ensure_topics(topo_for(ns), say=lambda _m: None)  # topics only: this sink's database is not there
    dsn = f"postgresql://plantstream:plantstream@127.0.0.1:{closed_port()}/plantstream?connect_timeout=2"
    topo = topo_for(ns, dsn, sink_stuck_after="1s")
    # Readings of two past minutes: the aggregation stage closes them, the sink has real aggregates to write.
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    send(producer, series_of("d1", minute_now() - 180_000, 120), per=20)
    assert producer.flush(30) == 0
    served = Served(topo, f"met-{ns['tag']}")
    try:

        def degraded() -> Any:
            r = httpx.get(f"{served.base}/health", timeout=10)
            return r if r.status_code == 503 else None

        r = wait_for(degraded, 60, "/health 503 while the sink retries")
        body = r.json()
        assert body["status"] == "degraded"
        sink = body["checks"]["stage sink pg/agg_1m"]
        assert sink["status"] == "degraded" and any("writing for" in p for p in sink["problems"])
        assert body["checks"]["stage aggregation"]["status"] == "ok"
        got = scrape(served.base)
        assert value(got, "plantstream_sink_write_seconds", sink="pg", table="agg_1m") > 1
        assert value(got, "plantstream_sink_rows_total", sink="pg", table="agg_1m") == 0
    finally:
        served.close()


# -- plantstream connect -------------------------------------------------------------------------------------


@pytest.fixture
def connect_proc(namespace: dict[str, str], tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    ns = namespace
    root = ns["mqtt_root"]
    data = {
        "name": f"metc{ns['tag']}",
        "prefix": ns["prefix"],
        "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 1},
        "sources": [
            {
                "id": "m1",
                "type": "mqtt",
                "url": ns["PLANTSTREAM_MQTT_URL"],
                "client_id": f"metc-{ns['tag']}",
                "topics": [{"filter": f"{root}/+/+/+", "template": f"{root}/{{site}}/{{device}}/{{point}}"}],
            }
        ],
    }
    ensure_topics(validate_data(data), say=lambda _m: None)
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "connect", str(path), "--metrics", "127.0.0.1:0"],
        cwd=REPO,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"metrics on (http://\S+)/metrics", line)
            url = m.group(1) if m else None
        assert url, "connect did not log its metrics address"
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(30)


def test_connect_exports_each_sources_counters(namespace: dict[str, str], connect_proc: Any) -> None:
    _proc, base = connect_proc
    root = namespace["mqtt_root"]

    def connected() -> Any:
        r = httpx.get(f"{base}/health", timeout=10)
        return r.status_code == 200 and r.json()["checks"]["source m1"].get("connected") is True

    wait_for(connected, 30, "source m1 connected in /health")
    publish(
        namespace,
        [(f"{root}/s/d/p{i}", str(float(i)).encode()) for i in range(7)] + [(f"{root}/s/d/x", b"{")],
    )

    def counted() -> Any:
        got = scrape(base)
        return (
            value(got, "plantstream_source_received", source="m1") == 8
            and value(got, "plantstream_producer_readings_total", source="m1") == 7
            and value(got, "plantstream_source_dead_letters", source="m1") == 1
            and got
        )

    got = wait_for(counted, 30, "the MQTT source's counters in /metrics")
    assert value(got, "plantstream_source_connected", source="m1") == 1
    assert value(got, "plantstream_source_reconnects", source="m1") == 0
    assert ("plantstream_producer_queue_messages", frozenset({("source", "m1")})) in got


# -- plantstream serve ---------------------------------------------------------------------------------------


def test_serve_counts_requests_by_route_and_status(namespace: dict[str, str]) -> None:
    from fastapi.testclient import TestClient

    from pipeline.api.app import create_app

    topo = topo_for(namespace)
    deploy(topo, say=lambda m: None)
    with TestClient(create_app(topo)) as client:
        for _ in range(3):
            assert client.get("/api/sites").status_code == 401  # no token
        assert client.get("/no/such/page").status_code == 404
        health = client.get("/health")
        assert health.json()["status"] in ("ok", "degraded") and "database" in health.json()
        text = client.get("/metrics").text
    got = {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert value(got, "plantstream_api_requests_total", route="/api/sites", method="GET", status="401") == 3
    assert value(got, "plantstream_api_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value(got, "plantstream_api_request_seconds_count", route="/api/sites", method="GET") == 3

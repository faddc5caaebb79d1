"""Kafka stopped under a running worker: the worker waits (it does not exit), then catches up exactly.

A private Kafka (the shared one is not touched) carries the topology; a live stream of readings keeps coming
during the outage into the producer's queue, as a connector's spool would hand them over. The worker must
not take the outage for the devices' silence (no idle close while the broker is away). After Kafka returns,
agg_1m equals pandas over every reading sent and no row is written twice. A SIGTERM while Kafka is away
stops the worker within a service manager's 10 s grace, without committing; a new worker finishes the job.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from connectors.common.producer import TelemetryProducer
from pipeline.topology import validate_data
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import agg_rows, read_dlq, stop
from tests.faults.conftest import length
from tests.faults.services import Private, child_env, deploy, spawn
from tests.integration.test_event_time import Reading, minute_now, send, series_of
from tests.reference import compare, expected_aggregates

pytestmark = pytest.mark.integration


def test_the_worker_waits_out_a_kafka_outage_and_catches_up(
    kafka: Private, services_env: dict[str, str], tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    schema = f"f_{tag}"
    dsn = services_env["PLANTSTREAM_PG_DSN"]
    bootstrap = kafka.connection()["PLANTSTREAM_KAFKA"]
    topo: dict[str, Any] = {
        "name": f"outage{tag}",
        "broker": {"bootstrap": bootstrap, "partitions": 2},
        # Idle closes wait longer than producers take to reconnect after the outage (librdkafka backs off up
        # to 10 s); the default, 30 s, does too.
        "aggregates": {"grace": "5s", "idle_timeout": "15s", "checkpoint_interval": "500ms"},
        "sinks": [
            {"id": "pg", "type": "postgres", "dsn": dsn, "schema": schema, "timescaledb": "off",
             "topics": ["agg_1m"], "batch_delay": "100ms"}
        ],
    }  # fmt: skip
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topo))
    env = child_env(PLANTSTREAM_KAFKA=bootstrap)
    deploy(topo_file, env)
    # Event time in the past, one reading a second per series: 6 devices x 2 points, 8 minutes, sent as a
    # live stream (paced) so that the outage falls in the middle of it, as it would for field devices.
    start = minute_now() - 30 * 60_000
    readings: list[Reading] = []
    for d in range(6):
        readings += series_of(f"dev{d}", start, 8 * 60)
    readings.sort(key=lambda r: r[1])
    seconds = [[r for r in readings if r[1] == start + i * 1000] for i in range(8 * 60)]
    outage = length(12, 600)
    pace = (outage + 18) / len(seconds)  # wall seconds per second of event time
    # No delivery timeout: what is produced during the outage waits in the queue, as a spool's sender does.
    t = validate_data(topo)
    producer = TelemetryProducer(bootstrap, t.raw_topic, t.dlq_topic, extra={"message.timeout.ms": 0})
    app = f"outage-{tag}"
    worker = spawn(
        ["worker", str(topo_file), "--app-id", app, "--loglevel", "info"], tmp_path / "worker.log", env
    )
    procs = [worker]
    sender_failed: list[BaseException] = []

    def live() -> None:
        try:
            t0 = time.monotonic()
            for i, second in enumerate(seconds):
                time.sleep(max(0.0, t0 + i * pace - time.monotonic()))
                send(producer, second, per=2)
                producer.poll(0)
        except BaseException as e:
            sender_failed.append(e)

    sender = threading.Thread(target=live, daemon=True)
    try:
        sender.start()
        wait_for(lambda: len(agg_rows(dsn, schema)) >= 12, 90, "the first closed minutes")
        kafka.down("kafka")
        ends = time.monotonic() + outage
        while time.monotonic() < ends:
            assert worker.poll() is None, f"the worker exited during the outage: {worker.returncode}"
            time.sleep(1)
        kafka.up("kafka")
        sender.join(outage + 120)
        assert not sender.is_alive() and not sender_failed, sender_failed
        assert producer.flush(120) == 0

        expected = expected_aggregates(readings)
        wait_for(lambda: len(agg_rows(dsn, schema)) >= len(expected), 180, f"{len(expected)} windows")
        assert worker.poll() is None, "the worker must have waited, not exited"
        dlq = read_dlq(bootstrap, t.dlq_topic, 0, 3)
        assert [d["reason"] for d in dlq][:5] == []
        assert compare(agg_rows(dsn, schema), expected) == []
        log = (tmp_path / "worker.log").read_text()
        assert "the broker is out of reach" in log and "the broker is back" in log

        # A stop while Kafka is away: out within the grace, nothing committed past what the broker has.
        kafka.down("kafka")
        t0 = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(12)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker did not stop within 12 s of SIGTERM while Kafka was away")
        assert time.monotonic() - t0 < 12
        kafka.up("kafka")
        again = spawn(["worker", str(topo_file), "--app-id", app], tmp_path / "worker2.log", env)
        procs.append(again)
        wait_for(lambda: compare(agg_rows(dsn, schema), expected) == [], 60, "the same aggregates")
    finally:
        stop(procs, 20)
        producer.flush(5)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

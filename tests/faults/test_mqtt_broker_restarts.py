"""Mosquitto restarted five times mid-stream and the MQTT connector SIGKILLed once: nothing lost.

A private Mosquitto (persistence on, as the local service has it) takes QoS 1 messages from a publisher that
publishes again what the broker did not acknowledge; ``plantstream connect`` reads them into the shared Kafka.
The broker is restarted five times while messages flow, and the connector is SIGKILLed once and started
again. Every message the broker acknowledged to the publisher must reach telemetry.raw (at least once: the
worker drops identical repeats), and nothing else; a ``plantstream worker`` writes them to PostgreSQL, where
``readings`` holds exactly what telemetry.raw holds, each acknowledged reading with its value, one row per
series and timestamp, and ``agg_1m`` equals pandas over ``readings``; no dead letters.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.topology import load
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import agg_rows
from tests.faults.conftest import length
from tests.faults.services import (
    Private,
    Publisher,
    child_env,
    deploy,
    private,
    readings_table,
    spawn,
    terminate,
)
from tests.integration.readback import Topics
from tests.reference import compare, expected_aggregates

pytestmark = pytest.mark.integration


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Private]:
    with private(tmp_path / "services", "mosquitto") as svc:
        yield svc


def test_broker_restarts_and_a_connector_kill_lose_nothing(
    mosquitto: Private, namespace: dict[str, str], tmp_path: Path
) -> None:
    tag = namespace["tag"]
    root = f"mr{tag}"
    url = mosquitto.connection()["PLANTSTREAM_MQTT_URL"]
    dsn = namespace["PLANTSTREAM_PG_DSN"]
    topo: dict[str, Any] = {
        "name": f"mqr{tag}",
        "prefix": namespace["prefix"],
        "broker": {"bootstrap": namespace["PLANTSTREAM_KAFKA"], "partitions": 2},
        # Kafka stays up here: the last minute closes 10 s after the stream ends.
        "aggregates": {"idle_timeout": "10s"},
        "sinks": [
            {"id": "pg", "type": "postgres", "dsn": dsn, "schema": namespace["schema"], "timescaledb": "off",
             "topics": ["readings", "agg_1m"], "batch_delay": "100ms"}
        ],
        "sources": [
            {"id": "mq", "type": "mqtt", "url": url, "client_id": f"c-{tag}",
             "topics": [{"filter": f"{root}/+/+/+", "template": f"{root}/{{site}}/{{device}}/{{point}}"}],
             "spool": {"dir": str(tmp_path / "spool")}}
        ],
    }  # fmt: skip
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topo))
    env = child_env(PLANTSTREAM_MQTT_URL=url)
    deploy(topo_file, env)
    topology = load(topo_file, env)
    args = ["connect", str(topo_file), "--source", "mq", "--metrics", "off"]
    procs = [spawn(args, tmp_path / "connect0.log", env)]
    worker = spawn(["worker", str(topo_file), "--app-id", f"mqr-{tag}", "--metrics", "off"],
                   tmp_path / "worker.log", env)  # fmt: skip
    pub: Publisher | None = None
    try:
        wait_for(lambda: "subscribed" in (tmp_path / "connect0.log").read_text(), 30, "connector subscribed")
        pub = Publisher(url, root)
        gap = length(4, 20)  # between restarts
        for i in range(5):
            time.sleep(gap)
            mosquitto.down("mosquitto")
            mosquitto.up("mosquitto")
            if i == 2:  # mid-stream, between two restarts
                time.sleep(gap / 2)
                procs[-1].send_signal(signal.SIGKILL)
                procs[-1].wait(10)
                procs.append(spawn(args, tmp_path / "connect1.log", env))
        time.sleep(gap)
        pub.close()
        accepted = set(pub.accepted)
        assert len(accepted) > 100

        topics = Topics(topology)
        got: set[tuple[str, int]] = set()

        def missing() -> set[tuple[str, int]]:
            topics.poll()
            got.update((s, r["ts"]) for s, rs in topics.series().items() for r in rs)
            return accepted - got

        wait_for(lambda: not missing(), 120, "every accepted message in telemetry.raw")
        topics.close()
        # Nothing else: what arrived was published (a message whose acknowledgement was lost in a restart is
        # published again, so arrivals beyond the accepted ones are only such, within the stream's range).
        assert {s for s, _ in got} == {s for s, _ in accepted}
        assert max(ts for _, ts in got) <= max(ts for _, ts in accepted) + 4
        assert topics.dead == []

        # Down to the database: readings == telemetry.raw, with the publisher's values; agg_1m == pandas.
        schema = namespace["schema"]
        wait_for(lambda: len(readings_table(dsn, schema)) >= len(got), 120, f"{len(got)} rows in readings")
        rows = readings_table(dsn, schema)
        assert sorted((s, ts) for s, ts, _v, _q in rows) == sorted(got)  # the key forbids a second copy
        assert all(v == ts % 1000 for _s, ts, v, _q in rows)
        expected = expected_aggregates(rows)
        wait_for(
            lambda: len(agg_rows(dsn, schema)) >= len(expected), 90, f"{len(expected)} minutes in agg_1m"
        )
        assert compare(agg_rows(dsn, schema), expected) == []
        assert worker.poll() is None, "the worker exited"
    finally:
        terminate(worker)
        if pub is not None and not pub.stop.is_set():
            pub.close()
        for p in procs:
            terminate(p)

"""A replay over MQTT as fast as the connector takes it, every message twice, devices sharing one partition:
per-device clocks keep every on-time reading and duplicates change nothing (docs/semantics.md)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import yaml

from pipeline.core import codec
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import agg_rows, deploy_cli, publish, read_dlq, spawn, stop, topology
from tests.reference import compare, expected_aggregates

pytestmark = pytest.mark.e2e
T0 = 1_767_225_600_000


def test_a_fast_replay_with_duplicates_matches_pandas(namespace, tmp_path, monkeypatch):
    ns = namespace
    topo = topology(ns)
    topo["broker"]["partitions"] = 1  # every device on one partition
    topo["sinks"][0]["topics"] = ["agg_1m"]
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topo))
    deploy_cli(topo_file)

    rng = random.Random(3)
    root = ns["mqtt_root"]
    events: list[tuple[float, str, bytes]] = []
    on_time: list[tuple[str, int, float, str]] = []
    for dev in ("d1", "d2", "d3"):
        for point in ("p", "q", "r"):
            for i in range(240):  # 4 minutes at 1 Hz
                ts = T0 + i * 1000 + rng.randint(0, 300)
                v = round(rng.gauss(50, 10), 6)
                on_time.append((f"site1/{dev}/{point}", ts, v, "good"))
                # Arrival order shuffled by up to 3 s of event time, per device.
                events.append(
                    (
                        ts + rng.uniform(0, 3_000),
                        f"{root}/site1/{dev}/{point}",
                        codec.dumps({"value": v, "ts": ts}),
                    )
                )
    events.sort()
    messages: list[tuple[str, bytes, int | None]] = []
    for _, topic, payload in events:
        messages.append((topic, payload, None))
        messages.append((topic, payload, None))  # as a redelivery after a reconnect would

    connector = spawn(["connect", str(topo_file)], tmp_path / "connect.log")
    worker = spawn(
        ["worker", str(topo_file), "--app-id", f"fast-{ns['tag']}", "--loglevel", "info"], tmp_path / "w.log"
    )
    procs = [connector, worker]
    try:
        wait_for(
            lambda: "subscribed to" in (tmp_path / "connect.log").read_text(),
            60,
            "the connector to subscribe",
        )
        messages[0] = (*messages[0][:2], T0)  # the only timestamp publish() paces by: no pacing at all
        publish(ns["PLANTSTREAM_MQTT_URL"], messages, f"fast-{ns['tag']}")
        expected = expected_aggregates(on_time)
        dsn = ns["PLANTSTREAM_PG_DSN"]
        wait_for(lambda: len(agg_rows(dsn, ns["schema"])) >= len(expected), 180, f"{len(expected)} rows")
        assert compare(agg_rows(dsn, ns["schema"]), expected) == []
        dlq: list[dict[str, Any]] = read_dlq(ns["PLANTSTREAM_KAFKA"], f"{ns['prefix']}telemetry.dlq", 1, 3)
        assert [x["reason"] for x in dlq] == []  # not one on-time reading called late
    finally:
        stop(procs)

"""Adding a sink is a folder and one registry line: a test-only sink that the topology accepts and the
worker drives (tests/fixtures/jsonl_sink/), on the real Kafka."""

from __future__ import annotations

import json
from typing import Any

import pytest

from connectors import registry
from connectors.common.producer import TelemetryProducer
from pipeline.deploy import deploy
from pipeline.topology import TopologyError, validate_data
from pipeline.worker import build_worker
from tests.conftest import wait_for

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a minute boundary


@pytest.fixture
def jsonl_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.SINKS, "jsonl", "tests.fixtures.jsonl_sink.config:JsonlSink")


def topology(ns: dict[str, str], directory: str) -> dict[str, Any]:
    return {
        "name": f"reg-{ns['tag']}",
        "prefix": ns["prefix"],
        "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 2},
        "aggregates": {"grace": "1s", "idle_timeout": "1s", "checkpoint_interval": "200ms", "latest": False},
        "sinks": [{"id": "files", "type": "jsonl", "directory": directory, "batch_delay": "100ms"}],
    }


def test_the_topology_accepts_a_registered_sink_and_names_it_when_wrong(jsonl_registered, tmp_path):
    ns = {"tag": "x", "prefix": "", "PLANTSTREAM_KAFKA": "127.0.0.1:1"}
    topo = validate_data(topology(ns, str(tmp_path)))
    assert topo.sinks[0].type == "jsonl"
    bad = topology(ns, str(tmp_path))
    bad["sinks"][0]["topics"] = ["readings"]
    with pytest.raises(TopologyError) as e:
        validate_data(bad)
    assert any(p.startswith("sinks[0].topics[0]") for p in e.value.problems), e.value.problems
    bad["sinks"][0] = {"id": "x", "type": "nosuch"}
    with pytest.raises(TopologyError) as e:
        validate_data(bad)
    assert "sinks[0].type" in e.value.problems[0] and "jsonl" in e.value.problems[0]


def test_the_worker_drives_a_registered_sink(jsonl_registered, namespace, tmp_path):
    ns = namespace
    out = tmp_path / "out"
    topo = validate_data(topology(ns, str(out)))
    deploy(topo, say=lambda m: None)
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    sent: dict[tuple[str, int], list[float]] = {}
    for s in range(150):  # 2.5 minutes of one reading a second per point, the devices in step
        for device in ("d1", "d2"):
            ts = T0 + s * 1000
            readings = []
            for point in ("p1", "p2", "p3"):
                v = float((s * 7 + len(point) * 3 + int(device[1])) % 23)
                readings.append({"point": point, "ts": ts, "value": v, "quality": "good"})
                sent.setdefault((f"site/{device}/{point}", ts - ts % 60_000), []).append(v)
            batch = {"v": 1, "source": "test", "site": "site", "device": device, "readings": readings}
            producer.send_batch(batch, lambda err: None)
    assert producer.flush(30) == 0
    worker = build_worker(topo, app_id=f"reg-{ns['tag']}")
    worker.start()
    try:
        table = out / "agg_1m.json"

        def rows() -> dict[str, Any]:
            return json.loads(table.read_text())["rows"] if table.exists() else {}

        wait_for(lambda: len(rows()) == len(sent), 120, f"{len(sent)} aggregates in {table}")
    finally:
        worker.stop()
    got = rows()
    for (series, start), values in sent.items():
        a = got[f"{series}@{start}"]
        assert a["count"] == len(values)
        assert a["min"] == min(values) and a["max"] == max(values)
        assert a["mean"] == pytest.approx(sum(values) / len(values), rel=1e-12)
    offsets = json.loads(table.read_text())["offsets"]
    assert offsets and all(o >= 0 for o in offsets.values())

"""OPC UA source against the simulated plant over real sockets, into the real Kafka.

The plant runs as a child process on a free loopback port; the connector runs on a thread with the
project's producer; the test reads telemetry.raw and telemetry.dlq back from Kafka.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua

from connectors.common.producer import TelemetryProducer
from connectors.opcua.source import OpcUaSourceRunner
from connectors.sim import launch
from connectors.sim.opcua_plant import CONST_T0, GUID_ID, NAMESPACE, OPAQUE_ID
from pipeline.core.records import now_ms
from pipeline.deploy import ensure_topics
from pipeline.topology import Topology, validate_data
from tests.conftest import wait_for
from tests.integration.readback import Topics

pytestmark = pytest.mark.integration
NSU = f"nsu={NAMESPACE}"


def make_topology(ns: dict[str, str], source: dict[str, Any]) -> Topology:
    topo = validate_data(
        {
            "name": f"opcua{ns['tag']}",
            "prefix": ns["prefix"],
            "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 2},
            "sources": [source],
        }
    )
    ensure_topics(topo, say=lambda _m: None)
    return topo


class Running:
    def __init__(self, topo: Topology) -> None:
        src = topo.sources[0]
        self.producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
        self.runner = OpcUaSourceRunner(src, self.producer)  # type: ignore[arg-type]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.runner.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def plant(tmp_path: Path) -> Iterator[str]:
    endpoint = f"opc.tcp://127.0.0.1:{launch.free_tcp_port()}/plant"
    proc = launch.start_opcua_plant(
        endpoint, args=["--loops", "50", "--tanks", "15"], log=tmp_path / "plant.log"
    )
    yield endpoint
    launch.stop(proc)


def test_plant_values_quality_timestamps_and_unknown_nodes(namespace: dict[str, str], plant: str) -> None:
    opaque = __import__("base64").b64encode(OPAQUE_ID).decode()
    topo = make_topology(
        namespace,
        {
            "id": "plant",
            "type": "opcua",
            "endpoint": plant,
            "site": "refinery",
            "publishing_interval": "500ms",
            "defaults": {"sampling_interval": "1s", "queue_size": 5},
            "browse": [{"root": "/0:Objects/2:Plant", "exclude": "Const0[6-9]"}],
            "nodes": [
                {"node_id": "ns=2;i=5001", "device": "ids", "point": "numeric"},
                {"node_id": f"ns=2;g={GUID_ID}", "device": "ids", "point": "guid"},
                {"node_id": f"ns=2;b={opaque}", "device": "ids", "point": "opaque"},
                {"node_id": f"{NSU};s=Plant/NoSuchNode", "device": "ids", "point": "missing"},
            ],
        },
    )
    started = now_ms()
    topics = Topics(topo)
    run = Running(topo)
    try:

        def enough() -> bool:
            topics.poll()
            s = topics.series()
            updated = [k for k, v in s.items() if len(v) >= 3]
            flaky_bad = any(r["quality"] == "bad" for r in s.get("refinery/Test/Flaky", []))
            return len(s) >= 200 and len(updated) >= 150 and len(topics.dead) >= 3 and flaky_bad

        wait_for(enough, 40, "200 series, 150 of them updated three times, a bad value and the dead letters")
        stats = run.runner.stats
        assert stats.monitored >= 200 and stats.sessions == 1 and stats.node_errors == 1
    finally:
        run.close()
        topics.close()
    series = topics.series()
    assert len(series) >= 200
    # Right values, quality, units and timestamps on the fixed nodes.
    for i in range(1, 6):
        r = series[f"refinery/Test/Const{i:02d}"][0]
        ts = int((CONST_T0 + timedelta(seconds=i)).timestamp() * 1000)
        assert (r["value"], r["quality"], r["ts"], r["unit"]) == (i * 1.25, "good", ts, "kW")
        assert r["status"]["source_ts"] == ts and r["status"]["server_ts"] >= started - 60_000
    assert not any(k.startswith("refinery/Test/Const0" + d) for k in series for d in "6789")
    unc = series["refinery/Test/Uncertain"][0]
    assert unc["quality"] == "uncertain" and unc["status"]["name"] == "UncertainLastUsableValue"
    assert unc["status"]["code"] == ua.StatusCodes.UncertainLastUsableValue
    assert [series[f"refinery/ids/{p}"][0]["value"] for p in ("numeric", "guid", "opaque")] == [
        11.0,
        12.0,
        13.0,
    ]
    assert series["refinery/Test/Flag"][0]["value"] == 1.0
    # Bad arrives without a value: carried with the last value and quality bad.
    flaky = series["refinery/Test/Flaky"]
    bad = [(i, r) for i, r in enumerate(flaky) if r["quality"] == "bad"]
    assert bad, "the flaky node's bad phase never arrived"
    for i, r in bad:
        assert r["status"]["name"] == "BadCommunicationError" and r["status"]["held"] is True
        if i > 0:
            assert r["value"] == flaky[i - 1]["value"]
    # Live values: plausible timestamps (source time within the run; server time not before it).
    for key in ("refinery/FIC101/PV", "refinery/TK101/Level", "refinery/TIC102/OP"):
        rs = series[key]
        assert len(rs) >= 3 and len({r["value"] for r in rs}) >= 2
        for r in rs:
            assert started - 2_000 <= r["ts"] <= now_ms() + 1_000
            assert r["status"]["server_ts"] >= r["status"]["source_ts"] - 5
    assert series["refinery/FIC101/PV"][0]["unit"] == "m³/h"
    # The values agree with what the server holds (MODE and SP rarely move; OP only in manual).
    current = asyncio.run(_read(plant, [f"{NSU};s=Plant/Loops/FIC{101 + 4 * i}/MODE" for i in range(5)]))
    assert [series[f"refinery/FIC{101 + 4 * i}/MODE"][-1]["value"] for i in range(5)] == current
    # One point per (series, ts); each batch one device; a device's points share batches.
    for key, rs in series.items():
        assert len({r["ts"] for r in rs}) == len(rs), f"duplicate timestamps in {key}"
    assert all(len({b["device"]} | {b["site"]}) == 2 for b in topics.batches)
    assert any({"PV", "OP"} <= {r["point"] for r in b["readings"]} for b in topics.batches)
    # Unknown nodes and unusable values go to the dead-letter topic, nothing else stops.
    reasons = [d["reason"] for d in topics.dead]
    assert any(r.startswith("node unknown: " + f"{NSU};s=Plant/NoSuchNode") for r in reasons)
    assert any("not a number" in r for r in reasons)  # Test/Text is a string
    assert any("BadSensorFailure" in r for r in reasons)  # Test/Bad never had a value to hold
    assert all(d["source"] == "plant" for d in topics.dead)


async def _read(endpoint: str, node_ids: list[str]) -> list[Any]:
    async with Client(endpoint) as c:
        idx = await c.get_namespace_index(NAMESPACE)
        nodes = [c.get_node(n.replace(NSU, f"ns={idx}")) for n in node_ids]
        return [float(v) for v in await c.read_values(nodes)]


async def _write_sequence(endpoint: str, node: str, values: list[float]) -> None:
    async with Client(endpoint) as c:
        idx = await c.get_namespace_index(NAMESPACE)
        n = c.get_node(node.replace(NSU, f"ns={idx}"))
        t = datetime.now(UTC)
        for i, v in enumerate(values):
            source_ts: Any = t + timedelta(milliseconds=10 * i)
            dv = ua.DataValue(ua.Variant(v, ua.VariantType.Double), ua.StatusCode(), source_ts)
            await n.write_value(dv)
            await asyncio.sleep(
                0.05
            )  # one value per sample: the server keeps only the latest between samples


def test_deadbands_absolute_and_percent(namespace: dict[str, str], plant: str) -> None:
    tunable = f"{NSU};s=Plant/Test/Tunable"  # EURange 0..200: 5 % is 10 bar
    topo = make_topology(
        namespace,
        {
            "id": "db",
            "type": "opcua",
            "endpoint": plant,
            "site": "s",
            "publishing_interval": "200ms",
            "nodes": [
                {
                    "node_id": tunable,
                    "device": "t",
                    "point": "abs",
                    "sampling_interval": "0s",
                    "deadband": {"type": "absolute", "value": 1.0},
                },
                {
                    "node_id": tunable,
                    "device": "t",
                    "point": "pct",
                    "sampling_interval": "0s",
                    "deadband": {"type": "percent", "value": 5},
                },
                {"node_id": tunable, "device": "t", "point": "all", "sampling_interval": "0s"},
            ],
        },
    )
    topics = Topics(topo)
    run = Running(topo)
    try:

        def got(point: str, value: float) -> bool:
            topics.poll()
            return any(r["value"] == value for r in topics.series().get(f"s/t/{point}", []))

        wait_for(lambda: got("abs", 50.0) and got("pct", 50.0), 20, "the initial value 50")
        asyncio.run(_write_sequence(plant, tunable, [50.5, 50.9, 52.0, 52.5, 61.0, 63.0, 75.0]))
        wait_for(lambda: got("abs", 75.0) and got("pct", 75.0) and got("all", 75.0), 20, "the last value 75")
    finally:
        run.close()
        topics.close()
    s = topics.series()
    assert [r["value"] for r in s["s/t/all"]] == [50.0, 50.5, 50.9, 52.0, 52.5, 61.0, 63.0, 75.0]
    assert [r["value"] for r in s["s/t/abs"]] == [50.0, 52.0, 61.0, 63.0, 75.0]
    assert [r["value"] for r in s["s/t/pct"]] == [50.0, 61.0, 75.0]
    assert run.runner.stats.deadband_suppressed >= 2


def test_percent_deadband_without_eurange_is_rejected_clearly(namespace: dict[str, str], plant: str) -> None:
    topo = make_topology(
        namespace,
        {
            "id": "norange",
            "type": "opcua",
            "endpoint": plant,
            "site": "s",
            "nodes": [
                {
                    "node_id": f"{NSU};s=Plant/Test/NoRange",
                    "device": "t",
                    "point": "x",
                    "deadband": {"type": "percent", "value": 2},
                }
            ],
        },
    )
    run = Running(topo)
    run.thread.join(30)
    assert not run.thread.is_alive(), "a configuration error must stop the source, not retry forever"
    assert run.runner.fatal is not None
    assert "NoRange" in run.runner.fatal and "EURange" in run.runner.fatal and "absolute" in run.runner.fatal
    run.close()

"""Without a spool, a SIGKILL of the OPC UA connector during a Kafka outage loses readings (the control of
tests/faults/test_kafka_outage_sources.py, where the spool is on and nothing is lost).

An OPC UA server keeps nothing for a client that missed it. A simulated plant runs in this process and
records every value it writes (series and source timestamp); ``plantstream connect`` samples it in a child
process with ``spool: off`` against a private Kafka. Kafka is stopped, the connector is SIGKILLed halfway
through the outage and started again, then Kafka returns: what the first connector received during the
outage was in librdkafka's memory when it was killed, and none of it reaches telemetry.raw. (The control
kills rather than waits out librdkafka's message timeout: the topology does not set producer options, and
the default timeout is 5 minutes.)
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from connectors.sim import launch
from connectors.sim.opcua_plant import NAMESPACE
from pipeline.core.records import now_ms
from pipeline.topology import load
from tests.conftest import wait_for
from tests.faults.conftest import FULL, length
from tests.faults.services import Key, Plant, Private, child_env, deploy, kill_halfway, spawn, terminate
from tests.integration.readback import Topics

# make faults only: make test keeps to the scenarios that must not lose anything.
pytestmark = [pytest.mark.integration, pytest.mark.skipif(not FULL, reason="make faults only")]

MARGIN_MS = 2000  # a connector's batching and the subscription's publishing, at the edges of an interval


def in_raw(topics: Topics) -> set[Key]:
    topics.poll()
    return {(k, r["ts"]) for k, rs in topics.series().items() for r in rs}


def test_without_a_spool_a_kill_during_a_kafka_outage_loses_readings(kafka: Private, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    endpoint = f"opc.tcp://127.0.0.1:{launch.free_tcp_port()}/plant"
    bootstrap = kafka.connection()["PLANTSTREAM_KAFKA"]
    topo: dict[str, Any] = {
        "name": f"spoolua{tag}",
        "prefix": f"t{tag}.",
        "broker": {"bootstrap": bootstrap, "partitions": 2},
        "sources": [
            {"id": "plant", "type": "opcua", "endpoint": endpoint, "site": "s",
             "publishing_interval": "200ms",
             "browse": [{"root": f"nsu={NAMESPACE};s=Plant/Tanks", "include": "Temperature",
                         "sampling_interval": "100ms", "queue_size": 100}],
             "spool": "off"}
        ],
    }  # fmt: skip
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topo))
    env = child_env(PLANTSTREAM_KAFKA=bootstrap)
    deploy(topo_file, env)
    topology = load(topo_file, env)
    args = ["connect", str(topo_file), "--source", "plant", "--metrics", "127.0.0.1:0"]
    logs = [tmp_path / "connect1.log", tmp_path / "connect2.log"]
    plant = Plant(endpoint)
    topics = Topics(topology)
    proc = spawn(args, logs[0], env)
    procs = [proc]
    try:
        wait_for(lambda: "subscribed to 4 node(s)" in logs[0].read_text(), 60, "the connector subscribed")
        wait_for(lambda: len(in_raw(topics)) >= 20, 60, "readings in Kafka before the outage")

        outage = length(12, 600)
        down, killed, ends = kill_halfway(kafka, proc, outage)
        accepted = plant.written(down + MARGIN_MS, killed - MARGIN_MS)
        assert len(accepted) >= 4 * 5 * (outage / 2 - 4) * 0.8  # four series at 5 Hz, give or take

        proc = spawn(args, logs[1], env)
        procs.append(proc)
        wait_for(lambda: "subscribed to 4 node(s)" in logs[1].read_text(), 60, "the connector again")
        time.sleep(max(0.0, ends - time.monotonic()))  # the rest of the outage
        kafka.up("kafka")
        up = now_ms()
        topics.close()
        topics = Topics(topology)

        # Kafka is back and the second connector's readings arrive: what the first one received during the
        # outage died with it.
        wait_for(lambda: any(ts > up for _, ts in in_raw(topics)), 90, "readings after the outage")
        got = in_raw(topics)
        assert accepted - got == accepted, "without a spool the kill during the outage loses readings"
    finally:
        for p in procs:
            terminate(p)
        topics.close()
        plant.close()

"""Store and forward of the OPC UA source through a Kafka outage and a SIGKILL of the connector.

An OPC UA server keeps nothing for a client that missed it, so here the spool alone stands between a Kafka
outage and lost readings. A simulated plant runs in this process and records every value it writes (series
and source timestamp); ``plantstream connect`` samples it in a child process against a private Kafka. Kafka
is stopped, the connector is SIGKILLed halfway through the outage and started again, then Kafka returns.

What the connector accepted: every record in its spool (read from the directory after the kill, and just
before Kafka returns), and every value the plant wrote while the first connector was up during the outage
(a margin of 2 s at either end; what the plant wrote between the kill and the restart nobody received).
All of it must reach telemetry.raw, at least once. The same scenario with ``spool: off`` is the control:
what the first connector received during the outage was in librdkafka's memory when it was killed, and is
lost. (The control kills rather than waits out librdkafka's message timeout: the topology does not set
producer options, and the default timeout is 5 minutes.)
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import ua
from asyncua.common.node import Node

from connectors.common.spool import MIB
from connectors.sim import launch
from connectors.sim.opcua_plant import NAMESPACE, PlantOptions, PlantServer
from pipeline.core.records import now_ms
from pipeline.topology import load
from tests.conftest import wait_for
from tests.faults.conftest import FULL, length
from tests.faults.services import (
    Private,
    child_env,
    deploy,
    private,
    replayed_then_drained,
    spawn,
    spool_bytes,
    spooled,
    terminate,
)
from tests.integration.readback import Topics

pytestmark = pytest.mark.integration

MAX_BYTES = 16 * MIB
MARGIN_MS = 2000  # a connector's batching and the subscription's publishing, at the edges of an interval

Key = tuple[str, int]  # (site/device/point, ts)


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Private]:
    with private(tmp_path_factory.mktemp("services"), "kafka") as svc:
        yield svc


class Plant:
    """The simulated plant in a thread of this process; ``writes`` is every (series, ts) it produced."""

    def __init__(self, endpoint: str) -> None:
        self.server = PlantServer(PlantOptions(endpoint=endpoint, loops=1, tanks=4, rate=5.0))
        self.writes: list[Key] = []
        self.lock = threading.Lock()
        write = self.server._write

        async def recorded(
            node: Node, value: Any, vtype: ua.VariantType, source_ts: datetime, status: Any = None
        ) -> None:
            await write(node, value, vtype, source_ts, status)
            path = str(node.nodeid.Identifier).split("/")  # Plant/Tanks/TK101/Temperature
            with self.lock:
                # The connector's rule (connectors/opcua/mapping.py ms): epoch milliseconds, truncated.
                self.writes.append((f"s/{path[-2]}/{path[-1]}", int(source_ts.timestamp() * 1000)))

        self.server._write = recorded  # type: ignore[method-assign]
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self._serve(),), daemon=True
        )
        self.thread.start()
        wait_for(lambda: len(self.written(0, now_ms())) > 0, 30, "the simulated plant ticking")

    async def _serve(self) -> None:
        await self.server.serve(self.stop)

    def written(self, since: int, until: int) -> set[Key]:
        with self.lock:
            return {w for w in self.writes if since <= w[1] <= until and w[0].endswith("/Temperature")}

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


def in_raw(topics: Topics) -> set[Key]:
    topics.poll()
    return {(k, r["ts"]) for k, rs in topics.series().items() for r in rs}


# The control only in make faults: make test keeps to the scenario itself.
@pytest.mark.parametrize(
    "spool", ["on", pytest.param("off", marks=pytest.mark.skipif(not FULL, reason="make faults only"))]
)
def test_readings_accepted_during_a_kafka_outage_and_a_kill_all_reach_kafka(
    kafka: Private, tmp_path: Path, spool: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    endpoint = f"opc.tcp://127.0.0.1:{launch.free_tcp_port()}/plant"
    bootstrap = kafka.connection()["PLANTSTREAM_KAFKA"]
    spool_path = tmp_path / "spool"
    topo: dict[str, Any] = {
        "name": f"spoolua{tag}",
        "prefix": f"t{tag}.",
        "broker": {"bootstrap": bootstrap, "partitions": 2},
        "sources": [
            {"id": "plant", "type": "opcua", "endpoint": endpoint, "site": "s",
             "publishing_interval": "200ms",
             "browse": [{"root": f"nsu={NAMESPACE};s=Plant/Tanks", "include": "Temperature",
                         "sampling_interval": "100ms", "queue_size": 100}],
             "spool": {"dir": str(spool_path), "max_bytes": MAX_BYTES} if spool == "on" else "off"}
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

        kafka.down("kafka")
        down = now_ms()
        outage = length(12, 600)
        ends = time.monotonic() + outage
        time.sleep(outage / 2)  # the outage itself, half of it before the kill
        killed = now_ms()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        accepted = plant.written(down + MARGIN_MS, killed - MARGIN_MS)
        assert len(accepted) >= 4 * 5 * (outage / 2 - 4) * 0.8  # four series at 5 Hz, give or take
        at_kill = spooled(spool_path)
        max_spool = spool_bytes(spool_path)

        proc = spawn(args, logs[1], env)
        procs.append(proc)
        wait_for(lambda: "subscribed to 4 node(s)" in logs[1].read_text(), 60, "the connector again")
        time.sleep(max(0.0, ends - time.monotonic()))  # the rest of the outage
        before_up = spooled(spool_path)
        max_spool = max(max_spool, spool_bytes(spool_path))
        kafka.up("kafka")
        up = now_ms()
        topics.close()
        topics = Topics(topology)

        if spool == "off":
            # Kafka is back and the second connector's readings arrive: what the first one received during
            # the outage died with it.
            wait_for(lambda: any(ts > up for _, ts in in_raw(topics)), 90, "readings after the outage")
            got = in_raw(topics)
            assert accepted - got == accepted, "without a spool the kill during the outage loses readings"
            return

        # Everything the first connector received during the outage was in its spool when it was killed.
        assert accepted <= at_kill, sorted(accepted - at_kill)[:10]
        expected = at_kill | before_up
        assert len(before_up - at_kill) > 0  # the second connector spooled its own readings too

        def missing() -> set[Key]:
            return expected - in_raw(topics)

        wait_for(lambda: not missing(), 120, f"all {len(expected)} spooled readings in telemetry.raw")
        assert max_spool <= MAX_BYTES
        replayed_then_drained(proc, logs[1], spool_path)  # the second connector sent what the first left
    finally:
        for p in procs:
            terminate(p)
        topics.close()
        plant.close()

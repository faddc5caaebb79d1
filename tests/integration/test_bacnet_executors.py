"""One command executor per BACnet network, over real UDP and the real Kafka group coordinator.

Two BACnet sources on the same network (two connectors, as two `plantstream connect` processes would be)
share the network's consumer group: every command is written to the simulated unit once and answered once,
also when one of them stops in the middle of the stream. An executor that was replaced in the group while it
held a fetched command (paused past max.poll.interval) is refused its claim and does not write.
The unit logs every write it receives (connectors/sim/bacnet_ahu.py), which is what is counted.
"""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from connectors.bacnet.commands import CommandExecutor, WritePolicy, commands_group
from connectors.bacnet.config import BacnetSource
from connectors.bacnet.source import BacnetSourceRunner
from connectors.common.producer import TelemetryProducer
from connectors.sim import launch
from pipeline.core import codec
from pipeline.core.commands import WriteCommand, make_command
from pipeline.core.kafka import partition_for
from pipeline.deploy import ensure_topics
from pipeline.topology import Topology, validate_data
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]  # also in make faults

# Freely writable analog values of the simulated unit, keyed to both command partitions.
POINTS = {
    "tune": "analog-value,7",
    "econ": "analog-value,4",
    "calc": "analog-value,5",
    "oaf": "analog-value,6",
}
OBJECT_NAMES = {"tune": "TUNE", "econ": "ECON-MIN", "calc": "SAT-SP-CALC", "oaf": "OA-FLOW-SP"}
# Seconds librdkafka lets pass between two polls before it leaves the group (the broker's minimum session).
SHORT_SESSION = {"session.timeout.ms": 6000, "max.poll.interval.ms": 6000, "heartbeat.interval.ms": 1000}


def topology(ns: dict[str, str], client: str, device: str) -> Topology:
    topo = validate_data(
        {
            "name": f"exec{ns['tag']}",
            "prefix": ns["prefix"],
            "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 2},
            "sources": [
                {
                    "id": "bms",
                    "type": "bacnet",
                    "local_address": client,
                    "network": "lab",
                    "site": "hq",
                    "defaults": {"interval": "5s"},
                    "devices": [
                        {
                            "instance": 1001,
                            "address": device,
                            "name": "ahu1",
                            "points": [
                                {"object": obj, "name": name, "writable": True}
                                for name, obj in POINTS.items()
                            ],
                        }
                    ],
                }
            ],
        }
    )
    ensure_topics(topo, say=lambda _m: None)
    return topo


class Connector:
    """A BACnet source with its executor, as one `plantstream connect` runs it."""

    def __init__(self, topo: Topology, consumer_config: dict[str, Any] | None = None) -> None:
        src = topo.sources[0]
        assert isinstance(src, BacnetSource)
        self.producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
        self.runner = BacnetSourceRunner(src, self.producer)
        self.executor = CommandExecutor(
            topo,
            WritePolicy(topo),
            src.id,
            network=src.network_id,
            write_timeout=src.defaults.timeout / 1000,
            consumer_config=consumer_config,
        )
        self.runner.executor = self.executor
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.runner.run, args=(self.stop,), daemon=True)
        self.thread.start()
        assert self.runner.ready.wait(10), self.runner.fatal

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def send(topo: Topology, cmds: list[WriteCommand]) -> None:
    """Commands keyed by point on the partitions `plantstream write` uses."""
    p = Producer({"bootstrap.servers": topo.broker.bootstrap, "partitioner": "consistent_random"})
    for c in cmds:
        p.produce(topo.commands_topic, codec.dumps(c), c["point"].encode())
    assert p.flush(10) == 0


def writes_at_device(log: Path) -> Counter[tuple[str, float]]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return Counter(
        (m.group(1), float(m.group(2))) for m in re.finditer(r"write (\S+) presentValue=(\S+)", text)
    )


class Results:
    """Every CommandResult on the results topic, by command id."""

    def __init__(self, topo: Topology) -> None:
        self.c = Consumer(
            {
                "bootstrap.servers": topo.broker.bootstrap,
                "group.id": f"t-results-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self.c.subscribe([topo.results_topic])
        self.by_id: dict[str, list[dict[str, Any]]] = {}

    def __call__(self) -> dict[str, list[dict[str, Any]]]:
        for msg in self.c.consume(1000, 0.2):
            if msg.error() is None:
                r = codec.loads(msg.value())
                self.by_id.setdefault(r["id"], []).append(r)
        return self.by_id

    def covering(self, cmds: list[WriteCommand]) -> dict[str, list[dict[str, Any]]] | None:
        """The results once every command of ``cmds`` has one."""
        found = self()
        return found if set(found) >= {c["id"] for c in cmds} else None

    def close(self) -> None:
        self.c.close()


def commands(n: int, start: int) -> list[WriteCommand]:
    names = list(POINTS)
    return [make_command(f"hq/ahu1/{names[i % len(names)]}", start + i + 0.25, 8, "pytest") for i in range(n)]


def expected_writes(cmds: list[WriteCommand]) -> Counter[tuple[str, float]]:
    return Counter((OBJECT_NAMES[c["point"].rsplit("/", 1)[1]], c["value"] or 0.0) for c in cmds)


@pytest.fixture
def unit(tmp_path: Path) -> Any:
    port = launch.free_udp_port("127.0.0.2")
    log = tmp_path / "ahu.log"
    proc = launch.start_bacnet_ahu(f"127.0.0.2/8:{port}", 1001, args=["--zones", "2"], log=log)
    yield f"127.0.0.2:{port}", log
    launch.stop(proc)


def client_address(host: str) -> str:
    return f"{host}/24:{launch.free_udp_port(host)}"


def test_two_executors_on_one_network_run_each_command_once(
    namespace: dict[str, str], unit: tuple[str, Path]
) -> None:
    device, log = unit
    topo_a = topology(namespace, client_address("127.0.0.3"), device)
    topo_b = topology(namespace, client_address("127.0.0.6"), device)
    assert {partition_for(f"hq/ahu1/{p}".encode(), 2, "consistent_random") for p in POINTS} == {0, 1}
    topics = Results(topo_a)
    a, b = Connector(topo_a), Connector(topo_b)
    stopped_a = False
    try:
        assert a.executor.group == b.executor.group == commands_group(topo_a, "lab")
        wait_for(
            lambda: (
                a.executor.ready.is_set()
                and b.executor.ready.is_set()
                and a.executor._assigned
                and b.executor._assigned
            ),
            30,
            "both executors holding a partition of the network's group",
        )
        first = commands(20, 100)
        send(topo_a, first)
        wait_for(
            lambda: topics() and a.executor.stats.accepted >= 3 and b.executor.stats.accepted >= 3,
            30,
            "both executors running commands",
        )
        a.close()  # a rebalance in the middle of the stream: b takes a's partition
        stopped_a = True
        second = commands(20, 200)
        send(topo_a, second)
        everything = first + second
        results = wait_for(
            lambda: topics.covering(everything),
            60,
            "a result for every command",
        )
        wait_for(lambda: sum(writes_at_device(log).values()) >= 40, 30, "the writes in the device's log")
    finally:
        if not stopped_a:
            a.close()
        b.close()
        topics.close()
    assert {cid: len(rs) for cid, rs in results.items() if len(rs) != 1} == {}, "one result per command"
    assert {rs[0]["status"] for rs in results.values()} == {"accepted"}
    assert writes_at_device(log) == expected_writes(everything), "each command written exactly once"
    assert a.executor.stats.accepted > 0 and b.executor.stats.accepted > 0, "both executed a share"
    assert a.executor.stats.accepted + b.executor.stats.accepted == 40


def test_a_replaced_executor_does_not_write_what_it_had_fetched(
    namespace: dict[str, str], unit: tuple[str, Path]
) -> None:
    device, log = unit
    topo_a = topology(namespace, client_address("127.0.0.3"), device)
    topo_b = topology(namespace, client_address("127.0.0.6"), device)
    topics = Results(topo_a)
    a = Connector(topo_a, SHORT_SESSION)
    b: Connector | None = None
    assert a.executor.ready.wait(30) and a.executor._assigned == {0, 1}
    held: list[str] = []
    handle = a.executor._handle

    async def paused(msg: Any, execute: Any) -> None:
        # a holds the fetched command without polling, as a process stopped by GC or SIGSTOP would,
        # until b (which gets a's partitions once a overruns max.poll.interval) has answered it.
        cid = codec.loads(msg.value())["id"]
        if not held:
            held.append(cid)
            while b is None or cid not in b.executor.answers:
                await asyncio.sleep(0.1)
        await handle(msg, execute)

    a.executor._handle = paused  # type: ignore[method-assign]
    try:
        cmd = make_command("hq/ahu1/tune", 42.25, 8, "pytest")
        send(topo_a, [cmd])
        wait_for(lambda: held, 30, "a to fetch the command")
        b = Connector(topo_b, SHORT_SESSION)
        wait_for(lambda: a.executor.stats.fenced >= 1, 60, "a's claim refused after it woke up")
        results = wait_for(lambda: topics().get(cmd["id"]), 10, "the result")
        # a comes back as an ordinary member: later commands still run once each.
        later = commands(8, 300)
        send(topo_a, later)
        all_results = wait_for(lambda: topics.covering(later), 60, "the later commands answered")
        wait_for(lambda: sum(writes_at_device(log).values()) >= 9, 10, "the writes in the device's log")
    finally:
        a.close()
        if b is not None:
            b.close()
        topics.close()
    assert len(results) == 1 and results[0]["status"] == "accepted"
    assert held == [cmd["id"]] and a.executor.stats.fenced >= 1
    assert b is not None and b.executor.stats.accepted >= 1
    assert writes_at_device(log) == expected_writes([cmd, *later]), "the held command written once, by b"
    assert all(len(all_results[c["id"]]) == 1 for c in later)

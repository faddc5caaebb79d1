"""The BACnet write executor's claim as a fence, with a fake consumer for the exact interleavings: a member
whose partition moved (commit refused) does not write; a claim that took too long is not sent; a command id
answered before gets its earlier result again, not a second write; a device in doubt is refused. Also the
network of a source, and one executing source per network."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from connectors.bacnet.commands import CommandExecutor, WritePolicy, WriteRefused, commands_group
from pipeline.core import codec
from pipeline.core.commands import make_command
from pipeline.topology import Topology, TopologyError, validate_data


def source(id_: str = "bms", **extra: Any) -> dict[str, Any]:
    return {
        "id": id_,
        "type": "bacnet",
        "local_address": "192.168.1.10/24:47808",
        "site": "hq",
        "devices": [
            {
                "instance": 1001,
                "address": "192.168.1.20",
                "name": "ahu1",
                "points": [{"object": "analog-value,1", "name": "sp", "writable": True, "max": 30}],
            }
        ],
        **extra,
    }


def topology(*sources: dict[str, Any]) -> Topology:
    return validate_data({"name": "t", "sources": list(sources) or [source()]})


class Msg:
    def __init__(self, value: Any, offset: int, partition: int = 0) -> None:
        self._value = codec.dumps(value)
        self._offset = offset
        self._partition = partition

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return "commands.bacnet"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def error(self) -> None:
        return None


class FakeConsumer:
    """Commits succeed until ``fenced`` is set, then fail as the coordinator answers a replaced member."""

    def __init__(self) -> None:
        self.fenced = False
        self.commits: list[tuple[int, int]] = []
        self.on_commit: Any = None

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> list[TopicPartition]:
        assert asynchronous is False, "the claim must be a synchronous commit"
        if self.on_commit is not None:
            self.on_commit()
        if self.fenced:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_MEMBER_ID, "Broker: Unknown member"))
        self.commits.extend((tp.partition, tp.offset) for tp in offsets)
        return offsets


class FakeOutbox:
    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def produce(self, topic: str, key: bytes, value: bytes, ts: int) -> None:
        self.results.append(codec.loads(value))

    def flush_quietly(self, timeout: float) -> int:
        return 0


class Device:
    def __init__(self, refuse: str | None = None) -> None:
        self.writes: list[tuple[str, float | None, int]] = []
        self.refuse = refuse

    async def write(self, point: str, value: float | None, priority: int) -> None:
        if self.refuse:
            raise WriteRefused(self.refuse)
        self.writes.append((point, value, priority))


def executor(**kw: Any) -> tuple[CommandExecutor, FakeConsumer, FakeOutbox]:
    topo = topology()
    ex = CommandExecutor(topo, WritePolicy(topo), "bms", **kw)
    consumer, outbox = FakeConsumer(), FakeOutbox()
    ex._consumer = consumer  # type: ignore[assignment]
    ex._producer = outbox  # type: ignore[assignment]
    ex._assigned = {0}
    return ex, consumer, outbox


def handle(ex: CommandExecutor, dev: Device, *msgs: Msg) -> None:
    async def go() -> None:
        for m in msgs:
            await ex._handle(m, dev.write)

    asyncio.run(go())


def test_a_claimed_command_runs_once_and_a_redelivery_gets_the_earlier_result() -> None:
    ex, consumer, outbox = executor()
    dev = Device()
    cmd = make_command("hq/ahu1/sp", 15.0, 8, "op")
    handle(ex, dev, Msg(cmd, 4), Msg(cmd, 9), Msg(dict(cmd, value=17.0), 10))
    assert dev.writes == [("hq/ahu1/sp", 15.0, 8)]
    assert consumer.commits == [(0, 5), (0, 10), (0, 11)]
    assert [r["status"] for r in outbox.results] == ["accepted"] * 3
    assert outbox.results[1] == outbox.results[0] == outbox.results[2], "the earlier result, unchanged"
    assert ex.stats.accepted == 1 and ex.stats.duplicates == 2


def test_a_member_whose_partition_moved_does_not_write() -> None:
    ex, consumer, outbox = executor()
    dev = Device()
    consumer.fenced = True  # replaced in the group while it held the fetched command
    handle(ex, dev, Msg(make_command("hq/ahu1/sp", 15.0, 8, "op"), 3))
    assert dev.writes == [] and outbox.results == [], "the new owner runs and answers it"
    assert ex.stats.fenced == 1 and ex.stats.accepted == 0


def test_a_revoked_partition_is_not_claimed() -> None:
    ex, consumer, outbox = executor()
    dev = Device()
    ex._on_revoke(None, [TopicPartition("commands.bacnet", 0)])
    handle(ex, dev, Msg(make_command("hq/ahu1/sp", 15.0, 8, "op"), 3))
    assert dev.writes == [] and outbox.results == [] and consumer.commits == []
    assert ex.stats.fenced == 1


def test_a_claim_that_took_too_long_is_not_sent() -> None:
    ex, consumer, outbox = executor(claim_window=0.05)
    dev = Device()
    consumer.on_commit = lambda: time.sleep(0.2)  # a pause between issuing the claim and the write
    handle(ex, dev, Msg(make_command("hq/ahu1/sp", 15.0, 8, "op"), 3))
    assert dev.writes == []
    assert len(outbox.results) == 1 and outbox.results[0]["status"] == "failed"
    assert "not sent" in outbox.results[0]["error"] and ex.stats.late == 1


def test_a_rejected_command_is_claimed_before_it_is_answered() -> None:
    ex, consumer, outbox = executor()
    consumer.fenced = True
    handle(ex, Device(), Msg(make_command("hq/ahu1/sp", 99.0, 8, "op"), 3))
    assert outbox.results == [], "a fenced member answers nothing; the owner rejects it once"
    consumer.fenced = False
    handle(ex, Device(), Msg(make_command("hq/ahu1/sp", 99.0, 8, "op"), 3))
    assert [r["status"] for r in outbox.results] == ["rejected"]


def test_a_write_to_a_device_in_doubt_is_refused() -> None:
    ex, _consumer, outbox = executor()
    dev = Device(refuse="not sent: the address of device 1001 is in doubt")
    handle(ex, dev, Msg(make_command("hq/ahu1/sp", 15.0, 8, "op"), 3))
    assert outbox.results[0]["status"] == "rejected" and "in doubt" in outbox.results[0]["error"]


def test_commands_of_another_network_are_left_to_its_executor() -> None:
    other = source("b2", local_address="10.1.0.5/16:47808")
    other["devices"][0]["name"] = "ahu2"
    topo = topology(source(), other)
    policy = WritePolicy(topo)
    assert policy.network_of("hq/ahu2/sp") == "10.1.0.0/16:47808"
    ex = CommandExecutor(topo, policy, "bms")
    consumer, outbox = FakeConsumer(), FakeOutbox()
    ex._consumer, ex._producer, ex._assigned = consumer, outbox, {0}  # type: ignore[assignment]
    dev = Device()
    handle(ex, dev, Msg(make_command("hq/ahu2/sp", 15.0, 8, "op"), 0))
    assert dev.writes == [] and outbox.results == [] and ex.stats.ignored == 1
    assert (
        ex.group == commands_group(topo, "192.168.1.0/24:47808") != CommandExecutor(topo, policy, "b2").group
    )


def test_the_network_defaults_to_the_ip_network_and_port() -> None:
    topo = topology(source(), source("b2", local_address="192.168.1.11/24:47808", devices=[], discovery={}))
    policy = WritePolicy(topo)
    assert policy.networks == {"bms": "192.168.1.0/24:47808", "b2": "192.168.1.0/24:47808"}
    assert policy.executors == {"192.168.1.0/24:47808": "bms"}, "the source with writable points"
    assert WritePolicy(topology(source(network="plant-a"))).networks == {"bms": "plant-a"}


def test_one_source_per_network_may_have_writable_points() -> None:
    second = source("b2", local_address="192.168.1.11/24:47809", network="192.168.1.0/24:47808")
    second["devices"][0]["name"] = "ahu2"
    with pytest.raises(TopologyError) as e:
        topology(source(), second)
    assert "sources bms, b2 are on the same BACnet network 192.168.1.0/24:47808" in str(e.value)
    with pytest.raises(TopologyError) as e:
        topology(source(local_address="host"))
    assert "needs a 'network'" in str(e.value)

"""The CLI side of BACnet writes: put a WriteCommand on ``commands.bacnet`` and wait for its result."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from pipeline.core import codec
from pipeline.core.commands import CommandResult, WriteCommand
from pipeline.core.kafka import Outbox, client_config
from pipeline.core.topology import TopologyBase


def send_command(topo: TopologyBase, cmd: WriteCommand, wait: float | None = 30.0) -> CommandResult | None:
    """Put ``cmd`` on commands.bacnet; with ``wait``, return its result (None if none came in time)."""
    # The commands principal: the only one the ACLs let write commands.bacnet.
    bootstrap = client_config(topo.broker, "commands")
    watcher = None
    if wait:
        watcher = Consumer(
            {
                **bootstrap,
                "group.id": f"plantstream-cli-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
            }
        )
        meta = watcher.list_topics(topo.results_topic, timeout=10).topics.get(topo.results_topic)
        if meta is None or meta.error is not None:
            watcher.close()
            raise KafkaException(
                KafkaError(
                    KafkaError.UNKNOWN_TOPIC_OR_PART,
                    f"{topo.results_topic} does not exist: run `plantstream deploy` first",
                )
            )
        starts = []
        for p in meta.partitions:
            _lo, hi = watcher.get_watermark_offsets(TopicPartition(topo.results_topic, p), timeout=10)
            starts.append(TopicPartition(topo.results_topic, p, hi))
        watcher.assign(starts)
    # Commands keyed by point, on the partitions they always used (librdkafka's default partitioner).
    producer = Outbox(bootstrap, "plantstream-cli", {"partitioner": "consistent_random", "linger.ms": 0})
    producer.produce(topo.commands_topic, cmd["point"].encode(), codec.dumps(cmd), cmd["ts"])
    if producer.flush_quietly(15) != 0:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "the command was not delivered to Kafka"))
    if watcher is None:
        return None
    try:
        end = time.monotonic() + (wait or 0)
        while time.monotonic() < end:
            for m in watcher.consume(100, 0.5):
                if m.error() is None:
                    r = codec.loads(m.value())
                    if isinstance(r, dict) and r.get("id") == cmd["id"]:
                        return r  # type: ignore[return-value]
        return None
    finally:
        watcher.close()


def send_alert_command(
    topo: TopologyBase,
    instance: str,
    action: str,
    by: str,
    comment: str | None = None,
    duration_ms: int | None = None,
) -> dict[str, object]:
    """Put an AlertCommand on alerts.commands (the worker applies it once, by its id); returns it."""
    from pipeline.core.records import now_ms

    cmd: dict[str, object] = {"id": uuid.uuid4().hex, "instance": instance, "action": action, "by": by}
    cmd["at"] = now_ms()
    if comment:
        cmd["comment"] = comment
    if duration_ms is not None:
        cmd["duration_ms"] = duration_ms
    producer = Outbox(client_config(topo.broker), "plantstream-cli", {"linger.ms": 0})
    producer.produce(topo.alerts_commands_topic, instance.encode(), codec.dumps(cmd), int(cmd["at"]))  # type: ignore[call-overload]
    if producer.flush_quietly(15) != 0:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "the command was not delivered to Kafka"))
    return cmd


def alert_states(topo: TopologyBase, timeout: float = 10.0) -> dict[str, dict[str, object]]:
    """The current state of every alarm instance: the newest record per key of the compacted alerts.state."""
    from pipeline.core.kafka import read_all

    c = Consumer({**client_config(topo.broker), "group.id": f"plantstream-cli-{uuid.uuid4().hex}"})
    try:
        meta = c.list_topics(topo.alerts_state_topic, timeout=timeout).topics.get(topo.alerts_state_topic)
        if meta is None or meta.error is not None:
            raise KafkaException(
                KafkaError(
                    KafkaError.UNKNOWN_TOPIC_OR_PART,
                    f"{topo.alerts_state_topic} does not exist: deploy a topology with alert rules first",
                )
            )
        partitions = len(meta.partitions)
    finally:
        c.close()
    out: dict[str, dict[str, object]] = {}
    for p in range(partitions):
        for m in read_all(client_config(topo.broker), topo.alerts_state_topic, p):
            if m.key is None:
                continue
            if m.value is None:
                out.pop(m.key.decode(), None)
            else:
                out[m.key.decode()] = codec.loads(m.value)
    return out

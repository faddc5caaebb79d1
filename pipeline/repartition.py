"""Growing ``telemetry.raw`` (and ``loops.samples``) without losing order or state: ``plantstream deploy``.

A device's readings must stay in one partition, in order, and its window state lives with that partition.
More partitions move most keys (the producers hash ``site/device`` or the loop id over the new count), so
deploy grows those topics only when it is safe and then moves the state after the keys:

1. **Stopped and drained.** The worker's aggregation and loop consumer groups have no members and have
   committed everything in the topics, and the topics take no new messages (the connectors are stopped).
   Otherwise a device's backlog in its old partition could be processed after its new messages elsewhere,
   and its own clock would call that backlog late. Deploy refuses and says what to do.
2. **State follows the keys.** In the compacted topics whose records are placed by key, each key whose
   partition changes is copied to its new partition and tombstoned in the old one: the aggregation state
   (device chunks and heads), the loop state (reset to apply the new partition's offsets from the start),
   and ``telemetry.latest``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from pipeline.core import codec
from pipeline.core.kafka import (
    Connection,
    Outbox,
    client_config,
    ensure_compacted_topic,
    partition_for,
    read_all,
)
from pipeline.stages.alerts.routing import command_key
from pipeline.stages.windows import DEV_PREFIX, WM_PREFIX
from pipeline.topology import Topology

Say = Callable[[str], None]


class RepartitionRefused(RuntimeError):
    pass


def _groups(topo: Topology, app_id: str) -> dict[str, str]:
    """Input topic -> the consumer group whose state depends on its partitioning."""
    out = {topo.raw_topic: f"{app_id}-aggregate"}
    if topo.loops:
        out[topo.loop_samples_topic] = f"{app_id}-loops"
    if topo.alerts.rules:
        out[topo.alert_samples_topic] = f"{app_id}-alerts"
    return out


def _ends(consumer: Consumer, topic: str, partitions: int) -> dict[int, int]:
    return {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)
    }


def check_drained(topo: Topology, app_id: str, have: dict[str, int], quiet_s: float = 3.0) -> None:
    """Raise :class:`RepartitionRefused` unless growing the topics in ``have`` (name: partitions) is safe."""
    admin = AdminClient(client_config(topo.broker, "admin"))
    groups = _groups(topo, app_id)
    fix = "stop the connectors, let the worker catch up (no lag), stop it, run deploy, then start them again"
    for group in groups.values():
        desc = admin.describe_consumer_groups([group])[group].result(15)
        if desc.members:
            raise RepartitionRefused(
                f"consumer group {group} has {len(desc.members)} running member(s); to add partitions, {fix}"
            )
    consumer = Consumer({**client_config(topo.broker, "admin"), "group.id": f"{app_id}-deploy-check"})
    try:
        ends = {t: _ends(consumer, t, have[t]) for t in have}
        for topic, group in groups.items():
            if topic not in have:
                continue
            tps = [TopicPartition(topic, p) for p in range(have[topic])]
            request = ConsumerGroupTopicPartitions(group, tps)
            committed = admin.list_consumer_group_offsets([request])[group].result(15)
            for tp in committed.topic_partitions:
                end = ends[topic][tp.partition]
                if end > 0 and tp.offset < end:
                    raise RepartitionRefused(
                        f"{topic}[{tp.partition}]: the worker ({group}) has not processed offsets "
                        f"{max(tp.offset, 0)}..{end - 1}; to add partitions, {fix}"
                    )
        time.sleep(quiet_s)
        for topic in have:
            if _ends(consumer, topic, have[topic]) != ends[topic]:
                raise RepartitionRefused(f"{topic} is still receiving messages; to add partitions, {fix}")
    finally:
        consumer.close()


def rekey(
    bootstrap: Connection,
    topic: str,
    partitions: int,
    target: Callable[[bytes], int],
    rewrite: Callable[[bytes, dict[str, Any], int], dict[str, Any]] | None = None,
    skip: Callable[[bytes], bool] = lambda key: False,
) -> int:
    """Copy every live key of a compacted topic whose ``target`` partition changed there, then tombstone it
    where it was; ``rewrite(key, record, new_partition)`` adapts a JSON record on the way.

    Returns the number of keys moved.
    """
    out = Outbox(bootstrap, "plantstream-deploy")
    moved = 0
    for p in range(partitions):
        last: dict[bytes, bytes | None] = {}
        for m in read_all(bootstrap, topic, p):
            if m.key is not None:
                last[m.key] = m.value
        for key, value in last.items():
            if value is None or skip(key):
                continue
            q = target(key)
            if q == p:
                continue
            if rewrite is not None:
                value = codec.dumps(rewrite(key, codec.loads(value), q))
            out.produce(topic, key, value, None, q)
            moved += 1
        out.flush_sync()  # the copies are in before the originals go
        for key, value in last.items():
            if value is not None and not skip(key) and target(key) != p:
                out.produce(topic, key, None, None, p)
        out.flush_sync()
    return moved


def migrate(topo: Topology, app_id: str, have: dict[str, int], say: Say) -> None:
    """After the topics grew: move the keyed state to the partitions its keys now land in."""
    b = topo.broker
    n = b.partitions
    if topo.raw_topic in have:
        state = f"{app_id}-aggregate-state"
        ensure_compacted_topic(client_config(b, "admin"), state, n, b.replication)

        def device_of(key: bytes) -> bytes:
            k = key.decode()
            return (k[len(DEV_PREFIX) :] if k.startswith(DEV_PREFIX) else k.rsplit("#", 1)[0]).encode()

        def head(key: bytes, rec: dict[str, Any], q: int) -> dict[str, Any]:
            return {**rec, "p": q} if key.startswith(DEV_PREFIX.encode()) else rec

        moved = rekey(
            client_config(b, "admin"),
            state,
            have[topo.raw_topic],
            lambda key: partition_for(device_of(key), n, "consistent_random"),
            head,
            skip=lambda key: key.startswith(WM_PREFIX.encode()),
        )
        say(f"aggregation state: {moved} record(s) moved with their devices")
    if topo.loops and topo.loop_samples_topic in have:
        state = f"{app_id}-loop-state"
        ensure_compacted_topic(client_config(b, "admin"), state, n, b.replication)

        def reset(key: bytes, rec: dict[str, Any], q: int) -> dict[str, Any]:
            # Offsets of the old partition mean nothing in the new one: start from its beginning.
            if "\x00" not in key.decode():
                return {**rec, "p": q, "o": -1}
            return {**rec, "o": -1} if "o" in rec else rec

        moved = rekey(
            client_config(b, "admin"),
            state,
            have[topo.loop_samples_topic],
            lambda key: partition_for(key.decode().split("\x00", 1)[0].encode(), n, "murmur2_random"),
            reset,
        )
        say(f"loop state: {moved} record(s) moved with their loops")
    if topo.alerts.rules and topo.alert_samples_topic in have:
        state = f"{app_id}-alerts-state"
        ensure_compacted_topic(client_config(b, "admin"), state, n, b.replication)

        def alert_key(key: bytes) -> bytes:
            k = key.decode()
            if k.startswith("i/"):
                return command_key(k[2:])
            return "/".join(k[2:].split("/")[:2]).encode()  # v/site/device/point: the device

        moved = rekey(
            client_config(b, "admin"),
            state,
            have[topo.alert_samples_topic],
            lambda key: partition_for(alert_key(key), n, "murmur2_random"),
            lambda key, rec, q: {**rec, "_p": q} if key.startswith(b"i/") else rec,
        )
        say(f"alert state: {moved} record(s) moved with their devices and loops")
    if topo.latest_topic in have:
        moved = rekey(
            client_config(b, "admin"),
            topo.latest_topic,
            have[topo.latest_topic],
            lambda key: partition_for(key, n, "murmur2_random"),
        )
        say(f"{topo.latest_topic}: {moved} series moved to their new partitions")

"""Reading a partition directly, outside any consumer group: a range of offsets, or all of it.

The aggregation stage loads a partition's checkpoint from its compacted state topic with :func:`read_all`
when it is assigned the partition (pipeline/aggregation.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import Consumer, TopicPartition


@dataclass(frozen=True)
class RawMessage:
    """The parts of a Kafka message the agents read (a Faust message has the same attributes)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def read_range(
    bootstrap: str, topic: str, partition: int, first: int, last: int, timeout: float = 30.0
) -> list[RawMessage]:
    """Messages ``first..last`` of one partition, read directly (no consumer group, nothing committed)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "plantstream-range-reader",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    out: list[RawMessage] = []
    try:
        consumer.assign([TopicPartition(topic, partition, first)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (not out or out[-1].offset < last):
            for m in consumer.consume(500, 0.5):
                if m.error() is None and first <= m.offset() <= last:
                    out.append(RawMessage(topic, partition, m.offset(), m.key(), m.value()))
    finally:
        consumer.close()
    return out


def read_all(bootstrap: str, topic: str, partition: int, timeout: float = 60.0) -> list[RawMessage]:
    """Every message of one partition, from the oldest kept to the newest (e.g. a compacted state topic)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "plantstream-range-reader"})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
    finally:
        consumer.close()
    if high <= low:
        return []
    return read_range(bootstrap, topic, partition, low, high - 1, timeout)

"""Input the consumer skipped, found and read back.

Our input topics (``telemetry.raw``, ``telemetry.agg.1m``) are neither compacted nor transactional, so
their offsets are contiguous: a jump between two messages an agent receives from one partition means the
consumer skipped input. faust-streaming 0.15 does this when a worker starts on a backlog (it resumes its
partitions before seeking them to the committed offsets) and counts the skipped offsets as acknowledged,
so they would be lost for good. :class:`GapFiller` notices the jump and reads the skipped messages
directly, so the agent can handle them, in order, before the message that revealed the jump.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition

log = logging.getLogger("plantstream.worker")


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


class GapFiller:
    def __init__(self, bootstrap: str, agent: str) -> None:
        self.bootstrap = bootstrap
        self.agent = agent
        self.last: dict[tuple[str, int], int] = {}
        self.skipped = 0
        self.recovered = 0

    def reset(self) -> None:
        """After a rebalance: the next message of each partition starts a new run."""
        self.last.clear()

    async def fill(self, msg: Any) -> list[Any]:
        """The messages to handle, in order, for ``msg``: the skipped ones read back, then ``msg`` itself."""
        key = (msg.topic, msg.partition)
        prev = self.last.get(key)
        self.last[key] = max(msg.offset, prev if prev is not None else -1)
        if prev is None or msg.offset <= prev + 1:
            return [msg]
        first, last = prev + 1, msg.offset - 1
        log.error(
            "%s: %s[%d] offsets %d..%d were never delivered by the consumer; reading them directly",
            self.agent,
            msg.topic,
            msg.partition,
            first,
            last,
        )
        missing = await asyncio.to_thread(read_range, self.bootstrap, msg.topic, msg.partition, first, last)
        self.skipped += last - first + 1
        self.recovered += len(missing)
        if len(missing) < last - first + 1:
            log.error(
                "%s: only %d of %d skipped messages could be read", self.agent, len(missing), last - first + 1
            )
        return [*missing, msg]

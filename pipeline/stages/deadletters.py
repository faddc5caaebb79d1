"""Dead letters sent once, across a worker crash.

A stage commits its input offsets only at a checkpoint. A worker killed between two checkpoints has
dead-lettered some of the input after the last one; the next owner reads that input again and would send
the same dead letters a second time. So each commit carries, in its offset metadata, a *mark*: the end
offsets of the dead-letter topic's partitions at the checkpoint. Every dead letter the stage sent after
the checkpoint lies past the mark. The next owner of the partition reads the dead-letter topic from the
mark to its end once, at the assignment, and keeps a :class:`Ledger` of what was already sent for input
past the committed offset; sending a dead letter that the ledger holds is skipped (and the entry spent).

Processing is deterministic from the committed state, so the input read again yields the same dead
letters, keyed here by their origin (input partition, offset) and payload. A dead letter the crashed
worker had produced but the broker never took is not in the topic and is sent again: exactly once.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from pipeline.core import codec
from pipeline.core.kafka import Connection, connection_conf

log = logging.getLogger("plantstream.worker")

# A mark is taken again after this long even if the stage sent nothing: the read at the next assignment
# then starts near the end of the dead-letter topic, not far back in other stages' dead letters.
MARK_MAX_AGE_S = 60.0
SCAN_TIMEOUT_S = 60.0
RETRY_S = 60.0
T = TypeVar("T")

Key = tuple[int, int, str]  # (input partition, offset, payload)


def encode_mark(mark: dict[int, int]) -> str:
    return json.dumps({"dlq": {str(p): o for p, o in sorted(mark.items())}}, separators=(",", ":"))


def decode_mark(metadata: str | None) -> dict[int, int] | None:
    """The mark in a commit's metadata; None when the commit has none (or one this code cannot read)."""
    if not metadata:
        return None
    try:
        raw = json.loads(metadata)["dlq"]
        return {int(p): int(o) for p, o in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class Ledger:
    """Dead letters already in the topic for input past the committed offsets (a multiset per key)."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.sent: Counter[Key] = Counter()
        self.skipped = 0

    def add(self, dl: Mapping[str, Any], committed: dict[int, int]) -> None:
        p, o = dl.get("partition"), dl.get("offset")
        if dl.get("topic") != self.topic or not isinstance(p, int) or not isinstance(o, int):
            return
        start = committed.get(p)
        if start is not None and o >= start:
            self.sent[(p, o, str(dl.get("payload")))] += 1

    def take(self, dl: Mapping[str, Any]) -> bool:
        """Whether this dead letter is already in the topic (then it is not sent again)."""
        if not self.sent or dl.get("topic") != self.topic:
            return False
        p, o = dl.get("partition"), dl.get("offset")
        if not isinstance(p, int) or not isinstance(o, int):
            return False
        key = (p, o, str(dl.get("payload")))
        n = self.sent.get(key, 0)
        if not n:
            return False
        if n == 1:
            del self.sent[key]
        else:
            self.sent[key] = n - 1
        self.skipped += 1
        return True

    def forget(self, partitions: list[int]) -> None:
        gone = set(partitions)
        for key in [k for k in self.sent if k[0] in gone]:
            del self.sent[key]


class Marks:
    """The dead-letter topic's end offsets, taken at checkpoints by one stage."""

    def __init__(self, consumer: Consumer, dlq_topic: str) -> None:
        self.consumer, self.dlq_topic = consumer, dlq_topic
        self.current: str | None = None
        self._taken_at = 0.0
        self._sent_then = -1

    def partitions(self) -> list[int]:
        md = self.consumer.list_topics(self.dlq_topic, timeout=10)
        t = md.topics.get(self.dlq_topic)
        if t is None or (t.error is not None and t.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
            # Not created yet: an empty mark, and any dead letter sent later is read from the start.
            return []
        if t.error is not None:
            raise KafkaException(t.error)
        return sorted(t.partitions)

    def ends(self) -> dict[int, int]:
        """The end offset of every partition of the dead-letter topic, asked of the broker now."""
        out = {}
        for p in self.partitions():
            _low, high = self.consumer.get_watermark_offsets(
                TopicPartition(self.dlq_topic, p), timeout=10, cached=False
            )
            out[p] = high
        return out

    def take(self, sent: int) -> str:
        """The mark for a commit now; ``sent`` is how many dead letters the stage has sent so far."""
        now = time.monotonic()
        if self.current is None or sent != self._sent_then or now - self._taken_at >= MARK_MAX_AGE_S:
            # Asked only after this stage's dead letters were delivered (the checkpoint's flush), so each
            # one it sends after this commit lands past the mark.
            try:
                ends = self.ends() if self.current is not None else patiently(self.ends)
            except KafkaException as exc:
                if self.current is None:
                    raise
                # The broker busy with leadership (just back from an outage): an earlier mark is still a
                # right place to start reading from, only a little further back. Asked again next time.
                log.info(
                    "the dead-letter topic's end offsets are not available (%s); the last mark stands", exc
                )
                return self.current
            self.current = encode_mark(ends)
            self._taken_at, self._sent_then = now, sent
        return self.current


def patiently(fn: Callable[[], T], timeout: float = RETRY_S) -> T:
    """``fn()``, tried again while the broker answers with a passing error (a partition between leaders
    after an outage), for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if (err is not None and err.fatal()) or time.monotonic() >= deadline:
                raise
            log.debug("the dead-letter topic: %s; trying again", exc)
            time.sleep(0.5)


def read_sent(
    bootstrap: Connection,
    group: str,
    dlq_topic: str,
    starts: dict[int, int],
    ledger: Ledger,
    committed: dict[int, int],
) -> int:
    """Add to ``ledger`` the dead letters in ``dlq_topic`` from ``starts`` to the current ends, for input
    past ``committed``. Returns how many records were read."""
    reader = Consumer(
        {
            **connection_conf(bootstrap),
            "group.id": f"{group}-dlq-read",  # never subscribes nor commits: assign() only
            "client.id": f"{group}-dlq-read",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",  # a mark older than the retention: from the oldest kept
        }
    )
    try:
        ends: dict[int, int] = {}
        for p, start in starts.items():
            low, high = reader.get_watermark_offsets(TopicPartition(dlq_topic, p), timeout=10, cached=False)
            if high > max(start, low):
                ends[p] = high
        if not ends:
            return 0
        reader.assign(
            [TopicPartition(dlq_topic, p, starts[p] if starts[p] >= 0 else OFFSET_BEGINNING) for p in ends]
        )
        read, deadline = 0, time.monotonic() + SCAN_TIMEOUT_S
        while ends:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {dlq_topic} to its end took over {SCAN_TIMEOUT_S:.0f} s")
            for m in reader.consume(1000, 0.5):
                err = m.error()
                if err is not None:
                    if err.fatal():
                        raise KafkaException(err)
                    continue
                read += 1
                try:
                    dl = codec.loads(m.value())
                except codec.JSONDecodeError:
                    continue
                if isinstance(dl, dict):
                    ledger.add(dl, committed)
                p = m.partition()
                if p in ends and m.offset() + 1 >= ends[p]:
                    del ends[p]
        return read
    finally:
        reader.close()

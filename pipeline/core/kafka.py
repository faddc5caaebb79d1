"""The project's one Kafka producer wrapper, direct partition reads and the compacted state topics.

:class:`Outbox` hands records to librdkafka (confluent-kafka) in a microsecond or two; its C threads batch,
compress and send them. Stages and connectors confirm delivery with :meth:`Outbox.flush_sync` (or a
per-record ``on_delivery`` callback) before they acknowledge their own input, so nothing they produced can
be lost to a crash without the input being read again. Every dead letter goes out through
:meth:`Outbox.dead_letter`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from pipeline.core import codec
from pipeline.core.records import DeadLetter, dead_letter

if TYPE_CHECKING:
    from pipeline.core.topology import Broker, KafkaRole

log = logging.getLogger("plantstream.kafka")

#: Where a client connects: bootstrap servers alone (PLAINTEXT), or librdkafka settings from
#: :func:`client_config` (bootstrap servers plus TLS and SASL).
Connection: TypeAlias = str | Mapping[str, Any]

_SECRET_KEYS = frozenset({"sasl.password", "ssl.key.password"})


class ClientConf(dict[str, Any]):
    """librdkafka settings that never show their secrets when printed or logged."""

    def __repr__(self) -> str:
        return repr({k: "***" if k in _SECRET_KEYS else v for k, v in self.items()})

    __str__ = __repr__


def client_config(broker: Broker, role: KafkaRole = "pipeline") -> ClientConf:
    """The librdkafka settings of ``broker`` (bootstrap servers, TLS, SASL) for ``role``'s principal.

    Every client of the project is built on these; a role without credentials of its own uses the
    pipeline's.
    """
    sec = broker.security
    conf = ClientConf({"bootstrap.servers": broker.bootstrap, "security.protocol": sec.protocol})
    creds = sec.credentials(role)
    if creds is not None:
        conf["sasl.mechanism"] = sec.sasl_mechanism
        conf["sasl.username"], conf["sasl.password"] = creds
    if sec.tls:
        if sec.ca_file:
            conf["ssl.ca.location"] = sec.ca_file
        if sec.cert_file and sec.key_file:
            conf["ssl.certificate.location"] = sec.cert_file
            conf["ssl.key.location"] = sec.key_file
        if sec.key_password is not None:
            conf["ssl.key.password"] = sec.key_password.get_secret_value()
        conf["ssl.endpoint.identification.algorithm"] = "https" if sec.ssl_check_hostname else "none"
    return conf


def connection_conf(conn: Connection) -> ClientConf:
    """A fresh settings dict to build a client on: ``conn`` itself, or ``bootstrap.servers`` for a string."""
    return ClientConf({"bootstrap.servers": conn} if isinstance(conn, str) else conn)


Delivered = Callable[[KafkaError | None, Message], None]


class DeliveryFailed(RuntimeError):
    pass


class Outbox:
    """An idempotent producer; ``flush_sync`` raises if anything produced since the last one failed."""

    def __init__(self, bootstrap: Connection, client_id: str, extra: dict[str, Any] | None = None) -> None:
        conf: dict[str, Any] = {
            **connection_conf(bootstrap),
            "client.id": client_id,
            "enable.idempotence": True,  # acks=all, in order per partition, no duplicates on retry
            "linger.ms": 5,
            "compression.type": "lz4",
            "batch.size": 1_048_576,
            "queue.buffering.max.messages": 1_000_000,
            "message.max.bytes": 8_000_000,
            # The Java clients' partitioner, so keys land where other Kafka clients put them.
            "partitioner": "murmur2_random",
        }
        conf.update(extra or {})
        # The producer-wide delivery callback: a record produced without its own callback reports here
        # (and, with delivery.report.only.error, only when it failed).
        conf["on_delivery"] = self._on_delivery
        self._p = Producer(conf)
        self._error: KafkaError | None = None
        self.produced = 0
        self.dead_letters = 0
        # Whether a dead letter is already in the topic (sent before a crash): then it is not sent again.
        self.already_sent: Callable[[DeadLetter], bool] | None = None

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None and self._error is None:
            self._error = err

    def produce(
        self,
        topic: str,
        key: bytes,
        value: bytes | None,  # None: a tombstone on a compacted topic
        ts_ms: int | None = None,
        partition: int | None = None,
        on_delivery: Delivered | None = None,
    ) -> None:
        kw: dict[str, Any] = {}
        if on_delivery is not None:
            kw["on_delivery"] = on_delivery
        if ts_ms is not None:
            kw["timestamp"] = ts_ms
        if partition is not None:
            kw["partition"] = partition
        while True:
            try:
                self._p.produce(topic, value, key, **kw)
                break
            except BufferError:
                # librdkafka's queue is full: serve delivery reports until there is room (backpressure).
                self._p.poll(0.05)
        self.produced += 1
        if not self.produced % 10_000:
            self._p.poll(0)  # serve delivery reports now and then between flushes

    def dead_letter(
        self,
        dlq_topic: str,
        source: str,
        reason: str,
        payload: Any,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
        on_delivery: Delivered | None = None,
    ) -> bool:
        """A DeadLetter record (schemas/dead-letter.json) for ``payload``, keyed by its source id; False
        when it was sent already (see ``already_sent``)."""
        dl = dead_letter(source, reason, payload, topic=topic, partition=partition, offset=offset)
        if self.already_sent is not None and self.already_sent(dl):
            return False
        self.produce(dlq_topic, (source or "unknown").encode(), codec.dumps(dl), on_delivery=on_delivery)
        self.dead_letters += 1
        return True

    def poll(self, timeout: float = 0.0) -> int:
        return int(self._p.poll(timeout))

    async def flush(self, timeout: float = 60.0) -> None:
        """:meth:`flush_sync` from asyncio, in a worker thread so the event loop keeps running."""
        self._check(await asyncio.to_thread(self._p.flush, timeout), timeout)

    def flush_sync(self, timeout: float = 60.0) -> None:
        """Until everything produced so far is acknowledged by the broker; raises if anything failed."""
        self._check(self._p.flush(timeout), timeout)

    def flush_some(self, timeout: float) -> int:
        """Flush for up to ``timeout`` s; what is still queued. Raises if the broker refused a record."""
        left = int(self._p.flush(timeout))
        if self._error is not None:
            raise DeliveryFailed(f"Kafka refused a record: {self._error}")
        return left

    def flush_quietly(self, timeout: float = 30.0) -> int:
        """Flush without raising; returns what is still queued (for shutdown paths)."""
        return int(self._p.flush(timeout))

    def _check(self, left: int, timeout: float) -> None:
        if self._error is not None:
            raise DeliveryFailed(f"Kafka refused a record: {self._error}")
        if left:
            raise DeliveryFailed(f"{left} record(s) not delivered within {timeout:.0f} s")


# -- where a key lands ------------------------------------------------------------------------------------


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java clients' default partitioner; librdkafka's ``murmur2_random``)."""
    length, m = len(data), 0x5BD1E995
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    n4 = length // 4
    for i in range(n4):
        k = (int.from_bytes(data[i * 4 : i * 4 + 4], "little") * m) & 0xFFFFFFFF
        k ^= k >> 24
        h = ((h * m) & 0xFFFFFFFF) ^ ((k * m) & 0xFFFFFFFF)
    tail, rest = data[n4 * 4 :], length & 3
    if rest == 3:
        h ^= tail[2] << 16
    if rest >= 2:
        h ^= tail[1] << 8
    if rest >= 1:
        h = ((h ^ tail[0]) * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


def partition_for(key: bytes, partitions: int, partitioner: str) -> int:
    """The partition a producer with ``partitioner`` puts ``key`` in: ``consistent_random`` (librdkafka's
    default, used by the connectors: CRC-32) or ``murmur2_random`` (:class:`Outbox`)."""
    if partitioner == "consistent_random":
        return zlib.crc32(key) % partitions
    if partitioner == "murmur2_random":
        return (murmur2(key) & 0x7FFFFFFF) % partitions
    raise ValueError(f"unknown partitioner {partitioner!r}")


# -- reading a partition directly, outside any consumer group --------------------------------------------


@dataclass(frozen=True)
class RawMessage:
    """The parts of a Kafka message the stages read."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def read_range(
    bootstrap: Connection, topic: str, partition: int, first: int, last: int, timeout: float = 30.0
) -> list[RawMessage]:
    """Messages ``first..last`` of one partition, read directly (no consumer group, nothing committed)."""
    consumer = Consumer(
        {
            **connection_conf(bootstrap),
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


class IncompleteRead(RuntimeError):
    pass


def read_all(bootstrap: Connection, topic: str, partition: int, timeout: float = 60.0) -> list[RawMessage]:
    """Every message of one partition, from the oldest kept to the newest (e.g. a compacted state topic)."""
    consumer = Consumer({**connection_conf(bootstrap), "group.id": "plantstream-range-reader"})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=max(timeout, 10))
    finally:
        consumer.close()
    if high <= low:
        return []
    out = read_range(bootstrap, topic, partition, low, high - 1, timeout)
    # The newest record of a partition is never compacted away: a read that did not reach it is partial,
    # and state loaded from it would silently miss whatever came later.
    if not out or out[-1].offset < high - 1:
        got = out[-1].offset if out else None
        raise IncompleteRead(
            f"{topic}[{partition}]: read offsets {low}..{got} of {low}..{high - 1} within {timeout:.0f} s; "
            "refusing to start from part of the state (broker overloaded? a restart tries again)"
        )
    return out


def ensure_compacted_topic(bootstrap: Connection, name: str, partitions: int, replication: int) -> None:
    """A compacted state topic with at least ``partitions`` partitions (one per input partition)."""
    admin = AdminClient(connection_conf(bootstrap))
    meta = admin.list_topics(timeout=30).topics
    if name in meta:
        if len(meta[name].partitions) < partitions:
            admin.create_partitions([NewPartitions(name, partitions)])[name].result(30)
        return
    spec = NewTopic(
        name,
        num_partitions=partitions,
        replication_factor=replication,
        config={"cleanup.policy": "compact", "segment.bytes": str(64 * 2**20), "min.compaction.lag.ms": "0"},
    )
    for fut in admin.create_topics([spec], operation_timeout=30).values():
        try:
            fut.result(30)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise

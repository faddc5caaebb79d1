"""The aggregation agent's Kafka producer: librdkafka (confluent-kafka) driven from asyncio.

A send through Faust's producer costs tens of microseconds of Python (aiokafka batches and compresses in
the event loop); ``produce`` here hands the record to librdkafka's C threads in one or two. The agent sends
tens of thousands of records a second (aggregates, telemetry.latest, checkpoints), so that is where most of
its producer time went. Delivery is confirmed with :meth:`Outbox.flush`, in a worker thread so the event
loop keeps running; the agent acknowledges its input only after a flush, so nothing it produced can be
lost to a crash without the input being read again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

log = logging.getLogger("plantstream.worker")


class DeliveryFailed(RuntimeError):
    pass


class Outbox:
    def __init__(self, bootstrap: str, client_id: str) -> None:
        self._p = Producer(
            {
                "bootstrap.servers": bootstrap,
                "client.id": client_id,
                "enable.idempotence": True,  # acks=all, in order per partition, no duplicates on retry
                "linger.ms": 5,
                "compression.type": "lz4",
                "batch.size": 1_048_576,
                "queue.buffering.max.messages": 1_000_000,
                "message.max.bytes": 8_000_000,
                # The Java clients' partitioner, so keys land where Faust and other Kafka clients put them.
                "partitioner": "murmur2_random",
            }
        )
        self._error: KafkaError | None = None
        self.produced = 0

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None and self._error is None:
            self._error = err

    def produce(
        self, topic: str, key: bytes, value: bytes, ts_ms: int | None = None, partition: int | None = None
    ) -> None:
        kw: dict[str, Any] = {"on_delivery": self._on_delivery}
        if ts_ms is not None:
            kw["timestamp"] = ts_ms
        if partition is not None:
            kw["partition"] = partition
        while True:
            try:
                self._p.produce(topic, value, key, **kw)
                break
            except BufferError:
                # librdkafka's queue is full: wait for deliveries (backpressure on the agent).
                self._p.poll(0.05)
        self.produced += 1
        if not self.produced % 10_000:
            self._p.poll(0)  # serve delivery reports now and then between flushes

    async def flush(self, timeout: float = 60.0) -> None:
        """Until everything produced so far is acknowledged by the broker; raises if anything failed."""
        self._check(await asyncio.to_thread(self._p.flush, timeout), timeout)

    def flush_sync(self, timeout: float = 60.0) -> None:
        """:meth:`flush` for a caller on its own thread."""
        self._check(self._p.flush(timeout), timeout)

    def _check(self, left: int, timeout: float) -> None:
        if self._error is not None:
            raise DeliveryFailed(f"Kafka refused a record: {self._error}")
        if left:
            raise DeliveryFailed(f"{left} record(s) not delivered within {timeout:.0f} s")

"""The Kafka producer every connector uses: idempotent, keyed ``site/device``, with delivery callbacks.

A connector acknowledges its source (an MQTT PUBACK, say) only from the delivery callback, i.e. after the
broker has the batch (DESIGN.md §4 Delivery).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from pipeline import codec
from pipeline.records import ReadingBatch, dead_letter

log = logging.getLogger("plantstream.producer")

Delivered = Callable[[KafkaError | None], None]


class TelemetryProducer:
    def __init__(
        self,
        bootstrap: str,
        raw_topic: str,
        dlq_topic: str,
        *,
        client_id: str = "plantstream",
        extra: dict[str, Any] | None = None,
    ) -> None:
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "client.id": client_id,
            "enable.idempotence": True,  # acks=all, ordered, no duplicates on retry
            "linger.ms": 5,
            "compression.type": "lz4",
            "batch.size": 1_048_576,
            "queue.buffering.max.messages": 200_000,
            "message.max.bytes": 4_000_000,
        }
        conf.update(extra or {})
        self._p = Producer(conf)
        self.raw_topic = raw_topic
        self.dlq_topic = dlq_topic
        self.sent_batches = 0
        self.sent_readings = 0
        self.dead_letters = 0
        self.errors = 0

    def send_batch(self, batch: ReadingBatch, on_delivery: Delivered) -> None:
        key = f"{batch['site']}/{batch['device']}"
        # The record timestamp is the event time (DESIGN.md §3): the batch's newest reading.
        ts = max((r["ts"] for r in batch["readings"]), default=None)
        n = len(batch["readings"])

        def cb(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                self.sent_batches += 1
                self.sent_readings += n
            else:
                self.errors += 1
            on_delivery(err)

        self._produce(self.raw_topic, key.encode(), codec.dumps(batch), cb, ts)

    def send_dead_letter(
        self, source: str, reason: str, payload: bytes | str, topic: str | None, on_delivery: Delivered
    ) -> None:
        dl = dead_letter(source, reason, payload, topic=topic)

        def cb(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                self.dead_letters += 1
            else:
                self.errors += 1
            on_delivery(err)

        self._produce(self.dlq_topic, source.encode(), codec.dumps(dl), cb, None)

    def _produce(
        self, topic: str, key: bytes, value: bytes, cb: Callable[[Any, Any], None], ts: int | None
    ) -> None:
        while True:
            try:
                if ts is None:
                    self._p.produce(topic, value, key, on_delivery=cb)
                else:
                    self._p.produce(topic, value, key, on_delivery=cb, timestamp=ts)
                return
            except BufferError:
                # Local queue full: serve delivery reports until there is room (natural backpressure).
                self._p.poll(0.05)

    def poll(self, timeout: float = 0.0) -> int:
        return self._p.poll(timeout)

    def flush(self, timeout: float = 30.0) -> int:
        return self._p.flush(timeout)

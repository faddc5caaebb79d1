"""Readings into ReadingBatches for asyncio sources: one batch per device per event-loop turn.

A subscription publish (OPC UA) or a poll answer (BACnet) yields many readings in one turn of the event
loop; flushing with ``call_soon`` sends them as one Kafka message per device, and ``max_batch`` caps a
batch's size. Counters go to the source's ``stats`` (``batches``, ``readings``, ``delivery_errors``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from confluent_kafka import KafkaError

from connectors.common.producer import TelemetryProducer
from pipeline.core.records import BatchReading, ReadingBatch


class LoopBatcher:
    def __init__(
        self, source_id: str, producer: TelemetryProducer, max_batch: int, stats: Any, log: logging.Logger
    ) -> None:
        self.source_id = source_id
        self.producer = producer
        self.max_batch = max_batch
        self.stats = stats
        self.log = log
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[tuple[str, str], list[BatchReading]] = {}
        self._flush_scheduled = False

    def add(self, site: str, device: str, reading: BatchReading) -> None:
        key = (site, device)
        buf = self._pending.setdefault(key, [])
        buf.append(reading)
        if len(buf) >= self.max_batch:
            self._send(key, self._pending.pop(key))
        elif not self._flush_scheduled and self.loop is not None:
            # After the rest of this turn's readings have been added: one batch per device per turn.
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for key, readings in pending.items():
            self._send(key, readings)

    def _send(self, key: tuple[str, str], readings: list[BatchReading]) -> None:
        batch: ReadingBatch = {
            "v": 1,
            "source": self.source_id,
            "site": key[0],
            "device": key[1],
            "readings": readings,
        }
        self.stats.batches += 1
        self.stats.readings += len(readings)
        self.producer.send_batch(batch, self.delivered)

    def delivered(self, err: KafkaError | None) -> None:
        if err is not None:
            self.stats.delivery_errors += 1
            n = self.stats.delivery_errors
            if n == 1 or n % 1000 == 0:
                self.log.error("source %s: Kafka delivery failed (%d so far): %s", self.source_id, n, err)

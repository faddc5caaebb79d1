"""The sink stage: one table's topic into one sink's database, for any sink in the registry.

Each (sink, table) pair is a :class:`pipeline.stages.runtime.Stage` of its own (consumer group
``<app-id>-sink-<sink id>-<table>``) driving a :class:`SinkStep`. A batch is decoded into
:class:`connectors.common.sink.Entry` records and handed to the sink's writer, which stores the rows and the
source offsets in one durable step; what the database refuses for good goes to the dead-letter topic; the
runtime commits the input offsets after the batch (checkpoint interval 0), once the dead letters are
delivered. The writer's own event loop lives on the stage's thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import Message

from connectors.common.sink import Entry, SinkWriter
from pipeline.core import codec
from pipeline.core.records import HEARTBEAT_KEY, InvalidRecord, validate_batch
from pipeline.core.topology import SinkBase, TopologyBase
from pipeline.stages.runtime import Step

log = logging.getLogger("plantstream.worker")


def _json_object(value: bytes) -> Any:
    obj = codec.loads(value)
    if not isinstance(obj, dict):
        raise TypeError(f"expected a JSON object, found {type(obj).__name__}")
    return obj


def _reading_batch(value: bytes) -> Any:
    try:
        batch, _bad = validate_batch(codec.loads(value))
    except (codec.JSONDecodeError, InvalidRecord):
        return None  # the aggregation stage dead-letters malformed input; writing nothing here is right
    return batch


# table -> (the topology's topic it is written from, decoder of one message: a record, None to skip it, or
# an exception for input that is not what the topic carries)
TABLES: dict[str, tuple[Callable[[TopologyBase], str], Callable[[bytes], Any]]] = {
    "agg_1m": (lambda t: t.agg_topic, _json_object),
    "readings": (lambda t: t.raw_topic, _reading_batch),
    "kpi_results": (lambda t: t.loop_kpi_topic, _json_object),
    "write_commands": (lambda t: t.results_topic, _json_object),
    "alarm_events": (lambda t: t.alerts_events_topic, _json_object),
    "alarms": (lambda t: t.alerts_events_topic, _json_object),
}
WHAT = {
    "agg_1m": "aggregate",
    "readings": "ReadingBatch",
    "kpi_results": "LoopKpi",
    "write_commands": "command result",
    "alarm_events": "AlertEvent",
    "alarms": "AlertEvent",
}


def topic_of(topo: TopologyBase, table: str) -> str:
    return TABLES[table][0](topo)


class SinkStep(Step):
    def __init__(
        self, topo: TopologyBase, sink: SinkBase, table: str, writer: SinkWriter, counters: Any
    ) -> None:
        if table not in TABLES:
            raise ValueError(f"no topic feeds a table named {table!r}; known: {', '.join(TABLES)}")
        if table not in writer.tables:
            raise ValueError(f"sink {sink.id} ({sink.type}) cannot hold table {table!r}")
        self.topo, self.sink, self.table, self.writer, self.counters = topo, sink, table, writer, counters
        self.topic = topic_of(topo, table)
        self.decode = TABLES[table][1]
        self.loop = asyncio.new_event_loop()

    def assigned(self, partitions: list[int]) -> None:
        self.writer.forget(partitions)

    def revoked(self, partitions: list[int]) -> None:
        self.writer.forget(partitions)

    def process(self, msgs: list[Message]) -> None:
        entries: list[Entry] = []
        for m in msgs:
            value = m.value()
            if m.key() == HEARTBEAT_KEY or value is None:
                continue
            try:
                record = self.decode(value)
            except Exception as e:  # decoding is pure: whatever it raises is about the record
                self._dead(f"invalid {WHAT[self.table]}: {e!r}", value, m.partition(), m.offset())
                continue
            if record is not None:
                entries.append(Entry(m.partition(), m.offset(), record, value))
        if not entries:
            return
        result = self.loop.run_until_complete(self.writer.write(self.table, self.topic, entries))
        rows = self.counters.sink_rows
        rows[self.table] = rows.get(self.table, 0) + result.written
        for r in result.refused:
            self._dead(r.reason, r.payload, r.partition, r.offset)

    def _dead(self, reason: str, payload: Any, partition: int, offset: int) -> None:
        self.counters.rejected += 1
        self.stage.outbox.dead_letter(
            self.topo.dlq_topic,
            self.sink.id,
            reason,
            payload,
            topic=self.topic,
            partition=partition,
            offset=offset,
        )

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.writer.close())
        finally:
            self.loop.close()

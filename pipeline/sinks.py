"""Sinks: topics into the databases, input offsets committed only after the database committed.

One transaction per batch holds the rows and the source offsets (sink_offsets), so a replay is skipped row
by row. Temporary database errors are retried inside the writer; records the database refuses for good go
to the dead-letter topic. ``agg_1m`` and ``readings`` run as :class:`TopicSink` threads on librdkafka's
consumer; the loop-KPI and command audit sinks, with a few records a minute, are Faust agents.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import faust
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from connectors.timescale.writer import PostgresWriter, Record, ms_to_dt
from pipeline import codec
from pipeline.outbox import Outbox
from pipeline.records import InvalidRecord, dead_letter, validate_batch
from pipeline.topology import PostgresSink, Topology

log = logging.getLogger("plantstream.worker")


def aggregate_row(a: dict[str, Any]) -> tuple[Any, ...]:
    return (
        ms_to_dt(a["window_start"]),
        a["series"],
        a["site"],
        a["device"],
        a["point"],
        a["count"],
        a["good_count"],
        a["min"],
        a["max"],
        a["mean"],
        a["sum"],
        a["first"],
        a["last"],
        a["stddev"],
        a.get("unit"),
        ms_to_dt(a["window_end"]),
    )


def reading_rows(value: bytes) -> list[tuple[Any, ...]]:
    try:
        batch, _bad = validate_batch(codec.loads(value))
    except (codec.JSONDecodeError, InvalidRecord):
        return []  # the aggregation agent dead-letters malformed input; writing nothing here is right
    site, device = batch["site"], batch["device"]
    prefix = f"{site}/{device}/"
    return [
        (
            ms_to_dt(r["ts"]),
            prefix + r["point"],
            r["value"],
            r["quality"],
            site,
            device,
            r["point"],
            r.get("unit"),
            codec.dumps(r["status"]).decode() if "status" in r else None,
        )
        for r in batch["readings"]
    ]


def attach_sinks(
    app: faust.App, topo: Topology, counters: Any, fatal: Callable[[str, BaseException], None]
) -> None:
    for sink in topo.sinks:
        for table in sink.topics:
            if table == "kpi_results":  # loops.kpi: its own rows and writer
                from pipeline.loops_agent import attach_kpi_sink

                attach_kpi_sink(app, topo, sink, counters, fatal)
                continue
            _attach_postgres(app, topo, sink, table, counters, fatal)
    from pipeline.commands import attach_command_sink  # the write_commands audit, where BACnet writes exist

    attach_command_sink(app, topo, counters, fatal)


def _attach_postgres(
    app: faust.App,
    topo: Topology,
    sink: PostgresSink,
    table: str,
    counters: Any,
    fatal: Callable[[str, BaseException], None],
) -> None:
    worker = TopicSink(topo, sink, table, str(app.conf.id), counters, fatal)

    @app.task
    async def start_sink() -> None:
        worker.start()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def stop_sink(sender: Any, **kwargs: Any) -> None:
        await asyncio.to_thread(worker.stop)


class TopicSink(threading.Thread):
    """A telemetry topic into its PostgreSQL table, on librdkafka's consumer in its own thread.

    Like the aggregation stage (pipeline/aggregation.py, which says why): a Faust agent spent ~200 µs per
    record before the database saw it, so a minute's 10,000 aggregates took seconds to reach their table.
    Batches of up to ``batch_size`` records or ``batch_delay``; offsets are committed only after the
    database committed the batch (with the offsets in sink_offsets, so a replay is skipped row by row).
    """

    def __init__(
        self,
        topo: Topology,
        sink: PostgresSink,
        table: str,
        app_id: str,
        counters: Any,
        fatal: Callable[[str, BaseException], None],
    ) -> None:
        super().__init__(name=f"sink-{sink.id}-{table}", daemon=True)
        self.topo, self.sink, self.table = topo, sink, table
        self.topic = topo.agg_topic if table == "agg_1m" else topo.raw_topic
        self.counters, self.fatal = counters, fatal
        self.writer = PostgresWriter(sink.dsn, sink.schema_name, consumer=f"{app_id}/{sink.id}")
        self.outbox = Outbox(topo.broker.bootstrap, f"{app_id}-sink-{sink.id}-{table}")
        self.consumer = Consumer(
            {
                "bootstrap.servers": topo.broker.bootstrap,
                "group.id": f"{app_id}-sink-{sink.id}-{table}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "client.id": f"{app_id}-sink-{sink.id}-{table}",
                "queued.max.messages.kbytes": 16 * 1024,  # bounded prefetch (the default is 64 MiB)
            }
        )
        self.stopping = threading.Event()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            self.consumer.subscribe([self.topic])
            size, delay = self.sink.batch_size, self.sink.batch_delay / 1000.0
            while not self.stopping.is_set():
                msgs = self.consumer.consume(size, delay)
                if msgs:
                    self._write(loop, msgs)
            loop.run_until_complete(self.writer.close())
            self.consumer.close()
        except Exception as exc:
            self.fatal(f"sink {self.sink.id} ({self.table}) failed", exc)
        finally:
            loop.close()

    def _write(self, loop: asyncio.AbstractEventLoop, msgs: list[Any]) -> None:
        records: list[Record] = []
        last: dict[int, int] = {}
        dead = 0
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("sink %s (%s): consumer error %s", self.sink.id, self.table, err)
                continue
            p, o, value = m.partition(), m.offset(), m.value()
            last[p] = o
            if self.table == "agg_1m":
                try:
                    records.append(Record(p, o, aggregate_row(codec.loads(value)), value))
                except (codec.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    self._dead(f"invalid aggregate: {e!r}", value, p, o)
                    dead += 1
            elif m.key() != b"\x00heartbeat":
                records.extend(Record(p, o, row) for row in reading_rows(value))
        if records:
            result = loop.run_until_complete(self.writer.write(self.table, self.topic, records))
            self.counters.sink_rows[self.table] = self.counters.sink_rows.get(self.table, 0) + result.written
            for rec, reason in result.rejected:
                self._dead(reason, rec.source or repr(rec.row), rec.partition, rec.offset)
                dead += 1
        if dead:
            self.outbox.flush_sync()  # the dead letters are delivered before their offsets are committed
        if last:
            self.consumer.commit(
                offsets=[TopicPartition(self.topic, p, o + 1) for p, o in last.items()], asynchronous=True
            )

    def _dead(self, reason: str, payload: Any, partition: int, offset: int) -> None:
        dl = dead_letter(self.sink.id, reason, payload, topic=self.topic, partition=partition, offset=offset)
        self.outbox.produce(self.topo.dlq_topic, self.sink.id.encode(), codec.dumps(dl))

"""Sink agents: topics into the databases, acknowledged only after the database committed.

Pattern (FAUST_NOTES.md): ``concurrency=1``, ``noack_take`` batches, one transaction per batch holding
the rows and the source offsets, then ``stream.ack`` for each event. Temporary database errors are
retried inside the writer; records the database refuses for good go to the dead-letter topic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faust

from connectors.timescale.writer import PostgresWriter, Record, ms_to_dt
from pipeline import codec
from pipeline.gaps import GapFiller
from pipeline.records import InvalidRecord, dead_letter, validate_batch
from pipeline.topology import PostgresSink, Topology


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
    topic_name = topo.agg_topic if table == "agg_1m" else topo.raw_topic
    topic = app.topic(
        topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    writer = PostgresWriter(sink.dsn, sink.schema_name, consumer=f"{app.conf.id}/{sink.id}")
    batch_delay = sink.batch_delay / 1000.0
    gaps = GapFiller(topo.broker.bootstrap, f"sink {sink.id} ({table})")

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def _rebalanced(sender: Any, **kwargs: Any) -> None:
        gaps.reset()

    @app.agent(topic, name=f"sink-{sink.id}-{table}", concurrency=1)
    async def sink_agent(stream: faust.StreamT) -> None:
        async for events in stream.noack_take(  # type: ignore[attr-defined]
            sink.batch_size, within=batch_delay
        ):
            try:
                records: list[Record] = []
                messages = [m for ev in events for m in await gaps.fill(ev.message)]
                for msg in messages:
                    if table == "agg_1m":
                        try:
                            records.append(
                                Record(
                                    msg.partition,
                                    msg.offset,
                                    aggregate_row(codec.loads(msg.value)),
                                    msg.value,
                                )
                            )
                        except (codec.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                            await _dlq(app, topo, sink.id, f"invalid aggregate: {e!r}", msg)
                    elif msg.key != b"\x00heartbeat":
                        records.extend(
                            Record(msg.partition, msg.offset, row) for row in reading_rows(msg.value)
                        )
                if records:
                    result = await writer.write(table, topic_name, records)
                    counters.sink_rows[table] = counters.sink_rows.get(table, 0) + result.written
                    for rec, reason in result.rejected:
                        await app.producer.send(
                            topo.dlq_topic,
                            sink.id.encode(),
                            codec.dumps(
                                dead_letter(
                                    sink.id,
                                    reason,
                                    rec.source or repr(rec.row),
                                    topic=topic_name,
                                    partition=rec.partition,
                                    offset=rec.offset,
                                )
                            ),
                            None,
                            None,
                            None,
                        )
                for ev in events:
                    await stream.ack(ev)
            except Exception as exc:
                fatal(f"sink {sink.id} ({table}) failed", exc)


async def _dlq(app: faust.App, topo: Topology, source: str, reason: str, msg: Any) -> None:
    dl = dead_letter(source, reason, msg.value, topic=msg.topic, partition=msg.partition, offset=msg.offset)
    await app.producer.send(topo.dlq_topic, source.encode(), codec.dumps(dl), None, None, None)

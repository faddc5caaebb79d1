"""The loop KPI agents of the Faust worker: routing, the KPI agent over ``loops.samples``, the sink.

* Routing runs inside the aggregation agent (pipeline/app.py calls :meth:`LoopRouting.route` for batches of
  devices that carry loop tags; other batches cost it one dict lookup): each loop's readings go to
  ``loops.samples`` keyed by the loop id, with the source position (``telemetry.raw`` partition and offset)
  that lets the loop state drop what a restarted aggregation agent routes a second time.
* The ``loop-kpi`` agent applies samples to :class:`pipeline.loops.LoopEngine` (state in the changelog-backed
  table ``loop-state``), computes the windows that close in a worker thread (the KPIs are numpy work that
  must not stall the event loop), sends one LoopKpi per window to ``loops.kpi`` and waits for the broker
  before the state moves on. A heartbeat per ``loops.samples`` partition closes the open windows of loops
  that went quiet for their ``idle_timeout``.
* The sink agent writes ``loops.kpi`` into ``kpi_results`` (connectors/timescale/kpi.py).

As in pipeline/app.py, any error that is not about the input stops the worker without committing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faust

from pipeline import codec
from pipeline.loops import LoopDef, LoopEngine, LoopRouter, run_job
from pipeline.records import ReadingBatch, dead_letter
from pipeline.topology import PostgresSink, Topology

log = logging.getLogger("plantstream.loops")

Fatal = Callable[[str, BaseException], None]


@dataclass
class LoopStats:
    routed_messages: int = 0
    routed_samples: int = 0
    samples: int = 0
    duplicates: int = 0
    late: int = 0
    invalid: int = 0
    windows: int = 0
    idle_flushes: int = 0
    kpi_rows: int = 0


class LoopRouting:
    """For the aggregation agent: ``devices`` to test a batch, :meth:`route` to send its loop samples."""

    def __init__(self, app: faust.App, topic: str, router: LoopRouter, stats: LoopStats) -> None:
        self.app = app
        self.topic = topic
        self.router = router
        self.devices = router.devices
        self.stats = stats

    def route_with(
        self, produce: Callable[..., None], batch: ReadingBatch, partition: int, offset: int
    ) -> None:
        """:meth:`route` through another producer: ``produce(topic, key, value, ts_ms)``."""
        for loop_id, samples in self.router.split(batch).items():
            body = codec.dumps({"loop": loop_id, "src": [partition, offset], "s": samples})
            produce(self.topic, loop_id.encode(), body, max(s[1] for s in samples))
            self.stats.routed_messages += 1
            self.stats.routed_samples += len(samples)


def attach_loops(app: faust.App, topo: Topology, counters: Any, fatal: Fatal) -> LoopRouting | None:
    """The loop agents of the topology (None without loops); returns the router for the aggregation agent."""
    if not topo.loops:
        return None
    from pipeline.app import HEARTBEAT_KEY

    defs = {lp.id: LoopDef.from_topology(lp) for lp in topo.loops}
    partitions = topo.broker.partitions
    samples_name = topo.loop_samples_topic
    samples_topic = app.topic(
        samples_name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
    )
    table = app.Table("loop-state", default=None, partitions=partitions, key_type=str)
    engine = LoopEngine(table, defs)
    stats = LoopStats()
    app.plantstream_loops = stats  # type: ignore[attr-defined]
    app.plantstream_loop_engine = engine  # type: ignore[attr-defined]
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loop-kpi")
    last_data: dict[str, float] = {}
    described: set[str] = set()

    async def send(topic: str, key: str, value: Any, ts_ms: int | None = None) -> Awaitable[Any]:
        return await app.producer.send(
            topic, key.encode(), codec.dumps(value), None, ts_ms / 1000.0 if ts_ms else None, None
        )

    async def dlq(reason: str, payload: Any, source: str, partition: int, offset: int) -> None:
        counters.rejected += 1
        dl = dead_letter(source, reason, payload, topic=samples_name, partition=partition, offset=offset)
        await send(topo.dlq_topic, source, dl)

    async def close(loop_id: str, partition: int, offset: int, flush_all: bool = False) -> None:
        job = engine.due(loop_id, flush_all=flush_all)
        if job is None:
            return
        result = await asyncio.get_running_loop().run_in_executor(executor, run_job, job)
        futs = [await send(topo.loop_kpi_topic, loop_id, rec, rec["window_start"]) for rec in result.records]
        # Durable in Kafka before the state moves on: a crash in between computes and sends them again.
        await asyncio.gather(*futs)
        engine.finish(loop_id, partition, offset, job, result)
        stats.windows += len(result.records)
        if flush_all:
            stats.idle_flushes += 1
        for rec in result.records:
            kpis = rec["kpis"]
            log.debug(
                "loop %s: window %d closed (%s): %d samples, osc_flag %s",
                loop_id,
                rec["window_start"],
                rec["closed_by"],
                rec["samples"],
                kpis["osc_flag"]["value"] if "osc_flag" in kpis else None,
            )

    async def handle(event: Any) -> None:
        msg = event.message
        p, o = msg.partition, msg.offset
        if msg.key == HEARTBEAT_KEY:
            now = time.monotonic()
            for loop_id in engine.open_loops(p):
                seen = last_data.setdefault(loop_id, now)
                if (now - seen) * 1000 >= defs[loop_id].idle_ms:
                    log.info("loop %s quiet for %.0f s: closing its open window(s)", loop_id, now - seen)
                    await close(loop_id, p, o, flush_all=True)
            return
        source = (msg.key or b"").decode(errors="replace")
        try:
            body = codec.loads(msg.value)
            loop_id, samples, src = body["loop"], body["s"], body.get("src")
            if not (isinstance(loop_id, str) and isinstance(samples, list)):
                raise TypeError("loop must be a string and s a list")
            if src is not None and not (
                isinstance(src, list) and len(src) == 2 and all(isinstance(x, int) for x in src)
            ):
                raise TypeError("src must be [partition, offset]")
        except (codec.JSONDecodeError, KeyError, TypeError) as e:
            await dlq(f"malformed: loop samples ({e!r})", msg.value, f"loops/{source}", p, o)
            return
        if loop_id not in defs:
            await dlq(f"invalid: no loop {loop_id!r} in the topology", msg.value, f"loops/{source}", p, o)
            return
        if loop_id not in described:
            described.add(loop_id)
            state = engine.describe(loop_id)
            if state is not None:
                log.info("loop %s: state restored: %s", loop_id, state)
        last_data[loop_id] = time.monotonic()
        applied = engine.apply(loop_id, p, o, samples, src)
        if applied.duplicate:
            stats.duplicates += 1
        stats.samples += applied.applied
        if applied.invalid:
            stats.invalid += applied.invalid
            await dlq(
                f"invalid: {applied.invalid} loop sample(s) not [tag, ts, value, good]",
                msg.value,
                f"loops/{loop_id}",
                p,
                o,
            )
        if applied.late:
            stats.late += len(applied.late)
            counters.late += len(applied.late)
            head = engine.head(loop_id) or {}
            await dlq(
                f"late: loop {loop_id} windows up to {head.get('ct')} already closed",
                {"loop": loop_id, "samples": applied.late},
                f"loops/{loop_id}",
                p,
                o,
            )
        # Also after a skipped (replayed) message: the windows it closed before a crash close now,
        # before a later message could add to them.
        await close(loop_id, p, o)

    @app.agent(samples_topic, name="loop-kpi")
    async def loop_kpi(stream: faust.StreamT) -> None:
        # Manual acks, as in the aggregation agent: an event is acknowledged only once handled completely,
        # so one interrupted by a shutdown is read again after the restart.
        manual = stream.noack()  # type: ignore[attr-defined]
        async for event in manual.events():
            try:
                await handle(event)
            except Exception as exc:
                msg = event.message
                fatal(f"loop-kpi agent failed on {msg.topic}[{msg.partition}]@{msg.offset}", exc)
            await manual.ack(event)

    hb_interval = max(0.5, min(5.0, min(d.idle_ms for d in defs.values()) / 4000))

    @app.timer(interval=hb_interval)
    async def loop_heartbeat() -> None:
        try:
            tps = [tp for tp in app.consumer.assignment() if tp.topic == samples_name]
            body = codec.dumps({"heartbeat": int(time.time() * 1000)})
            for tp in tps:
                await app.producer.send(samples_name, HEARTBEAT_KEY, body, tp.partition, None, None)
        except Exception as exc:
            log.warning("loop heartbeat not sent: %r", exc)

    return LoopRouting(app, samples_name, LoopRouter(defs.values()), stats)


def attach_kpi_sink(app: faust.App, topo: Topology, sink: PostgresSink, counters: Any, fatal: Fatal) -> None:
    """``loops.kpi`` into the sink's ``kpi_results`` table, acknowledged after the database committed."""
    from connectors.timescale.kpi import kpi_rows
    from connectors.timescale.writer import PostgresWriter, Record

    topic_name = topo.loop_kpi_topic
    topic = app.topic(
        topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    writer = PostgresWriter(sink.dsn, sink.schema_name, consumer=f"{app.conf.id}/{sink.id}")

    async def to_dlq(reason: str, payload: Any, partition: int, offset: int) -> None:
        dl = dead_letter(sink.id, reason, payload, topic=topic_name, partition=partition, offset=offset)
        await app.producer.send(topo.dlq_topic, sink.id.encode(), codec.dumps(dl), None, None, None)

    @app.agent(topic, name=f"sink-{sink.id}-kpi_results", concurrency=1)
    async def kpi_sink(stream: faust.StreamT) -> None:
        async for events in stream.noack_take(  # type: ignore[attr-defined]
            sink.batch_size, within=sink.batch_delay / 1000.0
        ):
            try:
                records: list[Record] = []
                for ev in events:
                    msg = ev.message
                    try:
                        records.extend(
                            Record(msg.partition, msg.offset, row, msg.value)
                            for row in kpi_rows(codec.loads(msg.value))
                        )
                    except (codec.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                        await to_dlq(f"invalid LoopKpi: {e!r}", msg.value, msg.partition, msg.offset)
                if records:
                    result = await writer.write("kpi_results", topic_name, records)
                    counters.sink_rows["kpi_results"] = (
                        counters.sink_rows.get("kpi_results", 0) + result.written
                    )
                    refused = {(rec.partition, rec.offset): (rec, reason) for rec, reason in result.rejected}
                    for rec, reason in refused.values():  # one dead letter per LoopKpi record
                        await to_dlq(reason, rec.source, rec.partition, rec.offset)
                for ev in events:
                    await stream.ack(ev)
            except Exception as exc:
                fatal(f"sink {sink.id} (kpi_results) failed", exc)

"""The Faust application: the aggregation agent and the sink agents of one topology.

The agents only move data; the logic lives in :mod:`pipeline.aggregate` (pure) and the sink writers in
``connectors/<database>/``. Any error that is not about the input (broker or state trouble) stops the
worker at once without committing: the input is then read again from the last committed offset, which
the idempotent state and writes absorb. Letting the exception reach Faust would ack the message and lose it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
import mode
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from pipeline import codec
from pipeline.aggregate import Close, MinuteAggregator
from pipeline.gaps import GapFiller, read_all
from pipeline.outbox import Outbox
from pipeline.records import InvalidRecord, dead_letter, validate_batch
from pipeline.topology import Topology

log = logging.getLogger("plantstream.worker")
wlog = logging.getLogger("plantstream.windows")

HEARTBEAT_KEY = b"\x00heartbeat"


def is_heartbeat(key: bytes | None) -> bool:
    return key == HEARTBEAT_KEY


def fatal(what: str, exc: BaseException) -> None:
    """Stop the process without committing offsets (see the module docstring)."""
    log.critical(
        "%s: %r; stopping the worker without committing so the input is read again", what, exc, exc_info=exc
    )
    logging.shutdown()
    os._exit(70)


@dataclass
class Counters:
    messages: int = 0
    readings: int = 0
    rejected: int = 0
    late: int = 0
    closed: int = 0
    skipped: int = 0
    skipped_input: int = 0
    recovered_input: int = 0
    sink_rows: dict[str, int] = field(default_factory=dict)


def ensure_state_topic(topo: Topology, name: str) -> None:
    """The compacted topic of the aggregation checkpoints, one partition per input partition."""
    admin = AdminClient({"bootstrap.servers": topo.broker.bootstrap})
    meta = admin.list_topics(timeout=30).topics
    if name in meta:
        have = len(meta[name].partitions)
        if have < topo.broker.partitions:
            admin.create_partitions([NewPartitions(name, topo.broker.partitions)])[name].result(30)
        return
    spec = NewTopic(
        name,
        num_partitions=topo.broker.partitions,
        replication_factor=topo.broker.replication,
        config={"cleanup.policy": "compact", "segment.bytes": str(64 * 2**20), "min.compaction.lag.ms": "0"},
    )
    for fut in admin.create_topics([spec], operation_timeout=30).values():
        try:
            fut.result(30)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def build_app(
    topo: Topology,
    *,
    app_id: str | None = None,
    store: str = "memory://",
    datadir: str | Path | None = None,
    with_sinks: bool = True,
    heartbeat_interval: float | None = None,
) -> faust.App:
    app_id = app_id or f"{topo.prefix}plantstream-{topo.name}"
    datadir = Path(datadir) if datadir else Path(".local").resolve() / "worker" / app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=f"kafka://{topo.broker.bootstrap.replace(',', ';kafka://')}",
        store=store,
        datadir=str(datadir),
        processing_guarantee="at_least_once",
        # Aggregates are sent and awaited explicitly before their windows are deleted (see aggregate.py);
        # other sends are flushed by Faust before each offset commit.
        stream_publish_on_commit=False,
        broker_commit_interval=1.0,
        broker_commit_every=2000,
        stream_buffer_maxsize=16384,
        producer_linger=0.005,
        producer_compression_type="lz4",
        producer_max_batch_size=1_048_576,
        producer_max_request_size=4_194_304,
        consumer_auto_offset_reset="earliest",
        consumer_max_fetch_size=8_388_608,
        topic_partitions=topo.broker.partitions,
        topic_replication_factor=topo.broker.replication,
        table_standby_replicas=0,
        agent_supervisor=mode.CrashingSupervisor,
        # The aggregation agent acknowledges events at its checkpoints; at a rebalance it checkpoints in
        # on_partitions_revoked, and at shutdown the unacknowledged rest is read again after the restart.
        stream_wait_empty=False,
        web_enabled=False,
    )
    # Table writes queue in the producer's buffer (default 100 messages, then every write waits).
    app.producer.buffer.max_messages = 20_000
    counters = Counters()
    app.plantstream_counters = counters  # type: ignore[attr-defined]
    partitions = topo.broker.partitions

    raw = app.topic(
        topo.raw_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
    )
    # The aggregation state's checkpoints (pipeline/aggregate.py): a compacted topic with one partition per
    # input partition, written and read by this agent directly (not a Faust table: its per-key write path
    # costs more than everything else the agent does, and its writes cannot pick their partition).
    state_topic = f"{app_id}-aggregate-state"
    ensure_state_topic(topo, state_topic)
    engine = MinuteAggregator(grace_ms=topo.aggregates.grace)
    app.plantstream_engine = engine  # type: ignore[attr-defined]
    from pipeline.loops_agent import attach_loops  # loop KPIs: their agents; the routing hook is in handle()

    loops = attach_loops(app, topo, counters, fatal)
    idle_ms = topo.aggregates.idle_timeout
    checkpoint_s = topo.aggregates.checkpoint_interval / 1000
    hb_interval = heartbeat_interval or max(0.5, min(5.0, idle_ms / 4000))
    last_data_wall: dict[int, float] = {}
    gaps = GapFiller(topo.broker.bootstrap, "aggregate")
    # Partitions whose state is loaded; events handled but not yet acknowledged (they are acknowledged
    # once a checkpoint holds their effect); dead letters to be delivered before that checkpoint.
    loaded: set[int] = set()
    pending: dict[int, list[Any]] = {}
    dlq_unflushed: set[int] = set()
    last_checkpoint: dict[int, float] = {}
    lock = asyncio.Lock()  # one message or one checkpoint at a time
    stream_ref: list[Any] = []

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def _rebalanced(sender: Any, **kwargs: Any) -> None:
        # Every event handled was checkpointed at the revocation (_revoked): reload what is assigned now
        # from the checkpoints; Faust reads the input again from the committed offsets.
        assigned = {tp.partition for tp in app.consumer.assignment() if tp.topic == topo.raw_topic}
        engine.drop(set(engine.parts) - assigned)
        loaded.clear()
        pending.clear()
        gaps.reset()

    outbox = Outbox(topo.broker.bootstrap, f"{app_id}-aggregate")

    def send(topic: str, key: str, value: Any, ts_ms: int | None = None) -> None:
        outbox.produce(topic, key.encode(), codec.dumps(value), ts_ms)

    async def dlq(reason: str, payload: Any, source: str, partition: int, offset: int) -> None:
        counters.rejected += 1
        dl = dead_letter(source, reason, payload, topic=topo.raw_topic, partition=partition, offset=offset)
        send(topo.dlq_topic, source or "unknown", dl)
        dlq_unflushed.add(partition)

    async def close_windows(partition: int, offset: int, closes: list[Close]) -> None:
        if closes:
            now = time.time()
            ends: dict[int, int] = {}
            for c in closes:
                ends[c.aggregate["window_end"]] = ends.get(c.aggregate["window_end"], 0) + 1
            for end, n in sorted(ends.items()):
                # One line per partition and window end: when its windows closed (make bench reads it).
                wlog.info("windows closed: partition=%d end=%d count=%d at=%.3f", partition, end, n, now)
            for c in closes:
                send(topo.agg_topic, c.series, c.aggregate, c.aggregate["window_start"])
            # Durable in Kafka before the windows leave the state: a crash in between re-sends them.
            await outbox.flush()
            counters.closed += len(closes)
        engine.finish(partition, offset, closes)

    async def load(partition: int) -> None:
        records = await asyncio.to_thread(read_all, topo.broker.bootstrap, state_topic, partition)
        engine.restore(partition, ((m.key or b"", m.value) for m in records))
        loaded.add(partition)
        last_checkpoint[partition] = time.monotonic()
        ps = engine.parts[partition]
        log.info(
            "partition %d: state loaded from %d checkpoint record(s): %d open window(s), applied through %s",
            partition,
            len(records),
            engine.open_windows(partition),
            ps.offset,
        )

    async def checkpoint(partitions: list[int]) -> None:
        """Make the partitions' state durable, then acknowledge the events it covers. Call with the lock."""
        if dlq_unflushed & set(partitions):
            # A dead letter's message is skipped on replay once its chunk is checkpointed: deliver it first.
            await outbox.flush()
            dlq_unflushed.clear()
        events: list[Any] = []
        for p in partitions:
            for key, value in engine.checkpoint(p):
                outbox.produce(state_topic, key, value, None, p)
            if topo.aggregates.latest:
                for rd in engine.take_latest(p):
                    send(topo.latest_topic, f"{rd['site']}/{rd['device']}/{rd['point']}", rd, rd["ts"])
            last_checkpoint[p] = time.monotonic()
            events.extend(pending.pop(p, []))
        await outbox.flush()
        if events and stream_ref:
            for event in events:
                await stream_ref[0].ack(event)

    async def handle(event: Any) -> None:
        for msg in await gaps.fill(event.message):
            await handle_message(msg)
        counters.skipped_input, counters.recovered_input = gaps.skipped, gaps.recovered

    async def handle_message(msg: Any) -> None:
        p, o = msg.partition, msg.offset
        if p not in loaded:
            await load(p)
        now = time.monotonic()
        if is_heartbeat(msg.key):
            seen = last_data_wall.setdefault(p, now)
            idle = (now - seen) * 1000 >= idle_ms
            closes = engine.due(p, flush_all=idle)
            if idle and (closes or engine.open_windows(p)):
                log.info(
                    "partition %d quiet for %.0f s: closing its %d open window(s)",
                    p,
                    now - seen,
                    len(closes),
                )
            if closes or idle:
                await close_windows(p, o, closes)
            return
        last_data_wall[p] = now
        counters.messages += 1
        try:
            batch, bad = validate_batch(codec.loads(msg.value))
        except codec.JSONDecodeError as e:
            await dlq(
                f"malformed: not JSON ({e})",
                msg.value,
                (msg.key or b"").decode(errors="replace"),
                p,
                o,
            )
            return
        except InvalidRecord as e:
            await dlq(f"invalid: {e.reason}", msg.value, (msg.key or b"").decode(errors="replace"), p, o)
            return
        source = batch["source"] or f"{batch['site']}/{batch['device']}"
        for r, reason in bad:
            await dlq(
                f"invalid: {reason}",
                {"site": batch["site"], "device": batch["device"], "reading": r},
                source,
                p,
                o,
            )
        if loops is not None and (batch["site"], batch["device"]) in loops.devices:
            await loops.route(batch, p, o)  # replays too: the loop state drops what it has seen
        applied = engine.apply(p, o, batch)
        if applied.skipped:
            counters.skipped += 1
            return
        counters.readings += applied.applied
        for r, window_end in applied.late:
            counters.late += 1
            await dlq(
                f"late: window ending {window_end} already closed (watermark {engine.watermark(p)})",
                {"site": batch["site"], "device": batch["device"], "reading": r},
                source,
                p,
                o,
            )
        await close_windows(p, o, engine.due(p))

    @app.agent(raw, name="aggregate")
    async def aggregate(stream: faust.StreamT) -> None:
        # Manual acks: an event is acknowledged only once a checkpoint holds its effect. With Faust's
        # automatic acks, an event interrupted by a shutdown was acknowledged and committed although its
        # state had not been written, and a restart skipped it.
        manual = stream.noack()  # type: ignore[attr-defined]
        stream_ref[:] = [manual]
        async for event in manual.events():
            async with lock:
                try:
                    await handle(event)
                except Exception as exc:
                    msg = event.message
                    fatal(f"aggregate agent failed on {msg.topic}[{msg.partition}]@{msg.offset}", exc)
                pending.setdefault(event.message.partition, []).append(event)

    @app.timer(interval=min(checkpoint_s, 0.25))
    async def checkpoints() -> None:
        now = time.monotonic()
        try:
            async with lock:
                due = [p for p in sorted(loaded) if now - last_checkpoint.get(p, 0.0) >= checkpoint_s]
                if due:
                    await checkpoint(due)
        except Exception as exc:
            fatal("checkpoint failed", exc)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        # Hand the partitions over with everything handled so far checkpointed and committed, so the next
        # owner (maybe this worker again) starts where this one stopped. Faust does not wait for our
        # unacknowledged events (stream_wait_empty=False), and discards commits after the revocation.
        try:
            async with lock:
                await checkpoint(sorted(loaded))
            await app.consumer.commit()
        except Exception as exc:
            log.warning("state not checkpointed at the rebalance (the input is read again): %r", exc)

    @app.timer(interval=hb_interval)
    async def heartbeat() -> None:
        # One heartbeat per assigned input partition lets a quiet partition close its windows.
        try:
            tps = [tp for tp in app.consumer.assignment() if tp.topic == topo.raw_topic]
            body = codec.dumps({"heartbeat": int(time.time() * 1000)})
            for tp in tps:
                await app.producer.send(topo.raw_topic, HEARTBEAT_KEY, body, tp.partition, None, None)
        except Exception as exc:
            log.warning("heartbeat not sent: %r", exc)

    if with_sinks:
        from pipeline.sinks import attach_sinks

        attach_sinks(app, topo, counters, fatal)
    return app

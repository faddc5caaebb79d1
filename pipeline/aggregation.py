"""The aggregation stage: ``telemetry.raw`` → 1-minute aggregates, ``telemetry.latest``, the DLQ.

It runs in its own thread with librdkafka's consumer and producer (confluent-kafka) instead of a Faust agent.
A Faust agent costs about 200 µs of Python per message before any work is done (DESIGN.md §5: a plain agent
handled about 5,000 messages/s here); this loop takes input in batches of up to a thousand messages, so
the per-message cost is the work itself. Faust still runs everything else in the worker (sinks, loop KPIs,
commands), and this thread lives and dies with the Faust worker.

Semantics are those of DESIGN.md §4, with the logic in :mod:`pipeline.aggregate`:

* State in memory, checkpointed every ``aggregates.checkpoint_interval`` to a compacted state topic (one
  partition per input partition); input offsets are committed only after the checkpoint that covers them
  was acknowledged by the broker. After a crash the input is read again from the committed offset and the
  chunk offsets make the replay idempotent.
* Closed aggregates are acknowledged by the broker before their windows leave the state.
* At a rebalance, revoked partitions are checkpointed and committed before they go (the callback runs
  inside ``consume``, in this thread); newly assigned partitions load their state from the state topic.
* A partition that stays quiet for ``aggregates.idle_timeout`` (wall clock) has its open windows closed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from pipeline import codec
from pipeline.aggregate import Close, MinuteAggregator
from pipeline.outbox import Outbox
from pipeline.readback import read_all
from pipeline.records import InvalidRecord, dead_letter, validate_batch
from pipeline.topology import Topology

log = logging.getLogger("plantstream.worker")
wlog = logging.getLogger("plantstream.windows")

HEARTBEAT_KEY = b"\x00heartbeat"  # written by earlier versions to close quiet partitions; skipped


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


class Aggregation(threading.Thread):
    def __init__(
        self,
        topo: Topology,
        app_id: str,
        counters: Any,
        fatal: Callable[[str, BaseException], None],
        route_loops: Any = None,
    ) -> None:
        super().__init__(name="aggregation", daemon=True)
        self.topo = topo
        self.counters = counters
        self.fatal = fatal
        self.route_loops = route_loops  # LoopRouting or None
        self.group = f"{app_id}-aggregate"
        self.state_topic = f"{app_id}-aggregate-state"
        ensure_state_topic(topo, self.state_topic)
        self.engine = MinuteAggregator(grace_ms=topo.aggregates.grace)
        self.outbox = Outbox(topo.broker.bootstrap, self.group)
        self.checkpoint_s = topo.aggregates.checkpoint_interval / 1000
        self.idle_s = topo.aggregates.idle_timeout / 1000
        self.consumer = Consumer(
            {
                "bootstrap.servers": topo.broker.bootstrap,
                "group.id": self.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.max.bytes": 16 * 2**20,
                "max.partition.fetch.bytes": 8 * 2**20,
                # Prefetched input is bounded (librdkafka's default, 64 MiB, is per partition): memory.
                "queued.max.messages.kbytes": 16 * 1024,
                "client.id": self.group,
            }
        )
        self.stopping = threading.Event()
        self.ready = threading.Event()
        # Per assigned partition: next offset to commit, wall time of the last data, of the last checkpoint.
        self.position: dict[int, int] = {}
        self.last_data: dict[int, float] = {}
        self.last_checkpoint: dict[int, float] = {}
        self.dlq_unflushed = False

    # -- lifecycle -------------------------------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        try:
            self.consumer.subscribe(
                [self.topo.raw_topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
            )
            self.ready.set()
            next_tick = time.monotonic()
            while not self.stopping.is_set():
                msgs = self.consumer.consume(1000, 0.1)
                for m in msgs:
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            continue
                        if err.fatal():
                            raise KafkaException(err)
                        log.warning("aggregation: consumer error %s", err)
                        continue
                    self._handle(m.partition(), m.offset(), m.key(), m.value())
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + 0.25
                    self._idle_flush(now)
                    due = [
                        p
                        for p in self.position
                        if now - self.last_checkpoint.get(p, 0.0) >= self.checkpoint_s
                    ]
                    if due:
                        self._checkpoint(due)
            # Graceful stop: what was handled is checkpointed and committed, so a restart resumes here.
            self._checkpoint(sorted(self.position), asynchronous=False)
            self.consumer.close()
        except Exception as exc:
            self.fatal("aggregation failed", exc)

    # -- rebalance callbacks (called inside consume(), in this thread) ---------------------------------
    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            for tp in partitions:
                p = tp.partition
                records = read_all(self.topo.broker.bootstrap, self.state_topic, p)
                self.engine.restore(p, ((m.key or b"", m.value) for m in records))
                now = time.monotonic()
                self.last_checkpoint[p] = now
                self.last_data[p] = now
                self.position.pop(p, None)
                ps = self.engine.parts[p]
                log.info(
                    "partition %d assigned: state loaded from %d checkpoint record(s), %d open window(s), "
                    "applied through offset %s",
                    p,
                    len(records),
                    self.engine.open_windows(p),
                    ps.offset,
                )
            log.info("aggregation: assigned input partitions %s", sorted(tp.partition for tp in partitions))
        except Exception as exc:
            self.fatal("loading the aggregation state failed", exc)

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            mine = [tp.partition for tp in partitions if tp.partition in self.engine.parts]
            self._checkpoint(mine, asynchronous=False)
            self.engine.drop(mine)
            for p in mine:
                self.position.pop(p, None)
            log.info("aggregation: revoked input partitions %s (checkpointed and committed)", mine)
        except Exception as exc:
            self.fatal("checkpoint at the rebalance failed", exc)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member may own them already: drop the state without committing; it is read again.
        lost = [tp.partition for tp in partitions]
        self.engine.drop(lost)
        for p in lost:
            self.position.pop(p, None)
        log.warning("aggregation: lost input partitions %s (their new owner rebuilds their state)", lost)

    # -- the work --------------------------------------------------------------------------------------
    def _send(self, topic: str, key: str, value: Any, ts_ms: int | None = None) -> None:
        self.outbox.produce(topic, key.encode(), codec.dumps(value), ts_ms)

    def _dlq(self, reason: str, payload: Any, source: str, partition: int, offset: int) -> None:
        self.counters.rejected += 1
        dl = dead_letter(
            source, reason, payload, topic=self.topo.raw_topic, partition=partition, offset=offset
        )
        self._send(self.topo.dlq_topic, source or "unknown", dl)
        self.dlq_unflushed = True

    def _close(self, partition: int, offset: int, closes: list[Close]) -> None:
        if closes:
            now = time.time()
            ends: dict[int, int] = {}
            for c in closes:
                ends[c.aggregate["window_end"]] = ends.get(c.aggregate["window_end"], 0) + 1
            for end, n in sorted(ends.items()):
                # One line per partition and window end: when its windows closed (make bench reads it).
                wlog.info("windows closed: partition=%d end=%d count=%d at=%.3f", partition, end, n, now)
            agg_topic = self.topo.agg_topic
            for c in closes:
                self._send(agg_topic, c.series, c.aggregate, c.aggregate["window_start"])
            # Durable in Kafka before the windows leave the state: a crash in between re-sends them.
            self.outbox.flush_sync()
            self.counters.closed += len(closes)
        self.engine.finish(partition, offset, closes)

    def _handle(self, p: int, o: int, key: bytes | None, value: bytes | None) -> None:
        self.position[p] = o + 1
        if key == HEARTBEAT_KEY:
            return
        self.last_data[p] = time.monotonic()
        counters = self.counters
        counters.messages += 1
        src = (key or b"").decode(errors="replace")
        try:
            batch, bad = validate_batch(codec.loads(value or b""))
        except codec.JSONDecodeError as e:
            self._dlq(f"malformed: not JSON ({e})", value, src, p, o)
            return
        except InvalidRecord as e:
            self._dlq(f"invalid: {e.reason}", value, src, p, o)
            return
        source = batch["source"] or f"{batch['site']}/{batch['device']}"
        for r, reason in bad:
            self._dlq(
                f"invalid: {reason}",
                {"site": batch["site"], "device": batch["device"], "reading": r},
                source,
                p,
                o,
            )
        if self.route_loops is not None and (batch["site"], batch["device"]) in self.route_loops.devices:
            self.route_loops.route_with(
                self.outbox.produce, batch, p, o
            )  # replays too: the loop state dedups
        applied = self.engine.apply(p, o, batch)
        if applied.skipped:
            counters.skipped += 1
            return
        counters.readings += applied.applied
        for r, window_end in applied.late:
            counters.late += 1
            self._dlq(
                f"late: window ending {window_end} already closed (watermark {self.engine.watermark(p)})",
                {"site": batch["site"], "device": batch["device"], "reading": r},
                source,
                p,
                o,
            )
        self._close(p, o, self.engine.due(p))

    def _idle_flush(self, now: float) -> None:
        for p in list(self.engine.parts):
            seen = self.last_data.get(p, now)
            if now - seen < self.idle_s or not self.engine.open_windows(p) or self._behind(p):
                continue
            closes = self.engine.due(p, flush_all=True)
            log.info(
                "partition %d quiet for %.0f s: closing its %d open window(s)", p, now - seen, len(closes)
            )
            self._close(p, self.position.get(p, 0) - 1, closes)

    def _behind(self, p: int) -> bool:
        """Input is waiting in the partition: quiet is then the consumer's doing, not the devices'."""
        try:
            _low, high = self.consumer.get_watermark_offsets(
                TopicPartition(self.topo.raw_topic, p), cached=True
            )
        except KafkaException:
            return True
        if p in self.position:
            return high < 0 or self.position[p] < high
        tp = self.consumer.position([TopicPartition(self.topo.raw_topic, p)])[0]
        return high < 0 or tp.offset < 0 or tp.offset < high

    def _checkpoint(self, partitions: list[int], asynchronous: bool = True) -> None:
        """Make the partitions' state durable, then commit the input offsets it covers."""
        if not partitions:
            return
        if self.dlq_unflushed:
            # A dead letter's message is skipped on replay once its chunk is checkpointed: deliver it first.
            self.outbox.flush_sync()
            self.dlq_unflushed = False
        latest = self.topo.aggregates.latest
        offsets = []
        now = time.monotonic()
        for p in partitions:
            for key, value in self.engine.checkpoint(p):
                self.outbox.produce(self.state_topic, key, value, None, p)
            if latest:
                for rd in self.engine.take_latest(p):
                    self._send(
                        self.topo.latest_topic, f"{rd['site']}/{rd['device']}/{rd['point']}", rd, rd["ts"]
                    )
            self.last_checkpoint[p] = now
            if p in self.position:
                offsets.append(TopicPartition(self.topo.raw_topic, p, self.position[p]))
        self.outbox.flush_sync()
        if offsets:
            self.consumer.commit(offsets=offsets, asynchronous=asynchronous)

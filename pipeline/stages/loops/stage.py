"""The loop-KPI stage: routing from the aggregation stage, and the KPI step over ``loops.samples``.

* Routing runs inside the aggregation stage (:class:`LoopRouting`; other devices' batches cost it one dict
  lookup): each loop's readings go to ``loops.samples`` keyed by the loop id, with the source position
  (``telemetry.raw`` partition and offset) that lets the loop state drop what a restarted aggregation stage
  routes a second time.
* :class:`LoopStep` applies samples to :class:`pipeline.stages.loops.engine.LoopEngine`, whose state lives
  in a :class:`pipeline.stages.state.PartitionedStore` checkpointed to ``<app-id>-loop-state``; it computes
  the windows that close (numpy, on the stage's own thread), sends one LoopKpi per window to ``loops.kpi``
  and waits for the broker before the state moves on. A loop quiet for its ``idle_timeout`` (wall clock)
  while its partition is drained has its open windows closed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Message

from pipeline.core import codec
from pipeline.core.kafka import client_config, read_all
from pipeline.core.records import HEARTBEAT_KEY, ReadingBatch
from pipeline.core.topology import TopologyBase
from pipeline.stages.loops.config import Loop
from pipeline.stages.loops.engine import LoopDef, LoopEngine, LoopRouter, run_job
from pipeline.stages.runtime import Step
from pipeline.stages.state import PartitionedStore

log = logging.getLogger("plantstream.loops")


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


class LoopRouting:
    """For the aggregation stage: ``devices`` to test a batch, :meth:`route_with` to send its loop samples."""

    def __init__(self, topic: str, loops: list[Loop], stats: LoopStats) -> None:
        self.topic = topic
        self.router = LoopRouter(LoopDef.from_topology(lp) for lp in loops)
        self.devices = self.router.devices
        self.stats = stats

    def route_with(
        self,
        produce: Callable[..., None],
        batch: ReadingBatch,
        partition: int,
        offset: int,
        until: int | None = None,
    ) -> None:
        """Send the batch's loop samples through ``produce(topic, key, value, ts_ms)``; samples stamped after
        ``until`` (too far ahead of the wall clock: the aggregation stage dead-letters them) stay behind."""
        for loop_id, samples in self.router.split(batch).items():
            if until is not None:
                samples = [s for s in samples if s[1] <= until]
                if not samples:
                    continue
            body = codec.dumps({"loop": loop_id, "src": [partition, offset], "s": samples})
            produce(self.topic, loop_id.encode(), body, max(s[1] for s in samples))
            self.stats.routed_messages += 1
            self.stats.routed_samples += len(samples)


class LoopStep(Step):
    def __init__(
        self,
        topo: TopologyBase,
        loops: list[Loop],
        app_id: str,
        counters: Any,
        stats: LoopStats,
        route_alerts: Any = None,
    ):
        self.topo, self.counters, self.stats = topo, counters, stats
        self.route_alerts = route_alerts  # AlertRouting or None
        self.defs = {lp.id: LoopDef.from_topology(lp) for lp in loops}
        self.store = PartitionedStore()
        self.engine = LoopEngine(self.store, self.defs)
        self.samples_topic = topo.loop_samples_topic
        self.state_topic = f"{app_id}-loop-state"  # the worker creates it
        self.last_data: dict[str, float] = {}
        self.described: set[str] = set()

    # -- state -----------------------------------------------------------------------------------------
    def assigned(self, partitions: list[int]) -> None:
        for p in partitions:
            records = read_all(client_config(self.topo.broker), self.state_topic, p)
            keys = self.store.load(p, ((m.key, m.value) for m in records))
            log.info("loops: partition %d: state loaded from %d record(s), %d key(s)", p, len(records), keys)

    def revoked(self, partitions: list[int]) -> None:
        for p in partitions:
            self.store.drop(p)

    def durable(self, partitions: list[int]) -> None:
        outbox = self.stage.outbox
        for p in partitions:
            for key, value in self.store.take_log(p):
                outbox.produce(self.state_topic, key, value, None, p)

    # -- the work --------------------------------------------------------------------------------------
    def process(self, msgs: list[Message]) -> None:
        for m in msgs:
            if m.key() == HEARTBEAT_KEY:
                continue
            self.store.partition = m.partition()
            self._handle(m.partition(), m.offset(), m.key(), m.value())

    def tick(self, now: float) -> None:
        stage = self.stage
        if stage.blind:
            return  # no input reaches the worker: that is not the loops' silence
        for p in sorted(stage.owned):
            loops = self.engine.open_loops(p)
            if not loops or stage.behind(p):
                continue
            for loop_id in loops:
                seen = max(self.last_data.setdefault(loop_id, now), stage.broker_back_at)
                if (now - seen) * 1000 >= self.defs[loop_id].idle_ms:
                    log.info("loop %s quiet for %.0f s: closing its open window(s)", loop_id, now - seen)
                    self.store.partition = p
                    self._close(loop_id, p, stage.position.get(p, 0) - 1, flush_all=True)

    def _dlq(self, reason: str, payload: Any, source: str, partition: int, offset: int) -> None:
        self.counters.rejected += 1
        self.stage.outbox.dead_letter(
            self.topo.dlq_topic,
            source,
            reason,
            payload,
            topic=self.samples_topic,
            partition=partition,
            offset=offset,
        )

    def _close(self, loop_id: str, partition: int, offset: int, flush_all: bool = False) -> None:
        job = self.engine.due(loop_id, flush_all=flush_all)
        if job is None:
            return
        result = run_job(job)
        outbox = self.stage.outbox
        for rec in result.records:
            outbox.produce(self.topo.loop_kpi_topic, loop_id.encode(), codec.dumps(rec), rec["window_start"])
            if self.route_alerts is not None:
                self.route_alerts.kpis(outbox.produce, rec)
        # Durable in Kafka before the state moves on: a crash in between computes and sends them again.
        self.stage.deliver()
        self.engine.finish(loop_id, partition, offset, job, result)
        self.stats.windows += len(result.records)
        if flush_all:
            self.stats.idle_flushes += 1
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

    def _handle(self, p: int, o: int, key: bytes | None, value: bytes | None) -> None:
        source = (key or b"").decode(errors="replace")
        try:
            body = codec.loads(value or b"")
            loop_id, samples, src = body["loop"], body["s"], body.get("src")
            if not (isinstance(loop_id, str) and isinstance(samples, list)):
                raise TypeError("loop must be a string and s a list")
            if src is not None and not (
                isinstance(src, list) and len(src) == 2 and all(isinstance(x, int) for x in src)
            ):
                raise TypeError("src must be [partition, offset]")
        except (codec.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            self._dlq(f"malformed: loop samples ({e!r})", value, f"loops/{source}", p, o)
            return
        if loop_id not in self.defs:
            self._dlq(f"invalid: no loop {loop_id!r} in the topology", value, f"loops/{source}", p, o)
            return
        if loop_id not in self.described:
            self.described.add(loop_id)
            state = self.engine.describe(loop_id)
            if state is not None:
                log.info("loop %s: state restored: %s", loop_id, state)
        self.last_data[loop_id] = time.monotonic()
        applied = self.engine.apply(loop_id, p, o, samples, src)
        stats = self.stats
        if applied.duplicate:
            stats.duplicates += 1
        stats.samples += applied.applied
        if applied.invalid:
            stats.invalid += applied.invalid
            self._dlq(
                f"invalid: {applied.invalid} loop sample(s) not [tag, ts, value, good]",
                value,
                f"loops/{loop_id}",
                p,
                o,
            )
        if applied.late:
            stats.late += len(applied.late)
            self.counters.late += len(applied.late)
            head = self.engine.head(loop_id) or {}
            self._dlq(
                f"late: loop {loop_id} windows up to {head.get('ct')} already closed",
                {"loop": loop_id, "samples": applied.late},
                f"loops/{loop_id}",
                p,
                o,
            )
        # Also after a skipped (replayed) message: the windows it closed before a crash close now,
        # before a later message could add to them.
        self._close(loop_id, p, o)

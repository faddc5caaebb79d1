"""The aggregation stage: ``telemetry.raw`` → 1-minute aggregates, ``telemetry.latest``, the DLQ.

A :class:`pipeline.stages.runtime.Step`; the window logic is pure, in :mod:`pipeline.stages.windows`.
Semantics (docs/semantics.md):

* State in memory, checkpointed every ``aggregates.checkpoint_interval`` to a compacted state topic
  ``<app-id>-aggregate-state`` (one partition per input partition): one record per chunk of a device's series
  with the last input offset applied, so that replaying input after a crash is idempotent. The runtime
  commits the input offsets only after the checkpoint that covers them was acknowledged by the broker.
* Closed aggregates are acknowledged by the broker before their windows leave the state.
* Newly assigned partitions load their state from the state topic; a load that cannot read the whole
  partition stops the worker rather than start with part of the state.
* Each device has its own event-time clock (``windows.py``). A device quiet for ``aggregates.idle_timeout``
  (wall clock) while no input waits in its partition has its open windows closed; one quiet for
  :data:`EVICT_AFTER_S` more leaves the state but for its clock.
* No input, whatever its bytes, stops the stage: what is wrong with a record goes to the DLQ with the reason.
* Batches of devices with loop tags are also routed to ``loops.samples`` (pipeline/stages/loops/).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import Message

from pipeline.core import codec
from pipeline.core.kafka import client_config, ensure_compacted_topic, read_all
from pipeline.core.records import HEARTBEAT_KEY, InvalidRecord, Scan, validate_scan
from pipeline.core.topology import TopologyBase
from pipeline.stages.runtime import Step
from pipeline.stages.windows import Applied, Close, MinuteAggregator

log = logging.getLogger("plantstream.worker")
wlog = logging.getLogger("plantstream.windows")

EVICT_AFTER_S = 600.0  # quiet time, after its windows closed, before a device's series leave the memory
LATEST_BEHIND_S = 15.0  # telemetry.latest's pace while a partition is catching up on a backlog


class Aggregation(Step):
    def __init__(
        self,
        topo: TopologyBase,
        app_id: str,
        counters: Any,
        route_loops: Any = None,
        route_alerts: Any = None,
    ) -> None:
        self.topo = topo
        self.counters = counters
        self.route_loops = route_loops  # LoopRouting or None
        self.route_alerts = route_alerts  # AlertRouting or None
        self.state_topic = f"{app_id}-aggregate-state"  # the worker creates it
        self.state_partitions = topo.broker.partitions
        self.engine = MinuteAggregator(
            grace_ms=topo.aggregates.grace, max_future_ms=topo.aggregates.max_future
        )
        self.idle_s = topo.aggregates.idle_timeout / 1000
        self.evict_s = max(self.idle_s, EVICT_AFTER_S)
        self.seen: dict[str, float] = {}  # device -> monotonic time of its last message
        self.closing: dict[tuple[int, int], int] = {}  # (partition, window end) -> windows closed, to log
        self.now = 0.0
        self.wall_ms = 0
        self.latest_at: dict[int, float] = {}  # partition -> monotonic time its newest values last went out

    # -- state -----------------------------------------------------------------------------------------
    def assigned(self, partitions: list[int]) -> None:
        if partitions and max(partitions) >= self.state_partitions:
            # telemetry.raw gained partitions: the state topic follows, one partition per input partition.
            b = self.topo.broker
            ensure_compacted_topic(client_config(b), self.state_topic, max(partitions) + 1, b.replication)
            self.state_partitions = max(partitions) + 1
        now = time.monotonic()
        for p in partitions:
            records = read_all(client_config(self.topo.broker), self.state_topic, p)
            self.engine.restore(p, ((m.key or b"", m.value) for m in records))
            # Every restored device's quiet time starts now, all at once: the idle check stops at the first
            # device not quiet long enough, so one that got no clock there would hold the others behind it.
            for dkey in self.engine.quiet_devices(p):
                self.seen.setdefault(dkey, now)
            log.info(
                "partition %d assigned: state loaded from %d checkpoint record(s), %d open window(s), "
                "applied through offset %s",
                p,
                len(records),
                self.engine.open_windows(p),
                self.engine.parts[p].offset,
            )

    def revoked(self, partitions: list[int]) -> None:
        self.engine.drop(partitions)
        self.seen = {k: v for k, v in self.seen.items() if k in self.engine.devices}

    def durable(self, partitions: list[int]) -> None:
        outbox = self.stage.outbox
        latest = self.topo.aggregates.latest
        for p in partitions:
            if p not in self.engine.parts:
                continue
            for key, value in self.engine.checkpoint(p):
                outbox.produce(self.state_topic, key, value, None, p)
            if latest and self._latest_due(p):
                produce, topic = outbox.produce, self.topo.latest_topic
                for key, value, ts in self.engine.latest_records(p):
                    produce(topic, key, value, ts)

    def _latest_due(self, p: int) -> bool:
        """Whether this checkpoint publishes the partition's newest values. While the partition is behind
        (a backlog), they are coalesced over :data:`LATEST_BEHIND_S`: stale either way, and at 100,000
        series a checkpoint's newest values cost more than its windows. Nothing is dropped: a series keeps
        its newest reading until it is published."""
        now = time.monotonic()
        if now - self.latest_at.get(p, 0.0) < LATEST_BEHIND_S and self.stage.behind(p):
            return False
        self.latest_at[p] = now
        return True

    # -- the work --------------------------------------------------------------------------------------
    def process(self, msgs: list[Message]) -> None:
        self.now = time.monotonic()
        self.wall_ms = time.time_ns() // 1_000_000
        # A partition's messages are folded into their windows together (the engine gives the same result
        # as one at a time, in offset order); what closes is closed after them.
        runs: dict[int, list[tuple[int, Scan]]] = {}
        decode = self._decode
        for m in msgs:
            p, o = m.partition(), m.offset()
            scan = decode(p, o, m.key(), m.value())
            if scan is not None:
                run = runs.get(p)
                if run is None:
                    run = runs[p] = []
                run.append((o, scan))
        if runs:
            results = self.engine.apply_partitions(runs, self.wall_ms)
            for p, run in runs.items():
                self._after(p, run, results[p])
        self._log_closes()

    def _send(self, topic: str, key: str, value: Any, ts_ms: int | None = None) -> None:
        self.stage.outbox.produce(topic, key.encode(), codec.dumps(value), ts_ms)

    def _dlq(self, reason: str, payload: Any, source: str, partition: int, offset: int) -> None:
        self.counters.rejected += 1
        self.stage.outbox.dead_letter(
            self.topo.dlq_topic,
            source,
            reason,
            payload,
            topic=self.topo.raw_topic,
            partition=partition,
            offset=offset,
        )

    def _close(self, partition: int, offset: int, closes: list[Close]) -> None:
        if closes:
            agg_topic = self.topo.agg_topic
            closing = self.closing
            for c in closes:
                agg = c.aggregate
                self._send(agg_topic, c.series, agg, agg["window_start"])
                key = (partition, agg["window_end"])
                closing[key] = closing.get(key, 0) + 1
            self.counters.closed += len(closes)
            if self.route_alerts is not None:
                self.route_alerts.aggregates(self.stage.outbox.produce, [c.aggregate for c in closes])
        # The windows leave the state in memory now; the runtime delivers their aggregates before it
        # checkpoints that state, so a crash in between re-sends them from the older checkpoint.
        self.engine.finish(partition, offset, closes)

    def _log_closes(self) -> None:
        # One line per partition and window end per batch: when its windows closed (make bench reads it).
        if self.closing:
            now = time.time()
            for (p, end), n in sorted(self.closing.items()):
                wlog.info("windows closed: partition=%d end=%d count=%d at=%.3f", p, end, n, now)
            self.closing.clear()

    def _decode(self, p: int, o: int, key: bytes | None, value: bytes | None) -> Scan | None:
        """A message's valid readings in columns (None when none); what is bad goes to the DLQ."""
        if key == HEARTBEAT_KEY:
            return None
        counters = self.counters
        counters.messages += 1
        src = (key or b"").decode(errors="replace")
        try:
            scan, bad = validate_scan(codec.loads(value or b""))
        except codec.JSONDecodeError as e:
            self._dlq(f"malformed: not JSON ({e})", value, src, p, o)
            return None
        except InvalidRecord as e:
            self._dlq(f"invalid: {e.reason}", value, src, p, o)
            return None
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError, OverflowError) as e:
            # A shape no check foresaw: about the record, not the infrastructure.
            self._dlq(f"invalid: {e!r}", value, src, p, o)
            return None
        site, device = scan.site, scan.device
        source = scan.source or f"{site}/{device}"
        for r, reason in bad:
            self._dlq(f"invalid: {reason}", {"site": site, "device": device, "reading": r}, source, p, o)
        until = self.wall_ms + self.topo.aggregates.max_future
        if self.route_loops is not None and (site, device) in self.route_loops.devices:
            # Replays too: the loop state drops what it has seen.
            self.route_loops.route_with(self.stage.outbox.produce, scan.batch(), p, o, until)
        if self.route_alerts is not None:
            # Replays too: an alarm instance ignores samples at or before its newest one.
            self.route_alerts.scan(self.stage.outbox.produce, scan, until)
        self.seen[f"{site}/{device}"] = self.now
        return scan

    def _after(self, p: int, run: list[tuple[int, Scan]], results: list[Applied]) -> None:
        """Count, dead-letter the late and future readings, close what the devices' clocks closed."""
        counters = self.counters
        devices: set[str] = set()
        for (o, scan), applied in zip(run, results, strict=True):
            if applied.skipped:
                counters.skipped += 1
                continue
            counters.readings += applied.applied
            counters.duplicates += applied.duplicates
            site, device = scan.site, scan.device
            dkey = f"{site}/{device}"
            devices.add(dkey)
            if not applied.late and not applied.future:
                continue
            source = scan.source or dkey
            for r, window_end in applied.late:
                counters.late += 1
                self._dlq(
                    f"late: window ending {window_end} already closed for device {dkey} (its clock "
                    f"{applied.clock}, closed through {applied.watermark})",
                    {"site": site, "device": device, "reading": r},
                    source,
                    p,
                    o,
                )
            for r in applied.future:
                self._dlq(
                    f"future: ts {r['ts']} is more than {self.topo.aggregates.max_future} ms ahead of the "
                    f"wall clock ({self.wall_ms})",
                    {"site": site, "device": device, "reading": r},
                    source,
                    p,
                    o,
                )
        closes = []
        for dkey in sorted(devices):
            closes += self.engine.due(p, device=dkey)
        self._close(p, run[-1][0], closes)

    def tick(self, now: float) -> None:
        stage, engine = self.stage, self.engine
        if stage.blind:
            return  # no input reaches the worker: that is not the devices' silence
        back = stage.broker_back_at  # quiet time counts from the end of a broker outage
        for p in list(engine.parts):
            quiet = []
            for dkey in engine.quiet_devices(p):  # least recently active first
                seen = max(self.seen.setdefault(dkey, now), back)
                if now - seen < self.idle_s:
                    break
                quiet.append((dkey, now - seen))
            if not quiet or stage.behind(p):
                continue
            for dkey, idle in quiet:
                if engine.has_open(dkey):
                    closes = engine.due(p, flush_all=True, device=dkey)
                    log.info(
                        "device %s quiet for %.0f s: closing its %d open window(s)", dkey, idle, len(closes)
                    )
                    self._close(p, stage.position.get(p, 0) - 1, closes)
                elif idle >= self.evict_s and engine.evict(p, dkey):
                    self.seen.pop(dkey, None)
        self._log_closes()

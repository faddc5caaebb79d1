"""The worker: the topology's stages, each a thread on the stage runtime (pipeline/stages/runtime.py).

* ``aggregation``: ``telemetry.raw`` → ``telemetry.agg.1m``, ``telemetry.latest``, the DLQ, and the routing
  of loop tags to ``loops.samples`` (group ``<app-id>-aggregate``);
* ``loops``: ``loops.samples`` → ``loops.kpi``, where the topology has loops (group ``<app-id>-loops``);
* one sink stage per sink and table (group ``<app-id>-sink-<sink>-<table>``), and the ``write_commands``
  audit for every sink that can hold it where the topology has BACnet sources.

Each stage is its own consumer group, so more workers on the same topology share the partitions of each.
Any error that is not about the input stops the process at once without committing (:func:`fatal`); the
input is then read again from the last commit, which the idempotent state and writes absorb. SIGTERM and
SIGINT stop the stages cleanly: each makes its work durable and commits it before the process exits.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.kafka import client_config, ensure_compacted_topic
from pipeline.core.metrics import WorkerLimits, WorkerMetrics, start_server
from pipeline.stages.aggregation import Aggregation
from pipeline.stages.alerts.notify import Notify
from pipeline.stages.alerts.routing import AlertRouting
from pipeline.stages.alerts.stage import AlertStep, CommandRouting
from pipeline.stages.loops.stage import LoopRouting, LoopStats, LoopStep
from pipeline.stages.runtime import Stage
from pipeline.stages.sinks import SinkStep, topic_of
from pipeline.topology import Topology

log = logging.getLogger("plantstream.worker")
# Shared by every stage's clean stop (see Worker.stop).
STOP_TIMEOUT_S = 8.0


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
    duplicates: int = 0
    sink_rows: dict[str, int] = field(default_factory=dict)


@dataclass
class Worker:
    topo: Topology
    app_id: str
    stages: list[Stage]
    counters: Counters
    loop_stats: LoopStats | None = None

    def start(self) -> None:
        for s in self.stages:
            s.start()
        for s in self.stages:
            s.ready.wait(30)
        log.info("worker ready: %s", ", ".join(s.name for s in self.stages))

    def stop(self, timeout: float = 30.0) -> None:
        """All stages stop at once and share one deadline (``run`` gives :data:`STOP_TIMEOUT_S`, within a
        service manager's usual 10 s grace). A stage still busy then (a long database retry) is left
        without committing: its input is read again on restart."""
        for s in self.stages:
            s.stopping.set()
        deadline = time.monotonic() + timeout
        for s in self.stages:
            if s.is_alive():
                s.join(max(0.0, deadline - time.monotonic()))
        late = [s.name for s in self.stages if s.is_alive()]
        if late:
            log.warning(
                "worker: stage(s) %s did not stop within %.0f s; their input is read again", late, timeout
            )

    def alive(self) -> bool:
        return all(s.is_alive() for s in self.stages)


def build_worker(topo: Topology, app_id: str | None = None, *, with_sinks: bool = True) -> Worker:
    app_id = app_id or topo.app_id
    bootstrap = client_config(topo.broker)
    counters = Counters()
    stages: list[Stage] = []
    routing: LoopRouting | None = None
    stats: LoopStats | None = None
    if topo.loops:
        stats = LoopStats()
        routing = LoopRouting(topo.loop_samples_topic, topo.loops, stats)
    alert_routing = AlertRouting(topo.alert_samples_topic, topo.alerts.rules) if topo.alerts.rules else None
    aggregation = Aggregation(topo, app_id, counters, routing, alert_routing)
    state_topics = [aggregation.state_topic] + ([f"{app_id}-loop-state"] if topo.loops else [])
    state_topics += [f"{app_id}-alerts-state"] if topo.alerts.rules else []
    for name in state_topics:  # compacted, one partition per input partition
        ensure_compacted_topic(bootstrap, name, topo.broker.partitions, topo.broker.replication)
    stages.append(
        Stage(
            "aggregation",
            bootstrap=bootstrap,
            group=f"{app_id}-aggregate",
            topic=topo.raw_topic,
            step=aggregation,
            fatal=fatal,
            dlq_topic=topo.dlq_topic,
            checkpoint_interval=topo.aggregates.checkpoint_interval / 1000,
            batch_size=2000,  # the fold's numpy steps cost per batch: bigger batches, fewer steps per reading
            consumer_conf={"fetch.max.bytes": 16 * 2**20, "max.partition.fetch.bytes": 8 * 2**20},
        )
    )
    if topo.loops and stats is not None:
        stages.append(
            Stage(
                "loops",
                bootstrap=bootstrap,
                group=f"{app_id}-loops",
                topic=topo.loop_samples_topic,
                step=LoopStep(topo, topo.loops, app_id, counters, stats, alert_routing),
                fatal=fatal,
                dlq_topic=topo.dlq_topic,
                checkpoint_interval=1.0,
                batch_size=100,
            )
        )
    if topo.alerts.rules:
        stages.append(
            Stage(
                "alerts",
                bootstrap=bootstrap,
                group=f"{app_id}-alerts",
                topic=topo.alert_samples_topic,
                step=AlertStep(topo, topo.alerts.rules, app_id, counters),
                fatal=fatal,
                dlq_topic=topo.dlq_topic,
                checkpoint_interval=1.0,
                # Sparse input, latency-bound output: a batch waits 20 ms for company, not 100.
                batch_wait=0.02,
            )
        )
        stages.append(
            Stage(
                "alert commands",
                bootstrap=bootstrap,
                group=f"{app_id}-alert-commands",
                topic=topo.alerts_commands_topic,
                step=CommandRouting(topo, counters),
                fatal=fatal,
                dlq_topic=topo.dlq_topic,
                checkpoint_interval=0.0,
                batch_size=100,
            )
        )
    for sub in topo.alerts.subscribers:
        stages.append(
            Stage(
                f"notify {sub.id}",
                bootstrap=bootstrap,
                group=f"{app_id}-notify-{sub.id}",
                topic=topo.alerts_events_topic,
                step=Notify(topo, sub, topo.alerts.rules, counters),
                fatal=fatal,
                dlq_topic=topo.dlq_topic,
                checkpoint_interval=0.0,
                batch_size=100,
                batch_wait=0.02,
                tick_interval=0.0,
            )
        )
    if with_sinks:
        for sink in topo.sinks:
            first = sink.open_writer(f"{app_id}/{sink.id}")  # each table's stage has a writer of its own
            for i, table in enumerate(topo.sink_tables(sink, first.tables)):
                writer = first if i == 0 else sink.open_writer(f"{app_id}/{sink.id}")
                stages.append(
                    Stage(
                        f"sink {sink.id}/{table}",
                        bootstrap=bootstrap,
                        group=f"{app_id}-sink-{sink.id}-{table}",
                        topic=topic_of(topo, table),
                        step=SinkStep(topo, sink, table, writer, counters),
                        fatal=fatal,
                        dlq_topic=topo.dlq_topic,
                        checkpoint_interval=0.0,
                        batch_size=sink.batch_size,
                        batch_wait=sink.batch_delay / 1000,
                        tick_interval=0.0,
                    )
                )
    return Worker(topo, app_id, stages, counters, stats)


def observe(worker: Worker) -> WorkerMetrics:
    """The worker's Prometheus metrics and health (pipeline/core/metrics.py); before :meth:`Worker.start`,
    so every dead letter is counted."""
    m = worker.topo.metrics.worker
    limits = WorkerLimits(m.checkpoint_stale_factor, m.checkpoint_stale_min / 1000, m.sink_stuck_after / 1000)
    return WorkerMetrics(list(worker.stages), worker.counters, worker.loop_stats, limits)


def run(topo: Topology, app_id: str | None = None, metrics: str | None = None) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly (every stage durable and committed). ``metrics``:
    where /metrics and /health listen (default: the topology's ``metrics.worker.listen``)."""
    worker = build_worker(topo, app_id)
    observed = observe(worker)
    server = start_server(metrics or topo.metrics.worker.listen, observed.registry, observed.health, "worker")
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("worker: %s received, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The state is many long-lived small objects (series, chunks, devices) that the collector's default
    # thresholds scan again and again on a busy stream (~30 % of decoding time measured here): collections
    # become rarer, not off, and what exists at start-up is never scanned.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    worker.start()
    while not stop.wait(0.5):
        if not worker.alive():  # a stage that ends by itself has called fatal(); this is a safeguard
            fatal("a stage stopped", RuntimeError("stage thread ended"))
    worker.stop(STOP_TIMEOUT_S)
    if server is not None:
        server.close()
    c = worker.counters
    log.info(
        "worker stopped: %d messages, %d readings, %d aggregates, %d late, %d rejected, sink rows %s",
        c.messages,
        c.readings,
        c.closed,
        c.late,
        c.rejected,
        c.sink_rows,
    )

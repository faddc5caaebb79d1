"""The worker: a Faust application with the sink and loop-KPI agents, and the aggregation stage.

The agents only move data; the logic lives in :mod:`pipeline.aggregate` (pure) and the sink writers in
``connectors/<database>/``. Any error that is not about the input (broker or state trouble) stops the
worker at once without committing: the input is then read again from the last committed offset, which
the idempotent state and writes absorb. Letting the exception reach Faust would ack the message and lose it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
import mode

from pipeline.topology import Topology

log = logging.getLogger("plantstream.worker")

HEARTBEAT_KEY = b"\x00heartbeat"  # the loop agent's idle heartbeats on loops.samples


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
    sink_rows: dict[str, int] = field(default_factory=dict)


def build_app(
    topo: Topology,
    *,
    app_id: str | None = None,
    store: str = "memory://",
    datadir: str | Path | None = None,
    with_sinks: bool = True,
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
        # Sends are flushed by Faust before each offset commit.
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
        web_enabled=False,
    )
    # Table writes queue in the producer's buffer (default 100 messages, then every write waits).
    app.producer.buffer.max_messages = 20_000
    counters = Counters()
    app.plantstream_counters = counters  # type: ignore[attr-defined]

    from pipeline.aggregation import Aggregation
    from pipeline.loops_agent import attach_loops  # loop KPIs: their agents; the aggregation routes to them

    loops = attach_loops(app, topo, counters, fatal)
    aggregation = Aggregation(topo, app_id, counters, fatal, loops)
    app.plantstream_engine = aggregation.engine  # type: ignore[attr-defined]

    @app.task
    async def start_aggregation() -> None:
        aggregation.start()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def stop_aggregation(sender: Any, **kwargs: Any) -> None:
        # Checkpoints and commits what it handled, so a restart resumes exactly there.
        await asyncio.to_thread(aggregation.stop)

    if with_sinks:
        from pipeline.sinks import attach_sinks

        attach_sinks(app, topo, counters, fatal)
    return app

"""Prometheus metrics and health of a plantstream process: one small HTTP server per process.

``GET /metrics`` answers in the Prometheus text format; ``GET /health`` answers JSON
``{"status": "ok"|"degraded"|"down", "checks": {...}}``, HTTP 200 when ok and 503 otherwise.

The worker handles hundreds of thousands of readings a second, so nothing here runs per reading: the
collectors read the counters the stages, sinks and sources keep anyway, at scrape time. What is counted
here itself happens per dead letter, per sink batch or per log warning, never per reading.

The worker side knows stages, sink writers and source runners only by the attributes it reads
(:class:`StageLike`, :class:`RunnerLike`), because this module sits below them (pipeline.core).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("plantstream.metrics")

Metric = CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
Check = dict[str, Any]
HealthFn = Callable[[], dict[str, Check]]

OK, DEGRADED, DOWN = "ok", "degraded", "down"
_RANK = {OK: 0, DEGRADED: 1, DOWN: 2}

# Sink batch latency buckets (seconds): a batch is a COPY and an upsert, milliseconds when well, up to the
# writer's retries (10 s apart) when the database is away.
SINK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A dead-letter reason is "<kind>: <details>"; only the kind becomes a label (bounded cardinality).
_REASON = re.compile(r"^([a-z][a-z0-9_ -]{0,31}?)\s*:")
# librdkafka's queue.buffering.max.messages of the connectors' producer (connectors/common/producer.py).
CONNECTOR_QUEUE_LIMIT = 200_000


# -- addresses ----------------------------------------------------------------------------------------------


def parse_listen(value: str, what: str = "") -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port``; port 0 picks a free one) or ``off`` → (host, port) or None."""
    v = value.strip()
    if v.lower() in ("off", "none", "false", "no", ""):
        return None
    host, sep, port = v.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(
            f"{what + ': ' if what else ''}{value!r} is not an address to listen on; write HOST:PORT such "
            "as 127.0.0.1:9464 (port 0 picks a free port) or 'off'"
        )
    return host, int(port)


def reason_kind(reason: str) -> str:
    """``late: window ending …`` → ``late``; a reason without a short ``kind:`` prefix is ``other``."""
    m = _REASON.match(reason.lower())
    return m.group(1).strip().replace(" ", "_").replace("-", "_") if m else "other"


# -- the server ---------------------------------------------------------------------------------------------


def overall(checks: Mapping[str, Check]) -> str:
    """The worst status of the checks (ok when there are none)."""
    worst = OK
    for c in checks.values():
        s = c.get("status", OK)
        if _RANK.get(s, 2) > _RANK[worst]:
            worst = s if s in _RANK else DOWN
    return worst


def health_body(checks: dict[str, Check]) -> tuple[int, dict[str, Any]]:
    status = overall(checks)
    return (200 if status == OK else 503), {"status": status, "checks": checks}


class MetricsServer:
    """``/metrics`` and ``/health`` on their own port, served from a daemon thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: HealthFn) -> None:
        self.registry, self.health = registry, health
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(outer.registry))
                elif path == "/health":
                    try:
                        code, body = health_body(outer.health())
                    except Exception as e:  # a check that breaks says so, it does not kill the server
                        log.exception("health check failed")
                        code, body = 503, {"status": DOWN, "error": repr(e)}
                    self._send(code, "application/json", json.dumps(body).encode())
                else:
                    self._send(404, "text/plain", b"not found: try /metrics or /health\n")

            def _send(self, code: int, ctype: str, data: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes every 15 s: not worth a line
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self._server = Server((host, port), Handler)
        self.host, self.port = host, int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_server(
    listen: str, registry: CollectorRegistry, health: HealthFn, what: str
) -> MetricsServer | None:
    """The server on ``listen`` (or None for ``off``). A port already taken does not stop the process: it
    runs on without metrics, and says how to give it a port of its own."""
    addr = parse_listen(listen)
    if addr is None:
        return None
    try:
        server = MetricsServer(addr[0], addr[1], registry, health)
    except OSError as e:
        log.error(
            "%s: cannot serve metrics on %s (%s); running without /metrics and /health. Give each process "
            "its own port with --metrics HOST:PORT (port 0 picks a free one) or the topology's "
            "metrics.%s.listen, or 'off'",
            what,
            listen,
            e.strerror or e,
            what,
        )
        return None
    log.warning("%s: metrics on %s/metrics, health on %s/health", what, server.url, server.url)
    return server


def new_registry() -> CollectorRegistry:
    """A registry of our own (not the library's global one): several in one process in tests."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


# -- generic pieces -----------------------------------------------------------------------------------------


class FnCollector(Collector):
    """A collector whose metrics a function makes at scrape time."""

    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self.fn = fn

    def collect(self) -> Iterator[Metric]:
        yield from self.fn()


def numeric_fields(obj: Any) -> dict[str, float]:
    """Every numeric field of a counters object (a dataclass, a dict or a plain object); booleans not."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items: Iterable[tuple[str, Any]] = (
            (f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj)
        )
    elif isinstance(obj, Mapping):
        items = list(obj.items())
    else:
        items = list(getattr(obj, "__dict__", {}).items())
    return {
        str(k): float(v)
        for k, v in items
        if isinstance(v, int | float) and not isinstance(v, bool) and not str(k).startswith("_")
    }


class LogCounter(logging.Handler):
    """Counts warnings and errors by level and logger: the process's trouble, whatever its kind."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[tuple[str, str], int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = (record.levelname.lower(), record.name)
        self.counts[key] = self.counts.get(key, 0) + 1

    def metrics(self) -> Iterator[Metric]:
        m = CounterMetricFamily(
            "plantstream_log_messages",
            "Log messages at warning level and above, by level and logger",
            labels=["level", "logger"],
        )
        for (level, name), n in sorted(self.counts.copy().items()):
            m.add_metric([level, name], n)
        yield m


def count_logs(registry: CollectorRegistry) -> LogCounter:
    counter = LogCounter()
    logging.getLogger("plantstream").addHandler(counter)
    registry.register(FnCollector(counter.metrics))
    return counter


class Timings:
    """A histogram kept as plain cumulative buckets: observed from one thread, read at scrape time."""

    def __init__(self, buckets: tuple[float, ...] = SINK_BUCKETS) -> None:
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), list(self.counts), strict=True):
            total += n
            out.append((bound, float(total)))
        return out


# -- the worker ---------------------------------------------------------------------------------------------


class StageLike(Protocol):
    """What the worker's metrics read of a stage (pipeline.stages.runtime.Stage)."""

    name: str
    topic: str
    consumer: Any
    outbox: Any
    step: Any
    checkpoint_interval: float
    position: dict[int, int]
    committed: dict[int, int]
    owned: set[int]
    last_checkpoint: dict[int, float]
    ready: threading.Event

    def is_alive(self) -> bool: ...


class TimedWriter:
    """A sink writer whose batches are timed and whose rows are counted, per sink and table."""

    def __init__(self, inner: Any, sink: str, table: str) -> None:
        self.inner, self.sink, self.table = inner, sink, table
        self.timings = Timings()
        self.rows = 0
        self.refused = 0
        self.batches = 0
        self.writing_since: float | None = None  # monotonic start of the write in progress

    def __getattr__(self, name: str) -> Any:  # tables, deploy, forget, close: the writer's own
        return getattr(self.inner, name)

    async def write(self, table: str, topic: str, entries: Any) -> Any:
        start = self.writing_since = time.monotonic()
        try:
            result = await self.inner.write(table, topic, entries)
        finally:
            self.writing_since = None
        self.timings.observe(time.monotonic() - start)
        self.batches += 1
        self.rows += int(result.written)
        self.refused += len(result.refused)
        return result


@dataclasses.dataclass(frozen=True)
class WorkerLimits:
    """When the worker's health degrades (the topology's ``metrics.worker``)."""

    checkpoint_stale_factor: float = 10.0
    checkpoint_stale_min_s: float = 30.0
    sink_stuck_after_s: float = 60.0

    def checkpoint_limit(self, interval_s: float) -> float:
        return max(self.checkpoint_stale_factor * interval_s, self.checkpoint_stale_min_s)


class WorkerMetrics:
    """The worker's collectors and health, over its stages and shared counters."""

    def __init__(
        self,
        stages: list[StageLike],
        counters: Any,
        loop_stats: Any = None,
        limits: WorkerLimits | None = None,
    ) -> None:
        self.stages, self.counters, self.loop_stats = stages, counters, loop_stats
        self.limits = limits or WorkerLimits()
        self.dlq: dict[tuple[str, str], int] = {}
        self.writers: list[TimedWriter] = []
        for stage in stages:
            self._count_dead_letters(stage)
            step = stage.step
            if hasattr(step, "writer") and hasattr(step, "sink") and hasattr(step, "table"):
                if not isinstance(step.writer, TimedWriter):
                    step.writer = TimedWriter(step.writer, step.sink.id, step.table)
                self.writers.append(step.writer)
        self.registry = new_registry()
        self.registry.register(FnCollector(self.collect))
        self.logs = count_logs(self.registry)

    def close(self) -> None:
        logging.getLogger("plantstream").removeHandler(self.logs)

    def _count_dead_letters(self, stage: StageLike) -> None:
        """Every dead letter a stage sends goes through its outbox: counted there by reason kind."""
        outbox, dlq, name = stage.outbox, self.dlq, stage.name
        send = outbox.dead_letter
        if getattr(send, "counted", False):
            return

        def dead_letter(dlq_topic: str, source: str, reason: str, payload: Any, **kw: Any) -> bool:
            sent = send(dlq_topic, source, reason, payload, **kw)
            if sent:  # not one already sent before a crash
                key = (name, reason_kind(reason))
                dlq[key] = dlq.get(key, 0) + 1
            return sent

        dead_letter.counted = True  # type: ignore[attr-defined]
        # An instance attribute in front of the method: no change to the Outbox or to the steps.
        setattr(outbox, "dead_letter", dead_letter)  # noqa: B010

    # -- metrics ------------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        c = self.counters

        # These counters are the aggregation stage's alone (the Counters of pipeline/worker.py).
        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            m = CounterMetricFamily(name, doc, labels=["stage"])
            m.add_metric(["aggregation"], value)
            return m

        yield counter("plantstream_messages", "Input messages (ReadingBatches) read", c.messages)
        yield counter("plantstream_readings_in", "Readings accepted into 1-minute windows", c.readings)
        yield counter("plantstream_aggregates_out", "1-minute aggregates closed and produced", c.closed)
        yield counter(
            "plantstream_duplicate_readings", "Readings already applied (replays), ignored", c.duplicates
        )
        yield counter("plantstream_replayed_messages", "Messages skipped as already applied", c.skipped)
        late = CounterMetricFamily(
            "plantstream_late_readings", "Readings whose window had closed (aggregation and loop stages)"
        )
        late.add_metric([], c.late)
        yield late

        dlq = CounterMetricFamily(
            "plantstream_dlq", "Dead letters sent, by stage and reason kind", labels=["stage", "reason"]
        )
        for (stage, reason), n in sorted(self.dlq.copy().items()):
            dlq.add_metric([stage, reason], n)
        yield dlq

        yield from self._stage_metrics()
        yield from self._sink_metrics()
        if self.loop_stats is not None:
            for field, value in numeric_fields(self.loop_stats).items():
                m = CounterMetricFamily(f"plantstream_loops_{field}", f"Loop stage counter {field}")
                m.add_metric([], value)
                yield m

    def _stage_metrics(self) -> Iterator[Metric]:
        now = time.monotonic()
        up = GaugeMetricFamily("plantstream_stage_up", "1 while the stage's thread runs", labels=["stage"])
        parts = GaugeMetricFamily(
            "plantstream_assigned_partitions", "Input partitions assigned to the stage", labels=["stage"]
        )
        age = GaugeMetricFamily(
            "plantstream_checkpoint_age_seconds",
            "Seconds since the oldest last durable checkpoint (state made durable and offsets committed) "
            "of the stage's partitions that have input",
            labels=["stage"],
        )
        poll = GaugeMetricFamily(
            "plantstream_poll_age_seconds",
            "Seconds since the stage last polled its consumer",
            labels=["stage"],
        )
        lag = GaugeMetricFamily(
            "plantstream_consumer_lag",
            "Messages in the input partition after the stage's position (cached high watermark)",
            labels=["stage", "partition"],
        )
        out = CounterMetricFamily(
            "plantstream_records_out",
            "Records the stage produced (all topics, state included)",
            labels=["stage"],
        )
        blind = GaugeMetricFamily(
            "plantstream_broker_unreachable",
            "1 while the stage cannot reach the broker (it waits; idle closes are held)",
            labels=["stage"],
        )
        for s in self.stages:
            up.add_metric([s.name], 1.0 if s.is_alive() else 0.0)
            blind.add_metric([s.name], 1.0 if getattr(s, "blind", False) is True else 0.0)
            parts.add_metric([s.name], len(s.owned))
            a = checkpoint_age(s, now)
            if a is not None:
                age.add_metric([s.name], a)
            last_poll = getattr(s, "last_poll", None)
            if isinstance(last_poll, float):
                poll.add_metric([s.name], max(0.0, now - last_poll))
            for p, n in stage_lag(s).items():
                lag.add_metric([s.name, str(p)], n)
            out.add_metric([s.name], getattr(s.outbox, "produced", 0))
        yield from (up, parts, age, poll, lag, out, blind)

    def _sink_metrics(self) -> Iterator[Metric]:
        labels = ["sink", "table"]
        hist = HistogramMetricFamily(
            "plantstream_sink_batch_seconds",
            "Time to write one batch (rows and offsets in one durable step, retries included)",
            labels=labels,
        )
        rows = CounterMetricFamily("plantstream_sink_rows", "Rows written", labels=labels)
        refused = CounterMetricFamily(
            "plantstream_sink_refused", "Entries refused (to the DLQ)", labels=labels
        )
        writing = GaugeMetricFamily(
            "plantstream_sink_write_seconds",
            "Seconds the write in progress has been running (0 when none): a database outage shows here",
            labels=labels,
        )
        now = time.monotonic()
        for w in self.writers:
            key = [w.sink, w.table]
            hist.add_metric(key, w.timings.buckets(), w.timings.sum)
            rows.add_metric(key, w.rows)
            refused.add_metric(key, w.refused)
            since = w.writing_since
            writing.add_metric(key, 0.0 if since is None else max(0.0, now - since))
        yield from (hist, rows, refused, writing)

    # -- health -------------------------------------------------------------------------------------
    def health(self) -> dict[str, Check]:
        now = time.monotonic()
        checks: dict[str, Check] = {}
        for s in self.stages:
            c: Check = {"status": OK, "partitions": sorted(s.owned)}
            problems = []
            limit = self.limits.checkpoint_limit(s.checkpoint_interval)
            if not s.is_alive():
                c["status"] = DOWN
                problems.append("the stage's thread has ended")
            elif not s.ready.is_set():
                c["status"] = DEGRADED
                problems.append("not subscribed yet")
            a = checkpoint_age(s, now)
            if a is not None:
                c["checkpoint_age_s"] = round(a, 3)
                if a > limit:
                    problems.append(f"last checkpoint {a:.0f} s ago (limit {limit:.0f} s)")
            last_poll = getattr(s, "last_poll", None)
            if isinstance(last_poll, float):
                c["poll_age_s"] = round(now - last_poll, 3)
                if now - last_poll > limit:
                    problems.append(f"consumer not polled for {now - last_poll:.0f} s (limit {limit:.0f} s)")
            if getattr(s, "blind", False) is True:
                problems.append("the broker is out of reach (waiting for it)")
            w = getattr(s.step, "writer", None)
            if isinstance(w, TimedWriter) and w.writing_since is not None:
                busy = now - w.writing_since
                c["write_s"] = round(busy, 3)
                if busy > self.limits.sink_stuck_after_s:
                    problems.append(
                        f"one batch has been writing for {busy:.0f} s (retrying; limit "
                        f"{self.limits.sink_stuck_after_s:.0f} s)"
                    )
            if problems:
                c["problems"] = problems
                if c["status"] == OK:
                    c["status"] = DEGRADED
            checks[f"stage {s.name}"] = c
        return checks


def checkpoint_age(stage: StageLike, now: float) -> float | None:
    """Age of the oldest last checkpoint among the partitions that had input since their assignment (an
    assigned partition that never had any has nothing to checkpoint)."""
    last = stage.last_checkpoint.copy()
    ages = [now - last[p] for p in list(stage.position) if p in last]
    return max(ages) if ages else None


def stage_lag(stage: StageLike) -> dict[int, int]:
    """Per owned partition: high watermark (librdkafka's cached one, no broker request) minus the position
    (the next offset the stage handles; its committed offset before it has handled any)."""
    from confluent_kafka import TopicPartition

    out: dict[int, int] = {}
    position = stage.position.copy()
    for p in sorted(stage.owned.copy()):
        try:
            _low, high = stage.consumer.get_watermark_offsets(TopicPartition(stage.topic, p), cached=True)
            pos = position.get(p)
            if pos is None:
                pos = stage.committed.get(p)
            if pos is None:
                pos = stage.consumer.position([TopicPartition(stage.topic, p)])[0].offset
        except Exception:  # closed or not fetched yet: no figure rather than a wrong one
            continue
        if high is None or high < 0 or pos is None or pos < 0:
            continue
        out[p] = max(0, high - pos)
    return out


# -- the connectors -----------------------------------------------------------------------------------------


class RunnerLike(Protocol):
    cfg: Any
    stats: Any
    producer: Any


ERRORISH = re.compile(r"(errors?|failures?|malformed)$")


class SourceMetrics:
    """``plantstream connect``: every numeric counter of each source's stats, and the producers'."""

    def __init__(
        self,
        runners: list[RunnerLike],
        threads: Mapping[str, threading.Thread] | None = None,
        queue_limit: int = CONNECTOR_QUEUE_LIMIT,
    ) -> None:
        self.runners, self.threads, self.queue_limit = runners, dict(threads or {}), queue_limit
        self.registry = new_registry()
        self.registry.register(FnCollector(self.collect))
        self.logs = count_logs(self.registry)

    def close(self) -> None:
        logging.getLogger("plantstream").removeHandler(self.logs)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily] = {}
        errors = CounterMetricFamily(
            "plantstream_errors",
            "Errors by source and kind (the sources' error counters)",
            labels=["source", "kind"],
        )
        connected = GaugeMetricFamily(
            "plantstream_source_connected", "1 while the source is connected to its server", labels=["source"]
        )
        queue = GaugeMetricFamily(
            "plantstream_producer_queue_messages",
            "Records waiting in the source's Kafka producer queue",
            labels=["source"],
        )
        producer_fams = {
            name: CounterMetricFamily(f"plantstream_producer_{name}", doc, labels=["source"])
            for name, doc in (
                ("batches", "ReadingBatches the broker acknowledged"),
                ("readings", "Readings in acknowledged batches"),
                ("dead_letters", "Dead letters the broker acknowledged"),
                ("errors", "Records the broker did not take"),
            )
        }
        for r in self.runners:
            sid = str(r.cfg.id)
            for field, value in numeric_fields(r.stats).items():
                fam = families.get(field)
                if fam is None:
                    fam = families[field] = GaugeMetricFamily(
                        f"plantstream_source_{field}", f"Source counter {field}", labels=["source"]
                    )
                fam.add_metric([sid], value)
                if ERRORISH.search(field):
                    errors.add_metric([sid, field], value)
            p = r.producer
            for attr, name in (
                ("sent_batches", "batches"),
                ("sent_readings", "readings"),
                ("dead_letters", "dead_letters"),
                ("errors", "errors"),
            ):
                n = getattr(p, attr, None)
                if isinstance(n, int):
                    producer_fams[name].add_metric([sid], n)
            if isinstance(getattr(p, "errors", None), int):
                errors.add_metric([sid, "delivery"], p.errors)
            c = source_connected(r)
            if c is not None:
                connected.add_metric([sid], 1.0 if c else 0.0)
            q = producer_queue(r)
            if q is not None:
                queue.add_metric([sid], q)
        yield from families.values()
        yield from producer_fams.values()
        yield from (errors, connected, queue)

    def health(self) -> dict[str, Check]:
        checks: dict[str, Check] = {}
        for r in self.runners:
            sid = str(r.cfg.id)
            c: Check = {"status": OK, "type": getattr(r.cfg, "type", None)}
            th = self.threads.get(sid)
            conn = source_connected(r)
            q = producer_queue(r)
            if conn is not None:
                c["connected"] = conn
            if q is not None:
                c["producer_queue"] = q
            if th is not None and not th.is_alive():
                c["status"] = DOWN
                c["problem"] = "the source's thread has ended"
            elif conn is False:
                c["status"] = DEGRADED
                c["problem"] = "not connected (reconnecting)"
            elif q is not None and q >= 0.9 * self.queue_limit:
                c["status"] = DEGRADED
                c["problem"] = (
                    f"the producer queue is nearly full ({q} of {self.queue_limit}): Kafka is slow or away"
                )
            checks[f"source {sid}"] = c
        return checks


def source_connected(runner: Any) -> bool | None:
    """Connected to its server, where the source can tell (MQTT and OPC UA: ``wait_connected``)."""
    wait = getattr(runner, "wait_connected", None)
    if not callable(wait):
        return None
    try:
        return bool(wait(0))
    except Exception:
        return None


def producer_queue(runner: Any) -> int | None:
    """Records in librdkafka's queue of the source's producer (``len()`` of the confluent-kafka Producer
    inside :class:`~connectors.common.producer.TelemetryProducer`'s Outbox)."""
    out = getattr(runner.producer, "_out", None)
    p = getattr(out, "_p", None)
    try:
        return len(p) if p is not None else None
    except Exception:
        return None


# -- the HTTP API -------------------------------------------------------------------------------------------


class ApiMetrics:
    """``plantstream serve``: requests by route template, method and status, and their latency."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.registry = new_registry()
        self.requests = Counter(
            "plantstream_api_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "plantstream_api_request_seconds",
            "Time to the response's start (for the live stream: to its first bytes), by route and method",
            ["route", "method"],
            registry=self.registry,
        )
        self.logs = count_logs(self.registry)

    def close(self) -> None:
        logging.getLogger("plantstream").removeHandler(self.logs)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """Pure ASGI middleware (no buffering of streamed answers) feeding :class:`ApiMetrics`."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = [500]
        timed = [False]

        async def sending(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.start":
                status[0] = int(message.get("status", 500))
                timed[0] = True
                self._observe(scope, time.monotonic() - start)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if not timed[0]:
                self._observe(scope, time.monotonic() - start)
            self.metrics.requests.labels(self._route(scope), scope.get("method", ""), str(status[0])).inc()

    def _observe(self, scope: dict[str, Any], seconds: float) -> None:
        self.metrics.latency.labels(self._route(scope), scope.get("method", "")).observe(seconds)

    @staticmethod
    def _route(scope: dict[str, Any]) -> str:
        # The route's template (/api/series/{series:path}/aggregates), never the path itself: bounded labels.
        route = scope.get("route")
        return str(getattr(route, "path", None) or "unmatched")

"""Metrics and health (pipeline/core/metrics.py) without services: addresses, the server, the worker's and
the sources' collectors over stand-in stages and runners, and the operations dashboard's PromQL against
the names the collectors export."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from connectors.mqtt.source import Stats as MqttStats
from pipeline.core.metrics import (
    ApiMetrics,
    MetricsServer,
    SourceMetrics,
    WorkerLimits,
    WorkerMetrics,
    parse_listen,
    reason_kind,
)
from pipeline.topology import TopologyError, validate_data

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "dashboards" / "operations.json"


def test_listen_addresses():
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("off") is None
    for bad in ("9464", "host:", "host:99999", "host:port"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad, "--metrics")


def test_topology_metrics_block_names_the_field():
    topo = validate_data({"name": "m"})
    assert (topo.metrics.worker.listen, topo.metrics.connect.listen) == ("127.0.0.1:9464", "127.0.0.1:9465")
    with pytest.raises(TopologyError) as e:
        validate_data({"name": "m", "metrics": {"connect": {"listen": "localhost"}}})
    assert "metrics.connect.listen" in str(e.value) and "HOST:PORT" in str(e.value)


def test_reason_kinds_are_the_prefix():
    assert reason_kind("late: window ending 1 already closed") == "late"
    assert reason_kind("invalid: value is not a number") == "invalid"
    assert reason_kind("malformed: not JSON (x)") == "malformed"
    assert reason_kind("invalid ReadingBatch: KeyError('site')") == "invalid_readingbatch"
    assert reason_kind("no colon here") == "other"
    assert reason_kind("x" * 80 + ": long") == "other"


# -- stand-ins for a stage, its consumer, outbox and sink writer ---------------------------------------------


class FakeConsumer:
    def __init__(self, high: dict[int, int]) -> None:
        self.high = high

    def get_watermark_offsets(self, tp: Any, cached: bool = False) -> tuple[int, int]:
        assert cached  # the scrape must not ask the broker
        return 0, self.high.get(tp.partition, -1001)

    def position(self, tps: list[Any]) -> list[Any]:
        return [type("TP", (), {"offset": 3})() for _ in tps]


class FakeOutbox:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.produced = 0

    def dead_letter(self, dlq_topic: str, source: str, reason: str, payload: Any, **kw: Any) -> bool:
        if reason.startswith("sent before"):  # one a predecessor sent already: not sent again
            return False
        self.sent.append(reason)
        return True


@dataclass
class Result:
    written: int
    refused: list[Any] = field(default_factory=list)


class FakeWriter:
    tables = frozenset({"agg_1m"})

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None

    async def write(self, table: str, topic: str, entries: Any) -> Result:
        return Result(written=len(entries), refused=["r"])

    def forget(self, partitions: list[int]) -> None:
        pass


class FakeSinkStep:
    def __init__(self) -> None:
        self.writer: Any = FakeWriter()
        self.sink = type("Sink", (), {"id": "pg"})()
        self.table = "agg_1m"


class FakeStage:
    def __init__(self, name: str, step: Any = None, interval: float = 1.0) -> None:
        self.name, self.topic = name, "t.telemetry.raw"
        self.consumer = FakeConsumer({0: 10, 1: 5})
        self.outbox = FakeOutbox()
        self.step = step or object()
        self.checkpoint_interval = interval
        self.position: dict[int, int] = {0: 7}
        self.committed: dict[int, int] = {}
        self.owned = {0, 1}
        self.last_checkpoint: dict[int, float] = {}
        self.ready = threading.Event()
        self.ready.set()
        self.alive = True
        self.last_poll: float | None = None

    def is_alive(self) -> bool:
        return self.alive


@dataclass
class Counters:
    messages: int = 4
    readings: int = 40
    rejected: int = 0
    late: int = 2
    closed: int = 3
    skipped: int = 0
    duplicates: int = 1
    sink_rows: dict[str, int] = field(default_factory=dict)


def samples(registry: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in registry.collect():
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def worker_metrics() -> tuple[WorkerMetrics, FakeStage, FakeStage]:
    import time

    agg = FakeStage("aggregation")
    sink = FakeStage("sink pg/agg_1m", FakeSinkStep(), interval=0.0)
    now = time.monotonic()
    agg.last_checkpoint = {0: now - 1.0, 1: now - 500.0}  # 1 had no input: not counted
    agg.last_poll = now
    m = WorkerMetrics([agg, sink], Counters(), limits=WorkerLimits(10, 30, 60))  # type: ignore[list-item]
    return m, agg, sink


def test_worker_collectors_read_counters_lag_checkpoints_and_sinks():
    m, agg, sink = worker_metrics()
    try:
        agg.outbox.dead_letter("dlq", "s", "late: window ending 1 already closed", b"")
        agg.outbox.dead_letter("dlq", "s", "invalid: bad", b"")
        agg.outbox.dead_letter("dlq", "s", "late: again", b"")
        agg.outbox.dead_letter("dlq", "s", "sent before: not counted", b"")
        assert agg.outbox.sent == [  # still sent, only counted on the way
            "late: window ending 1 already closed",
            "invalid: bad",
            "late: again",
        ]
        asyncio.run(sink.step.writer.write("agg_1m", "t", [1, 2, 3]))
        got = samples(m.registry)
        st = (("stage", "aggregation"),)
        assert got[("plantstream_readings_in_total", st)] == 40
        assert got[("plantstream_aggregates_out_total", st)] == 3
        assert got[("plantstream_late_readings_total", ())] == 2
        assert got[("plantstream_dlq_total", (("reason", "late"), ("stage", "aggregation")))] == 2
        assert got[("plantstream_dlq_total", (("reason", "invalid"), ("stage", "aggregation")))] == 1
        assert got[("plantstream_consumer_lag", (("partition", "0"), ("stage", "aggregation")))] == 3
        assert got[("plantstream_consumer_lag", (("partition", "1"), ("stage", "aggregation")))] == 2
        assert 0.9 < got[("plantstream_checkpoint_age_seconds", st)] < 100
        pg = (("sink", "pg"), ("table", "agg_1m"))
        assert got[("plantstream_sink_rows_total", pg)] == 3
        assert got[("plantstream_sink_refused_total", pg)] == 1
        assert got[("plantstream_sink_batch_seconds_count", pg)] == 1
        assert got[("plantstream_stage_up", st)] == 1
    finally:
        m.close()


def test_worker_health_down_when_a_stage_thread_ended_and_degraded_when_a_sink_is_stuck():
    import time

    m, agg, sink = worker_metrics()
    try:
        assert {c["status"] for c in m.health().values()} == {"ok"}
        sink.step.writer.writing_since = time.monotonic() - 120  # a batch retrying for two minutes
        h = m.health()
        assert h["stage sink pg/agg_1m"]["status"] == "degraded"
        assert "writing for" in h["stage sink pg/agg_1m"]["problems"][0]
        agg.alive = False
        assert m.health()["stage aggregation"]["status"] == "down"
        agg.alive = True
        agg.last_checkpoint[0] = time.monotonic() - 31  # limit: max(10 * 1 s, 30 s)
        assert m.health()["stage aggregation"]["status"] == "degraded"
    finally:
        m.close()


def test_the_server_answers_metrics_and_health_with_their_status_codes():
    m, agg, _sink = worker_metrics()
    server = MetricsServer("127.0.0.1", 0, m.registry, m.health)
    try:
        assert server.port > 0
        r = httpx.get(f"{server.url}/metrics", timeout=10)
        assert r.status_code == 200 and "plantstream_readings_in_total" in r.text
        names = {f.name for f in text_string_to_metric_families(r.text)}
        assert {"plantstream_dlq", "plantstream_consumer_lag", "process_cpu_seconds"} <= names
        h = httpx.get(f"{server.url}/health", timeout=10)
        assert h.status_code == 200 and h.json()["status"] == "ok"
        agg.alive = False
        h = httpx.get(f"{server.url}/health", timeout=10)
        assert h.status_code == 503 and h.json()["status"] == "down"
        assert h.json()["checks"]["stage aggregation"]["problems"] == ["the stage's thread has ended"]
        assert httpx.get(f"{server.url}/nothing", timeout=10).status_code == 404
    finally:
        server.close()
        m.close()


# -- sources ----------------------------------------------------------------------------------------------


@dataclass
class SpoolStats(MqttStats):
    """The MQTT source's counters plus a spool's: new counters must appear without code changes."""

    spool_bytes: int = 0
    spool_records: int = 0
    spool_oldest_age_s: float = 0.0
    spool_dropped: int = 0
    spool_resent: int = 0


class FakeProducer:
    sent_batches, sent_readings, dead_letters, errors = 5, 50, 1, 2

    def __init__(self) -> None:  # TelemetryProducer's Outbox and its librdkafka producer (len: queued)
        self._out = type("Out", (), {"_p": [1, 2, 3]})()


class FakeRunner:
    def __init__(self, sid: str, connected: bool) -> None:
        self.cfg = type("Cfg", (), {"id": sid, "type": "mqtt"})()
        self.stats = SpoolStats(received=9, reconnects=2, delivery_errors=1, spool_bytes=4096)
        self.producer = FakeProducer()
        self.connected = connected

    def wait_connected(self, timeout: float) -> bool:
        return self.connected


def test_source_counters_are_exported_generically_with_the_source_label():
    a, b = FakeRunner("a", True), FakeRunner("b", False)
    m = SourceMetrics([a, b])  # type: ignore[list-item]
    try:
        got = samples(m.registry)
        assert got[("plantstream_source_spool_bytes", (("source", "a"),))] == 4096
        assert got[("plantstream_source_reconnects", (("source", "b"),))] == 2
        assert got[("plantstream_source_spool_oldest_age_s", (("source", "a"),))] == 0
        assert got[("plantstream_errors_total", (("kind", "delivery_errors"), ("source", "a")))] == 1
        assert got[("plantstream_errors_total", (("kind", "delivery"), ("source", "a")))] == 2
        assert got[("plantstream_producer_readings_total", (("source", "a"),))] == 50
        assert got[("plantstream_source_connected", (("source", "b"),))] == 0
        assert got[("plantstream_producer_queue_messages", (("source", "a"),))] == 3
        h = m.health()
        assert h["source a"]["status"] == "ok" and h["source b"]["status"] == "degraded"
    finally:
        m.close()


# -- the dashboard ----------------------------------------------------------------------------------------

PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "increase", "irate", "histogram_quantile",
    "le", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool", "topk",
}  # fmt: skip


def exported_names() -> set[str]:
    """Every sample name the worker's, the sources' and the API's collectors make (histograms: _bucket,
    _sum, _count; counters: _total)."""
    m, agg, sink = worker_metrics()
    asyncio.run(sink.step.writer.write("agg_1m", "t", [1]))
    agg.outbox.dead_letter("dlq", "s", "late: x", b"")
    s = SourceMetrics([FakeRunner("a", True)])  # type: ignore[list-item]
    api = ApiMetrics()
    api.requests.labels("/api/health", "GET", "200").inc()
    api.latency.labels("/api/health", "GET").observe(0.01)
    import logging

    logging.getLogger("plantstream.test").warning("counted")
    try:
        return {name for reg in (m.registry, s.registry, api.registry) for (name, _l) in samples(reg)}
    finally:
        m.close()
        s.close()
        api.close()


def test_every_dashboard_query_uses_exported_metrics_only():
    dashboard = json.loads(DASHBOARD.read_text())
    names = exported_names()
    exprs = [(p["title"], t["expr"]) for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    assert len(exprs) >= 15
    wanted = (
        "readings", "dlq", "late", "consumer_lag", "checkpoint_age", "sink_batch_seconds", "sink_rows",
        "spool_bytes", "spool_oldest", "reconnects", "errors",
    )  # fmt: skip
    everything = " ".join(e for _t, e in exprs)
    assert [w for w in wanted if w not in everything] == []
    unknown = []
    for title, expr in exprs:
        bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)  # label matchers, ranges, strings
        for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare):
            if word in PROMQL_WORDS or word in {"stage", "partition", "sink", "table", "source", "reason",
                                                "kind", "route", "status", "logger", "level"}:  # fmt: skip
                continue
            if word not in names:
                unknown.append(f"{title}: {word}")
    assert unknown == []
    ds = {"type": "prometheus", "uid": "plantstream-prometheus"}
    assert all(p["datasource"] == ds for p in dashboard["panels"] if p["type"] != "row")

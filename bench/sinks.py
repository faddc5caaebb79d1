"""The ``sinks`` scenario: aggregates/s and readings/s into each database sink, on the real servers.

One workload is produced once per run into fresh topics: ``--sink-series`` series x ``--sink-minutes``
minute aggregates on the aggregate topic (minute by minute, as the aggregation stage emits them) and
``--sink-readings`` readings in ReadingBatches of 50 points on the raw topic. Then, one after the other (the
order rotates with the repetition, so no backend always goes first), each backend's sink stage (the
worker's own :class:`pipeline.stages.sinks.SinkStep` in a :class:`pipeline.stages.runtime.Stage`, in this
process) consumes one table's topic from the beginning; the clock runs from its start to the moment its
consumer group has committed the whole topic, i.e. the database acknowledged every row. The rows are
counted in the database afterwards (a run that wrote less fails). Backends: plain PostgreSQL, TimescaleDB
(when the extension is there), InfluxDB 1.x API (Debian's 1.6) and the 2.x API (InfluxDB 1.8).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition

from connectors.influx.api import V1Api, open_api
from connectors.timescale import tenancy
from connectors.timescale.schema import timescale_status
from localservices import harness as services
from pipeline.core import codec
from pipeline.deploy import ensure_topics
from pipeline.stages.runtime import Stage
from pipeline.stages.sinks import SinkStep, topic_of
from pipeline.topology import Topology, validate_data

T0 = 1_767_225_600_000
POINTS = 50
BACKENDS = ("postgres", "timescaledb", "influx-v1", "influx-v2")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sink-series", type=int, default=2000, help="series of the sinks scenario")
    ap.add_argument("--sink-minutes", type=int, default=60, help="minutes of aggregates per series")
    ap.add_argument("--sink-readings", type=int, default=500_000, help="raw readings of the sinks scenario")
    ap.add_argument("--sink-backends", default=",".join(BACKENDS), help=", ".join(BACKENDS))


def _sink(backend: str, tag: str, env: dict[str, str], urls: dict[str, str | None]) -> dict[str, Any]:
    common = {"id": backend, "topics": ["agg_1m", "readings"], "batch_size": 5000, "batch_delay": "200ms"}
    if backend in ("postgres", "timescaledb"):
        return {
            **common,
            "type": "postgres",
            "dsn": env["PLANTSTREAM_PG_DSN"],
            "schema": f"b_{tag}_{backend}",
            "timescaledb": "auto" if backend == "timescaledb" else "off",
        }
    if backend == "influx-v1":
        return {**common, "type": "influx", "url": urls["v1"], "database": f"b_{tag}"}
    return {
        **common,
        "type": "influx",
        "api": "v2",
        "url": urls["v2"],
        "org": "-",
        "bucket": f"b_{tag}/autogen",
        "token": "plantstream:plantstream",
    }


def _produce(topo: Topology, args: argparse.Namespace) -> tuple[int, int]:
    p = Producer({"bootstrap.servers": topo.broker.bootstrap, "linger.ms": 50, "compression.type": "lz4"})
    rng = random.Random(1)
    n_aggs = 0
    for m in range(args.sink_minutes):
        ws = T0 + m * 60_000
        for s in range(args.sink_series):
            device, point = f"dev{s // POINTS:05d}", f"p{s % POINTS:03d}"
            mean = rng.random() * 100
            rec = {
                "series": f"site1/{device}/{point}",
                "site": "site1",
                "device": device,
                "point": point,
                "unit": "degC",
                "window_start": ws,
                "window_end": ws + 60_000,
                "count": 60,
                "good_count": 59,
                "min": mean - 5,
                "max": mean + 5,
                "mean": mean,
                "sum": mean * 59,
                "first": mean - 1,
                "last": mean + 1,
                "stddev": 2.5,
            }
            while True:
                try:
                    p.produce(topo.agg_topic, codec.dumps(rec), key=rec["series"].encode())
                    break
                except BufferError:
                    p.poll(0.1)
            n_aggs += 1
        p.poll(0)
    n_readings = 0
    k = 0
    while n_readings < args.sink_readings:
        device = f"dev{k % 200:05d}"
        ts = T0 + (k // 200) * 1000
        batch = {
            "v": 1,
            "source": "bench",
            "site": "site1",
            "device": device,
            "readings": [
                {"point": f"p{i:03d}", "ts": ts, "value": rng.random() * 100, "quality": "good"}
                for i in range(POINTS)
            ],
        }
        while True:
            try:
                p.produce(topo.raw_topic, codec.dumps(batch), key=f"site1/{device}".encode())
                break
            except BufferError:
                p.poll(0.1)
        n_readings += POINTS
        k += 1
    if p.flush(120) != 0:
        raise RuntimeError("the sinks workload was not acknowledged by Kafka")
    return n_aggs, n_readings


def _committed_all(bootstrap: str, group: str, topic: str, ends: list[int]) -> bool:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(len(ends))], timeout=10)
    finally:
        c.close()
    return all(max(tp.offset, 0) >= end for tp, end in zip(got, ends, strict=True))


def _ends(bootstrap: str, topic: str, partitions: int) -> list[int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-ends"})
    try:
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)]
    finally:
        c.close()


def _count(backend: str, sink: dict[str, Any], cfg: Any, table: str) -> int:
    if backend in ("postgres", "timescaledb"):
        with psycopg.connect(sink["dsn"]) as conn:
            row = conn.execute(f'SELECT count(*) FROM "{sink["schema"]}".{table}').fetchone()
        return int(row[0]) if row else 0
    api = open_api(cfg)
    try:
        return api.count(table, "count" if table == "agg_1m" else "value")
    finally:
        api.close()


def _run_one(topo: Topology, sink_cfg: Any, table: str, timeout: float) -> tuple[float, float]:
    """(seconds, CPU seconds of this process) for one table's topic through one sink stage."""

    class Counters:
        sink_rows: dict[str, int] = {}
        rejected = 0

    writer = sink_cfg.open_writer(f"bench/{sink_cfg.id}")
    group = f"bench-{uuid.uuid4().hex[:6]}-{sink_cfg.id}-{table}"
    failures: list[str] = []
    stage = Stage(
        f"sink {sink_cfg.id}/{table}",
        bootstrap=topo.broker.bootstrap,
        group=group,
        topic=topic_of(topo, table),
        step=SinkStep(topo, sink_cfg, table, writer, Counters()),
        fatal=lambda what, exc: failures.append(f"{what}: {exc!r}"),
        checkpoint_interval=0.0,
        batch_size=sink_cfg.batch_size,
        batch_wait=sink_cfg.batch_delay / 1000,
        tick_interval=0.0,
    )
    ends = _ends(topo.broker.bootstrap, topic_of(topo, table), topo.broker.partitions)
    cpu0, start = time.process_time(), time.monotonic()
    stage.start()
    try:
        deadline = start + timeout
        while not _committed_all(topo.broker.bootstrap, group, topic_of(topo, table), ends):
            if failures:
                raise RuntimeError(failures[0])
            if time.monotonic() > deadline:
                raise RuntimeError(f"{sink_cfg.id}/{table} did not finish within {timeout:.0f} s")
            time.sleep(0.1)
        return time.monotonic() - start, time.process_time() - cpu0
    finally:
        stage.stopping.set()
        stage.stop(30)


def run_sinks(args: argparse.Namespace, env: dict[str, str], logs: Path) -> list[dict[str, Any]]:
    got = services.up(("influxdb", "influxdb18"), progress=lambda m: None)
    urls: dict[str, str | None] = {"v1": got["influxdb"], "v2": got.get("influxdb18")}
    wanted = [b for b in args.sink_backends.split(",") if b]
    if "timescaledb" in wanted and not timescale_status(env["PLANTSTREAM_PG_DSN"])[0]:
        wanted.remove("timescaledb")
    if "influx-v2" in wanted and urls["v2"] is None:
        wanted.remove("influx-v2")
    rep = getattr(args, "rep_index", 0)
    order = wanted[rep % len(wanted) :] + wanted[: rep % len(wanted)]
    tag = uuid.uuid4().hex[:6]
    sinks = [_sink(b, tag, env, urls) for b in order]
    topo = validate_data(
        {
            "name": f"bench{tag}",
            "prefix": f"b{tag}.",
            "broker": {"bootstrap": env["PLANTSTREAM_KAFKA"], "partitions": 4},
            "sinks": sinks,
        }
    )
    ensure_topics(topo, say=lambda _m: None)
    results: list[dict[str, Any]] = []
    try:
        n_aggs, n_readings = _produce(topo, args)
        for backend, sink_cfg, sink in zip(order, topo.sinks, sinks, strict=True):
            writer = sink_cfg.open_writer("bench/deploy")
            writer.deploy(["agg_1m", "readings"], say=lambda _m: None)
            for table, n in (("agg_1m", n_aggs), ("readings", n_readings)):
                secs, cpu = _run_one(topo, sink_cfg, table, timeout=600)
                have = _count(backend, sink, sink_cfg, table)
                if have != n:
                    raise RuntimeError(f"{backend} {table}: {have} rows, expected {n}")
                what = "aggregates" if table == "agg_1m" else "readings"
                results.append(
                    {
                        "scenario": f"sink {backend} {table} ({what}/s)",
                        "series": args.sink_series,
                        "workers": 1,
                        "rows": n,
                        "seconds": secs,
                        "readings_per_s": n / secs,
                        "worker_cpu_s_per_million": cpu / n * 1e6,
                    }
                )
    finally:
        _cleanup(topo, sinks, env, urls)
    return results


def _cleanup(
    topo: Topology, sinks: list[dict[str, Any]], env: dict[str, str], urls: dict[str, str | None]
) -> None:
    from confluent_kafka.admin import AdminClient

    with psycopg.connect(env["PLANTSTREAM_PG_DSN"], autocommit=True) as conn:
        for s in sinks:
            if s["type"] == "postgres":
                tenancy.drop(conn, s["schema"])
                conn.execute(f'DROP SCHEMA IF EXISTS "{s["schema"]}" CASCADE')
    for cfg in topo.sinks:
        api = getattr(cfg, "api", None)
        if api is not None:
            db = cfg.database if api == "v1" else cfg.bucket.split("/")[0]
            v1 = V1Api(cfg, db, "autogen", None, None)
            with contextlib.suppress(Exception):
                v1.query(f'DROP DATABASE "{db}"')
    admin = AdminClient({"bootstrap.servers": env["PLANTSTREAM_KAFKA"]})
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(topo.prefix)]
    for fut in admin.delete_topics(names).values() if names else []:
        with contextlib.suppress(Exception):
            fut.result(30)


RUNNERS = {"sinks": run_sinks}

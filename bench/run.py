"""``make bench``: throughput of the pipeline on this machine, on the real local services.

Scenarios (each repeated, medians reported):

* ``kafka``: ReadingBatches preloaded into ``telemetry.raw`` by a fast producer; a worker aggregates them and
  the PostgreSQL sink writes ``agg_1m``. Measures the stream agents alone: readings/s from the worker's start
  to the moment ``agg_1m`` holds every reading (sum of ``count``).
* ``mqtt``: the same readings published over MQTT (QoS 1, one JSON object of points per device message),
  through the MQTT connector into Kafka, the worker and PostgreSQL, all running at once. Measures the whole
  path: readings/s from the first publish to the last row committed.

Every run gets its own topics, consumer group and schema. Results print as a table and are written as JSON
to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import yaml
from confluent_kafka import Producer
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from bench import protocols
from bench.proc import cpu_seconds, peak_rss_mb
from pipeline import codec, services

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
console = Console()
T0 = 1_767_225_600_000


def topology(tag: str, env: dict[str, str], partitions: int) -> dict[str, Any]:
    return {
        "name": f"bench{tag}",
        "prefix": f"b{tag}.",
        "broker": {"bootstrap": env["PLANTSTREAM_KAFKA"], "partitions": partitions},
        "sources": [
            {
                "id": "bench-mqtt",
                "type": "mqtt",
                "url": env["PLANTSTREAM_MQTT_URL"],
                "client_id": f"bench-{tag}",
                "topics": [{"filter": f"b{tag}/+/+/data", "template": f"b{tag}/{{site}}/{{device}}/data"}],
                "batch": {"max_readings": 2000, "max_delay": "100ms"},
            }
        ],
        # A replay compresses event time: a 2,000-reading connector batch spans 40 s of it, so the grace is
        # wide enough that no reading is late; windows still close by watermark as in live operation.
        "aggregates": {"grace": "5m", "idle_timeout": "2s"},
        "sinks": [
            {
                "id": "pg",
                "type": "postgres",
                "dsn": env["PLANTSTREAM_PG_DSN"],
                "schema": f"b_{tag}",
                "topics": ["agg_1m"],
                "batch_size": 5000,
                "batch_delay": "200ms",
            }
        ],
    }


def workload(series: int, readings: int, points_per_device: int, seed: int = 1):
    """Device scans in event-time order: (site, device, ts, {point: value}). ~1 scan per device per second."""
    rng = random.Random(seed)
    devices = max(1, series // points_per_device)
    scans = readings // (devices * points_per_device)
    points = [f"p{i:03d}" for i in range(points_per_device)]
    for k in range(scans):
        ts = T0 + k * 1000
        for d in range(devices):
            yield "site1", f"dev{d:05d}", ts + d % 1000, {p: rng.random() * 100 for p in points}


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


def rows_total(dsn: str, schema: str) -> int:
    with psycopg.connect(dsn) as conn:
        try:
            row = conn.execute(f'SELECT coalesce(sum(count), 0) FROM "{schema}".agg_1m').fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
    return int(row[0]) if row else 0


def wait_rows(
    dsn: str, schema: str, expected: int, timeout: float, procs: list[subprocess.Popen[bytes]]
) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rows_total(dsn, schema) >= expected:
            return time.monotonic()
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a pipeline process exited during the benchmark; see bench/results/logs/")
        time.sleep(0.2)
    raise RuntimeError(f"timed out: agg_1m holds {rows_total(dsn, schema)} of {expected} readings")


def prepare(tag: str, env: dict[str, str], partitions: int, logs: Path) -> tuple[Path, dict[str, Any]]:
    topo = topology(tag, env, partitions)
    f = logs / f"topology-{tag}.yaml"
    f.write_text(yaml.safe_dump(topo))
    subprocess.run([sys.executable, "-m", "pipeline.cli", "deploy", str(f)], check=True, capture_output=True)
    return f, topo


def cleanup(env: dict[str, str], topo: dict[str, Any]) -> None:
    with psycopg.connect(env["PLANTSTREAM_PG_DSN"], autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{topo["sinks"][0]["schema"]}" CASCADE')
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": env["PLANTSTREAM_KAFKA"]})
    names = [
        t
        for t in admin.list_topics(timeout=10).topics
        if t.startswith(topo["prefix"]) or t.startswith(f"bench-{topo['name']}")
    ]
    if names:
        for fut in admin.delete_topics(names).values():
            with contextlib.suppress(Exception):
                fut.result(30)


def wait_ready(log: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Until the Faust worker says it is ready (partitions assigned, state recovered)."""
    deadline = time.monotonic() + timeout
    while "Worker]: Ready" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not become ready; see {log}")
        time.sleep(0.2)


def run_kafka(args: argparse.Namespace, env: dict[str, str], logs: Path) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    f, topo = prepare(tag, env, args.partitions, logs)
    wlog = logs / f"worker-kafka-{tag}.log"
    worker = spawn(["worker", str(f), "--app-id", f"bench-{topo['name']}", "--loglevel", "info"], wlog)
    try:
        # The clock starts with a running worker, as in production: start-up is not throughput.
        wait_ready(wlog, worker)
        cpu0 = cpu_seconds(worker.pid)
        p = Producer(
            {
                "bootstrap.servers": env["PLANTSTREAM_KAFKA"],
                "linger.ms": 20,
                "compression.type": "lz4",
                "batch.size": 1_048_576,
                "queue.buffering.max.messages": 500_000,
            }
        )
        n = 0
        start = time.monotonic()
        for site, device, ts, values in workload(args.series, args.readings, args.points):
            batch = {
                "v": 1,
                "source": "bench",
                "site": site,
                "device": device,
                "readings": [
                    {"point": k, "ts": ts, "value": v, "quality": "good"} for k, v in values.items()
                ],
            }
            while True:
                try:
                    p.produce(
                        topo["prefix"] + "telemetry.raw",
                        codec.dumps(batch),
                        f"{site}/{device}".encode(),
                        timestamp=ts,
                    )
                    break
                except BufferError:
                    p.poll(0.05)
            n += len(values)
        p.flush(60)
        done = wait_rows(env["PLANTSTREAM_PG_DSN"], topo["sinks"][0]["schema"], n, args.timeout, [worker])
        cpu = cpu_seconds(worker.pid) - cpu0
        rss = peak_rss_mb(worker.pid)
    finally:
        stop([worker])
        cleanup(env, topo)
    secs = done - start
    return {
        "scenario": "kafka",
        "readings": n,
        "seconds": secs,
        "readings_per_s": n / secs,
        "worker_cpu_s_per_million": cpu / n * 1e6,
        "worker_peak_rss_mb": rss,
    }


def run_mqtt(args: argparse.Namespace, env: dict[str, str], logs: Path) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    f, topo = prepare(tag, env, args.partitions, logs)
    procs = [
        spawn(["connect", str(f)], logs / f"connect-{tag}.log"),
        spawn(["worker", str(f), "--app-id", f"bench-{topo['name']}"], logs / f"worker-mqtt-{tag}.log"),
    ]
    try:
        deadline = time.monotonic() + 60
        while "subscribed to" not in (logs / f"connect-{tag}.log").read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the MQTT connector did not subscribe within 60 s")
            time.sleep(0.2)
        # Give the worker its partitions before the clock starts, as a running pipeline would have.
        time.sleep(3)
        host, port = env["PLANTSTREAM_MQTT_URL"].removeprefix("mqtt://").split(":")
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{tag}", clean_session=True)
        client.max_inflight_messages_set(1000)
        client.connect(host, int(port))
        client.loop_start()
        n = 0
        messages = 0
        cpu0 = cpu_seconds(procs[1].pid)
        start = time.monotonic()
        last = None
        for site, device, ts, values in workload(args.series, args.readings, args.points):
            last = client.publish(f"b{tag}/{site}/{device}/data", codec.dumps({"ts": ts, **values}), qos=1)
            n += len(values)
            messages += 1
        if last is not None:
            last.wait_for_publish(120)
        published = time.monotonic()
        done = wait_rows(env["PLANTSTREAM_PG_DSN"], topo["sinks"][0]["schema"], n, args.timeout, procs)
        client.loop_stop()
        client.disconnect()
        cpu = cpu_seconds(procs[1].pid) - cpu0
    finally:
        stop(procs)
        cleanup(env, topo)
    secs = done - start
    return {
        "scenario": "mqtt",
        "readings": n,
        "mqtt_messages": messages,
        "seconds": secs,
        "readings_per_s": n / secs,
        "mqtt_messages_per_s_published": messages / (published - start),
        "worker_cpu_s_per_million": cpu / n * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="kafka,mqtt,opcua,bacnet,bacnet-rp")
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--readings", type=int, default=300_000)
    ap.add_argument("--points", type=int, default=50, help="points per device (readings per batch)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600)
    protocols.add_arguments(ap)
    args = ap.parse_args()
    env = services.connection_env()
    services.up(("kafka", "postgres", "mosquitto"), progress=lambda m: None)
    os.environ.update(env)
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runners = {"kafka": run_kafka, "mqtt": run_mqtt, **protocols.RUNNERS}
    runs: list[dict[str, Any]] = []
    for scenario in args.scenarios.split(","):
        for rep in range(args.reps):
            console.print(
                f"[dim]… {scenario} run {rep + 1}/{args.reps}: {args.readings:,} readings, "
                f"{args.series:,} series[/]"
            )
            r = runners[scenario](args, env, logs)
            r["rep"] = rep + 1
            console.print(f"  {r['readings_per_s']:,.0f} readings/s ({r['seconds']:.1f} s)")
            runs.append(r)
    summary = {}
    table = Table(title=f"plantstream bench — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores")
    for col in ("scenario", "runs", "median readings/s", "min", "max", "worker CPU s / M readings"):
        table.add_column(col, justify="left" if col == "scenario" else "right")
    for scenario in args.scenarios.split(","):
        rs = [r for r in runs if r["scenario"] == scenario]
        med = statistics.median(r["readings_per_s"] for r in rs)
        cpu = statistics.median(r["worker_cpu_s_per_million"] for r in rs)
        summary[scenario] = {"median_readings_per_s": med, "median_worker_cpu_s_per_million": cpu}
        table.add_row(
            scenario,
            str(len(rs)),
            f"{med:,.0f}",
            f"{min(r['readings_per_s'] for r in rs):,.0f}",
            f"{max(r['readings_per_s'] for r in rs):,.0f}",
            f"{cpu:,.1f}",
        )
    console.print(table)
    out = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "params": vars(args),
        "runs": runs,
        "summary": summary,
    }
    path = RESULTS / f"{datetime.now(UTC):%Y-%m-%dT%H%M%S}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"results written to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

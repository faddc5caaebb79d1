"""``make bench``: throughput and latency of the pipeline on this machine, on the real local services.

Scenarios (``--scenarios``, default ``kafka,mqtt``; each run ``--reps`` times, medians reported):

* ``kafka``: for every ``--series`` count and every ``--workers`` count, that many ``plantstream worker``
  processes with one app id (one consumer group) start on empty topics. The clock starts once every worker
  is ready, holds input partitions, and the group has not rebalanced for a few seconds. A fast producer then
  writes the workload into ``telemetry.raw``: one ReadingBatch per device scan (``--points`` readings), one
  scan per device per second of event time, each device always to the same partition (device index mod
  ``--partitions``). The aggregation grace is ``--grace`` (10 s: every partition is written in event-time
  order). Measured per run:

  - sustained readings/s, from the start to the moment ``agg_1m`` holds every reading (sum of ``count``);
  - latency from a window's close to the commit of its ``agg_1m`` row, p50 and p99 over all rows: the close
    time is the worker's ``windows closed`` log line for the row's partition and window end, the commit time
    ``pg_xact_commit_timestamp(xmin)`` (PostgreSQL with ``track_commit_timestamp = on``; without it the
    latency is null);
  - worker CPU seconds per million readings (summed over workers) and peak RSS (VmHWM of the largest
    worker), and both for each worker;
  - the same job in Quix Streams (``bench/quix_peer.py``, as many apps in one group as workers) on the same
    loaded topic right afterwards: its
    readings/s, CPU and RSS, and plantstream readings/s ÷ Quix readings/s (``--no-quix`` skips it). One
    "tick" batch per partition after the workload, two minutes plus the grace past its last reading, lets
    Quix close its last windows by event time; it is in no count.

  ``--readings`` defaults per series count to max(3,000,000, 180 * series): at least three minutes of event
  time, so that windows close all along the run and not only at its end. The summary also gives the scaling
  of each worker count against one worker at the same series count.
* ``mqtt``: the same readings published over MQTT (QoS 1, one JSON object of points per device message),
  through the MQTT connector into Kafka, the worker and PostgreSQL, all running at once. Measures the whole
  path: readings/s from the first publish to the last row committed. Runs once per series count.
* the field protocol scenarios of ``bench/protocols.py`` (``opcua``, ``bacnet``, ...), on request.
* ``sinks`` (``bench/sinks.py``): aggregates/s and readings/s into each database sink, on request.
* ``alerts``: the ``live`` run twice, without and with one threshold rule per series (``--live-series``
  rules): the worker CPU per million readings the rules add, and reading → ``alerts.events`` latency
  p50/p99 (event time = wall time), on request.

Every run gets its own topics, consumer group and schema, removed afterwards. Results print as a table and
are written as JSON (parameters, machine, every run, summary) to ``bench/results/`` after every run; worker
logs go to ``bench/results/logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import yaml
from confluent_kafka import Producer
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bench import profile as bench_profile
from bench import protocols, sinks
from bench.proc import cpu_seconds, peak_rss_mb
from connectors.timescale import tenancy
from localservices import harness as services
from pipeline.core import codec
from pipeline.core.durations import parse_duration_ms

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Wide enough for the summary table when the output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 200)
T0 = 1_767_225_600_000
TICK_DEVICE = "tick-p"  # + partition: the batches that close Quix's last windows, excluded from every count
SETTLE_S = 3.0  # no new rebalance for this long: the consumer group has settled
RESTART_PG = "plantstream services down postgres && plantstream services up"


def topology(tag: str, env: dict[str, str], partitions: int, grace: str = "5m") -> dict[str, Any]:
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
        # The MQTT replay compresses event time: a 2,000-reading connector batch spans 40 s of it, so its
        # grace is wide enough that no reading is late. The kafka scenario writes each partition in
        # event-time order and uses the usual grace. Windows close by watermark either way, as in live use.
        "aggregates": {"grace": grace, "idle_timeout": "2s"},
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


def workload_size(series: int, readings: int, points_per_device: int) -> tuple[int, int, int]:
    """(devices, scans, readings) of :func:`workload`; scans = seconds of event time."""
    devices = max(1, series // points_per_device)
    scans = readings // (devices * points_per_device)
    return devices, scans, scans * devices * points_per_device


def reading_batch(device: str, ts: int, values: dict[str, float], version: int) -> dict[str, Any]:
    """One device scan as a ReadingBatch: version 2 (columns, one time for the scan) or 1 (a list)."""
    if version == 2:
        return {
            "v": 2,
            "source": "bench",
            "site": "site1",
            "device": device,
            "ts": ts,
            "points": list(values),
            "values": list(values.values()),
        }
    return {
        "v": 1,
        "source": "bench",
        "site": "site1",
        "device": device,
        "readings": [{"point": k, "ts": ts, "value": v, "quality": "good"} for k, v in values.items()],
    }


def device_name(d: int) -> str:
    return f"dev{d:05d}"


def workload(
    series: int, readings: int, points_per_device: int, seed: int = 1
) -> Iterator[tuple[str, int, int, dict[str, float]]]:
    """Device scans in event-time order: (site, device index, ts, {point: value}); one a device a second."""
    rng = random.Random(seed)
    devices, scans, _ = workload_size(series, readings, points_per_device)
    points = [f"p{i:03d}" for i in range(points_per_device)]
    for k in range(scans):
        ts = T0 + k * 1000
        for d in range(devices):
            yield "site1", d, ts + d % 1000, {p: rng.random() * 100 for p in points}


def default_readings(series: int) -> int:
    # One scan per device per event second: 180 * series readings are three minutes of event time, so every
    # run closes windows by watermark (grace 10 s) and not only by the final idle flush; at least 3 M, so
    # that a run lasts ten seconds or more and its last second (the last windows and rows) weighs little.
    return max(3_000_000, series * 180)


# Another checkout whose worker to measure (--worker-src): versions side by side with one bench.
WORKER_SRC: Path | None = None
READY = ("worker ready:", "Worker]: Ready")  # what a worker logs once running (older ones: Faust's line)


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if WORKER_SRC is not None:
        env["PYTHONPATH"] = str(WORKER_SRC)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=WORKER_SRC,
    )


def stop(procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout  # one deadline for all: they stop in parallel
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def rows_total(dsn: str, schema: str) -> int:
    with psycopg.connect(dsn) as conn:
        try:
            row = conn.execute(
                f'SELECT coalesce(sum(count), 0) FROM "{schema}".agg_1m WHERE device NOT LIKE %s '
                "AND point <> 'tick'",
                (TICK_DEVICE + "%",),
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
    return int(row[0]) if row else 0


def wait_rows(
    dsn: str,
    schema: str,
    expected: int,
    timeout: float,
    procs: list[subprocess.Popen[bytes]],
    progress: Callable[[int], None] | None = None,
) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = time.monotonic()
        total = rows_total(dsn, schema)
        if progress:
            progress(total)
        if total >= expected:
            return time.monotonic()
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a pipeline process exited during the benchmark; see bench/results/logs/")
        # The sum scans the whole table: poll less often as it grows, so the bench does not load the database
        # it measures (the end time is still known to well under a second of a minutes-long run).
        time.sleep(max(0.2, 20 * (time.monotonic() - t)))
    raise RuntimeError(f"timed out: agg_1m holds {rows_total(dsn, schema)} of {expected} readings")


def prepare(
    tag: str,
    env: dict[str, str],
    partitions: int,
    logs: Path,
    grace: str = "5m",
    alerts: Any = None,
    plain: bool = False,
) -> tuple[Path, dict[str, Any]]:
    topo = topology(tag, env, partitions, grace)
    if plain:
        # agg_1m in a plain PostgreSQL table, as the Quix peer writes it: no TimescaleDB hypertable and no
        # agg_1h continuous aggregate to refresh (the workload's minutes are in the past, so every batch
        # would refresh their hours; the sinks scenario measures that).
        topo["sinks"][0]["timescaledb"] = "off"
    if alerts is not None:
        topo["alerts"] = alerts
        # Both runs of the alerts scenario: a saturated 2-core machine may hold a device's batches back for
        # seconds, which a 2 s idle timeout would take for a quiet device (its later readings: late).
        topo["aggregates"]["idle_timeout"] = "30s"
    f = logs / f"topology-{tag}.yaml"
    f.write_text(yaml.safe_dump(topo))
    subprocess.run([sys.executable, "-m", "pipeline.cli", "deploy", str(f)], check=True, capture_output=True)
    return f, topo


def cleanup(env: dict[str, str], topo: dict[str, Any]) -> None:
    with psycopg.connect(env["PLANTSTREAM_PG_DSN"], autocommit=True) as conn:
        tenancy.drop(conn, topo["sinks"][0]["schema"])
        conn.execute(f'DROP SCHEMA IF EXISTS "{topo["sinks"][0]["schema"]}" CASCADE')
        conn.execute(f'DROP SCHEMA IF EXISTS "q_{topo["name"].removeprefix("bench")}" CASCADE')  # Quix peer
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": env["PLANTSTREAM_KAFKA"]})
    # Also the worker's internal topics (named after the app id) and the Quix peer's (named after the topic).
    names = [
        t
        for t in admin.list_topics(timeout=10).topics
        if topo["prefix"] in t or t.startswith(f"bench-{topo['name']}")
    ]
    if names:
        for fut in admin.delete_topics(names).values():
            with contextlib.suppress(Exception):
                fut.result(30)
    # The workers' data directory (memory store: empty, but one per run would pile up).
    shutil.rmtree(services.local_dir() / "worker" / f"bench-{topo['name']}", ignore_errors=True)


def wait_ready(log: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Until the worker says it is ready (every stage subscribed)."""
    deadline = time.monotonic() + timeout
    while not any(r in log.read_text(errors="replace") for r in READY):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not become ready; see {log}")
        time.sleep(0.2)


# -- consumer group -----------------------------------------------------------------------------------
# What the aggregation stage of a worker logs on each rebalance (pipeline/aggregation.py), once the state of
# the partitions it was given is loaded.
GROUP_EVENT = re.compile(r"aggregation: (assigned|revoked|lost) input partitions \[([\d, ]*)\]")


def assignment(text: str, topic: str = "") -> tuple[int, set[int]] | None:
    """(number of assignments so far, input partitions held) of one worker, from its log; None while a
    rebalance is in progress or before the first assignment."""
    events = list(GROUP_EVENT.finditer(text))
    if not events or events[-1].group(1) != "assigned":
        return None
    parts = {int(x) for x in events[-1].group(2).split(",") if x.strip()}
    return sum(1 for e in events if e.group(1) == "assigned"), parts


def wait_settled(
    logs: list[Path], procs: list[subprocess.Popen[bytes]], topic: str, partitions: int, timeout: float = 180
) -> tuple[int, list[set[int]]]:
    """Until every worker is ready and holds input partitions, together all of them, and nothing changed for
    SETTLE_S. Returns (assignments counted over all workers, input partitions of each worker)."""
    deadline = time.monotonic() + timeout
    last: tuple[int, list[set[int]]] | None = None
    since = time.monotonic()
    while True:
        for log, p in zip(logs, procs, strict=True):
            if p.poll() is not None:
                raise RuntimeError(f"a worker exited while starting; see {log}")
        texts = [log.read_text(errors="replace") for log in logs]
        states = [assignment(t, topic) for t in texts]
        now: tuple[int, list[set[int]]] | None = None
        if all(any(r in t for r in READY) for t in texts) and all(s is not None for s in states):
            held = [s[1] for s in states if s]
            gens = tuple(s[0] for s in states if s)
            every = set().union(*held) == set(range(partitions))
            if all(held) and sum(map(len, held)) == partitions and every:
                now = (sum(gens), held)
        if now != last:
            last, since = now, time.monotonic()
        elif now is not None and time.monotonic() - since >= SETTLE_S:
            return now
        if time.monotonic() > deadline:
            raise RuntimeError(f"the consumer group did not settle (last state {states}); see {logs}")
        time.sleep(0.2)


# -- window close -> row committed --------------------------------------------------------------------
CLOSED = re.compile(r"windows closed: partition=(\d+) end=(\d+) count=(\d+) at=(\d+(?:\.\d+)?)")


def window_closes(logs: list[Path]) -> dict[tuple[int, int], float]:
    """{(partition, window end ms): wall time of the close}; a re-close (after a restart) keeps the first."""
    out: dict[tuple[int, int], float] = {}
    for log in logs:
        for m in CLOSED.finditer(log.read_text(errors="replace")):
            key, at = (int(m.group(1)), int(m.group(2))), float(m.group(4))
            out[key] = min(at, out.get(key, at))
    return out


def commit_timestamps_on(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW track_commit_timestamp").fetchone()
    return bool(row and row[0] == "on")


LATENCY_SQL = """
WITH r AS (
    SELECT d.part, round(extract(epoch FROM a.window_end) * 1000)::bigint AS end_ms,
           extract(epoch FROM pg_xact_commit_timestamp(a.xmin))::float8 AS committed
    FROM {schema}.agg_1m a JOIN bench_devices d USING (device)
), l AS (
    SELECT (r.committed - c.at) * 1000 AS ms, c.at IS NULL AS no_close, r.committed IS NULL AS no_ts
    FROM r LEFT JOIN bench_closes c ON c.part = r.part AND c.end_ms = r.end_ms
)
SELECT count(*), count(*) FILTER (WHERE no_close), count(*) FILTER (WHERE no_ts),
       count(*) FILTER (WHERE ms < 0), min(ms), max(ms),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
FROM l
"""


def close_to_commit(
    dsn: str, schema: str, closes: dict[tuple[int, int], float], device_parts: dict[str, int]
) -> dict[str, Any]:
    """Latency from each agg_1m row's window close (its device's partition) to the row's commit, in ms."""
    empty: dict[str, Any] = {"p50_ms": None, "p99_ms": None, "close_lines": len(closes)}
    if not commit_timestamps_on(dsn):
        return {**empty, "note": f"track_commit_timestamp is off; restart PostgreSQL: {RESTART_PG}"}
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TEMP TABLE bench_closes (part int, end_ms bigint, at float8)")
        conn.execute("CREATE TEMP TABLE bench_devices (device text, part int)")
        with conn.cursor().copy("COPY bench_closes FROM STDIN") as cp:
            for (part, end), at in closes.items():
                cp.write_row((part, end, at))
        with conn.cursor().copy("COPY bench_devices FROM STDIN") as cp:
            for dev, part in device_parts.items():
                cp.write_row((dev, part))
        row = conn.execute(LATENCY_SQL.format(schema=f'"{schema}"')).fetchone()
    assert row is not None
    rows, no_close, no_ts, negative, lo, hi, p50, p99 = row
    out = {
        **empty,
        "rows": rows,
        "rows_without_close": no_close,
        "rows_without_commit_ts": no_ts,
        "negative": negative,
        "min_ms": lo,
        "max_ms": hi,
        "p50_ms": p50,
        "p99_ms": p99,
    }
    if no_close or no_ts:
        out["note"] = (
            f"{no_close} row(s) without a window close line, {no_ts} without a commit timestamp "
            "(rows committed before track_commit_timestamp was on have none)"
        )
    return out


# -- scenarios ----------------------------------------------------------------------------------------
def bench_progress() -> Progress:
    return Progress(
        TextColumn("  {task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def timeout_for(args: argparse.Namespace) -> float:
    # Unless given: ten minutes, or longer for big runs (as if only 1,000 readings/s got through).
    return float(args.timeout or max(600.0, args.readings / 1000))


def run_peer(
    env: dict[str, str],
    topic: str,
    readings: int,
    grace_ms: int,
    timeout: float,
    logs: Path,
    tag: str,
    instances: int = 1,
    closing: str = "key",
) -> dict[str, Any]:
    """The same job in Quix Streams on the loaded topic. A failure of the peer is reported in the results
    and does not discard plantstream's measurement."""
    from bench.quix_peer import run_quix  # optional: --no-quix runs without it

    console.print("  [dim]… Quix Streams peer on the same topic[/]")
    try:
        return run_quix(
            bootstrap=env["PLANTSTREAM_KAFKA"],
            topic=topic,
            dsn=env["PLANTSTREAM_PG_DSN"],
            schema=f"q_{tag}",  # its own agg_1m: plantstream's already holds every reading
            expected_readings=readings,
            grace_ms=grace_ms,
            timeout=timeout,
            logs=logs,
            tag=tag,
            instances=instances,
            closing=closing,
        )
    except Exception as e:
        console.print(f"  [bold red]the Quix Streams peer failed:[/] {e}")
        return {"error": str(e)}


def run_kafka(args: argparse.Namespace, env: dict[str, str], logs: Path) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    grace_ms = parse_duration_ms(args.grace)
    f, topo = prepare(tag, env, args.partitions, logs, args.grace, plain=True)
    raw = topo["prefix"] + "telemetry.raw"
    dsn, schema = env["PLANTSTREAM_PG_DSN"], topo["sinks"][0]["schema"]
    devices, scans, expected = workload_size(args.series, args.readings, args.points)
    timeout = timeout_for(args)
    wlogs = [logs / f"worker-kafka-{tag}-{i + 1}.log" for i in range(args.workers)]
    app_id = f"bench-{topo['name']}"
    workers = [spawn(["worker", str(f), "--app-id", app_id, "--loglevel", "info"], log) for log in wlogs]
    quix: dict[str, Any] | None = None
    profile: list[dict[str, Any]] = []
    try:
        # The clock starts with running workers whose group has settled, as in production: start-up and the
        # first rebalances are not throughput.
        generation, held = wait_settled(wlogs, workers, raw, args.partitions)
        profs = [logs / f"profile-{tag}-{i + 1}.txt" for i in range(args.workers)] if args.profile else []
        spies = [bench_profile.attach(w.pid, out) for w, out in zip(workers, profs, strict=False)]
        p = Producer(
            {
                "bootstrap.servers": env["PLANTSTREAM_KAFKA"],
                "linger.ms": 20,
                "compression.type": "lz4",
                "batch.size": 1_048_576,
                "queue.buffering.max.messages": 500_000,
            }
        )

        def encode(
            device: str, part: int, ts: int, values: dict[str, float]
        ) -> tuple[int, bytes, bytes, int]:
            batch = reading_batch(device, ts, values, args.format)
            return part, f"site1/{device}".encode(), codec.dumps(batch), ts

        # Messages are encoded before the clock starts, so producing them costs the shared cores little
        # and the workers are measured, not this process's JSON encoding.
        n = 0
        last_ts = T0
        device_parts = {device_name(d): d % args.partitions for d in range(devices)}
        messages = []
        for _site, d, ts, values in workload(args.series, args.readings, args.points):
            messages.append(encode(device_name(d), d % args.partitions, ts, values))
            n += len(values)
            last_ts = max(last_ts, ts)
        # One reading per device, far enough ahead that every window of the workload closes by event time
        # (devices keep their own clocks; Quix closes windows by event time only), plus one per partition.
        tick = last_ts + 120_000 + grace_ms
        messages.extend(
            encode(device_name(d), d % args.partitions, tick, {"tick": 0.0}) for d in range(devices)
        )
        messages.extend(
            encode(f"{TICK_DEVICE}{part}", part, tick, {"tick": 0.0}) for part in range(args.partitions)
        )
        with bench_progress() as prog:
            load = prog.add_task("produced", total=expected, rate="")
            rows = prog.add_task("in agg_1m", total=expected, rate="")
            cpu0 = [cpu_seconds(w.pid) for w in workers]
            start = time.monotonic()

            def show_rows(total: int) -> None:
                rate = total / max(1e-9, time.monotonic() - start)
                prog.update(rows, completed=total, rate=f"{rate:,.0f}/s")

            sent = 0
            for i, (part, key, value, ts) in enumerate(messages):
                while True:
                    try:
                        # Explicit partitions: the latency needs each row's input partition, and a device's
                        # batches share one partition as the topic contract requires.
                        p.produce(raw, value, key, partition=part, timestamp=ts)
                        break
                    except BufferError:
                        p.poll(0.05)
                if not i % 5_000:
                    sent = min(n, i * args.points)
                    prog.update(
                        load, completed=sent, rate=f"{sent / max(1e-9, time.monotonic() - start):,.0f}/s"
                    )
            p.flush(60)
            del messages
            loaded = time.monotonic()
            prog.update(load, completed=n, rate=f"{n / (loaded - start):,.0f}/s")
            done = wait_rows(dsn, schema, n, timeout, workers, show_rows)
        cpu = [cpu_seconds(w.pid) - c for w, c in zip(workers, cpu0, strict=True)]
        rss = [peak_rss_mb(w.pid) for w in workers]
        # Before stopping: a member leaving the group makes the others rebalance.
        final = [assignment(log.read_text(errors="replace"), raw) for log in wlogs]
        rebalanced = any(s is None for s in final) or sum(s[0] for s in final if s) != generation
        stop(workers)  # before the peer runs: idle workers would still take CPU from it
        for spy in spies:
            bench_profile.finish(spy)
        profile = [bench_profile.summary(out) for out in profs]
        for i, prof in enumerate(profile, 1):
            console.print(
                f"  [dim]worker {i} profile ({prof['samples']:,} samples; innermost project frame):[/]"
            )
            for where, share in prof["stages"]:
                console.print(f"  [dim]{share:6.1%}  stage {escape(where)}[/]")
            for where, share in prof["frames"][:15]:
                console.print(f"  [dim]{share:6.1%}  {escape(where)}[/]")
        latency = close_to_commit(dsn, schema, window_closes(wlogs), device_parts)
        secs = done - start
        if args.quix:
            # As many Quix apps in one consumer group as plantstream workers.
            quix = run_peer(
                env, raw, n, grace_ms, timeout, logs, tag, instances=args.workers, closing=args.quix_closing
            )
    finally:
        stop(workers)
        cleanup(env, topo)
    rate = n / secs
    return {
        "scenario": "kafka",
        "series": args.series,
        "devices": devices,
        "workers": args.workers,
        "partitions": args.partitions,
        "points_per_batch": args.points,
        "batch_version": args.format,
        "grace_ms": grace_ms,
        "readings": n,
        "event_seconds": scans,
        "seconds": secs,
        "readings_per_s": rate,
        "load_seconds": loaded - start,
        "worker_cpu_s_per_million": sum(cpu) / n * 1e6,
        "worker_peak_rss_mb": max(rss),
        "per_worker": [
            {
                "input_partitions": sorted(h),
                "cpu_s_per_million": c / n * 1e6,
                "peak_rss_mb": r,
                "log": log.name,
            }
            for h, c, r, log in zip(held, cpu, rss, wlogs, strict=True)
        ],
        "group_generation": generation,
        "rebalanced_during_run": rebalanced,
        "latency_p50_ms": latency["p50_ms"],
        "latency_p99_ms": latency["p99_ms"],
        "latency": latency,
        "quix": quix,
        "quix_closing": args.quix_closing if args.quix else None,
        "profile": profile,
        "quix_readings_per_s": quix.get("readings_per_s") if quix else None,
        "quix_cpu_s_per_million": quix.get("cpu_s_per_million") if quix else None,
        "quix_peak_rss_mb": quix.get("peak_rss_mb") if quix else None,
        "ratio_vs_quix": rate / quix["readings_per_s"] if quix and quix.get("readings_per_s") else None,
    }


def alert_rules(series: int, points: int) -> dict[str, Any]:
    """One threshold rule per series (``alerts`` scenario): values are uniform in [0, 100), so a reading
    above 99.99 raises about once in ten thousand readings of a series and the next one clears it (at
    100,000 readings/s: 10 raises and 10 clears a second, a flood by EEMUA's measure)."""
    rules = []
    for i in range(series):
        d, q = divmod(i, points)
        rules.append(
            {
                "id": f"r{i}",
                "match": f"site1/{device_name(d)}/p{q:03d}",
                "levels": [{"severity": "high", "above": 99.99}],
            }
        )
    return {"rules": rules}


class TopicLatency:
    """Reads a topic while the run goes: latency = arrival - the event time ``when`` finds in a record (None:
    not measured). On alerts.events: of the reading that caused a raise or clear (event time = wall time in
    live runs); on alerts.samples: the first hop (reading → aggregation stage → routed sample)."""

    def __init__(self, bootstrap: str, topic: str, when: Callable[[dict[str, Any]], int | None]) -> None:
        self.when = when
        from confluent_kafka import Consumer

        self.c = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-lat-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
            }
        )
        self.c.subscribe([topic])
        self.ms: list[float] = []
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping:
            m = self.c.poll(0.2)  # one at a time: a batch would stamp its first records late
            if m is not None and m.error() is None:
                ts = self.when(codec.loads(m.value()))
                if ts is not None:
                    self.ms.append(time.time() * 1000 - ts)

    def stop(self) -> dict[str, Any]:
        self.stopping = True
        self.thread.join(10)
        self.c.close()
        xs = sorted(self.ms)
        if not xs:
            return {"events": 0, "p50_ms": None, "p99_ms": None}
        return {
            "events": len(xs),
            "p50_ms": xs[len(xs) // 2],
            "p99_ms": xs[min(len(xs) - 1, int(len(xs) * 0.99))],
        }


def start_serve(
    f: Path, topo: dict[str, Any], env: dict[str, str], logs: Path
) -> tuple[subprocess.Popen[bytes], str, str]:
    """``plantstream serve`` for the ``api`` scenario, a tenant owning the bench's site and its token."""
    import httpx

    schema = topo["sinks"][0]["schema"]
    with psycopg.connect(env["PLANTSTREAM_PG_DSN"], autocommit=True) as conn:
        tenancy.add_tenant(conn, schema, "bench", ["site1"])
        token, _ = tenancy.create_token(conn, schema, "bench", "bench", None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = spawn(
        ["serve", str(f), "--port", str(port), "--app-id", f"bench-{topo['name']}"], logs / "serve.log"
    )
    base = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            if httpx.get(f"{base}/api/health", timeout=20).json()["live"]["status"] == "ok":
                return server, base, token
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    stop([server])
    raise RuntimeError(f"plantstream serve did not come up; see {logs / 'serve.log'}")


def run_api(args: argparse.Namespace, env: dict[str, str], logs: Path) -> list[dict[str, Any]]:
    """The live run with ``plantstream serve`` beside it: stream clients and REST queries at full rate."""
    return [run_live(args, env, logs, api=True)]


def run_alerts(args: argparse.Namespace, env: dict[str, str], logs: Path) -> list[dict[str, Any]]:
    """The live run twice, without and with one threshold rule per series (the order alternating by
    repetition): the worker CPU the rules add, and reading → alerts.events latency."""
    order = [False, True] if getattr(args, "rep_index", 0) % 2 == 0 else [True, False]
    out = {}
    for with_rules in order:
        out[with_rules] = run_live(args, env, logs, rules=with_rules)
    off, on = out[False], out[True]
    on["cpu_added_vs_no_rules"] = on["worker_cpu_s_per_million"] / off["worker_cpu_s_per_million"] - 1
    return [off, on]


def run_live(
    args: argparse.Namespace, env: dict[str, str], logs: Path, rules: bool = False, api: bool = False
) -> dict[str, Any]:
    """Live operation: readings at a steady rate with event time = wall time, for the close→commit latency
    of windows closing once a minute, as in production (the ``kafka`` scenario closes them back to back)."""
    tag = uuid.uuid4().hex[:6]
    devices = max(1, args.live_series // args.points)
    alerts = alert_rules(devices * args.points, args.points) if rules else None
    if alerts is None and args.scenarios.find("alerts") >= 0:
        alerts = {"rules": []}  # the same topology, without rules
    f, topo = prepare(tag, env, args.partitions, logs, args.grace, alerts)
    raw = topo["prefix"] + "telemetry.raw"
    dsn, schema = env["PLANTSTREAM_PG_DSN"], topo["sinks"][0]["schema"]
    per_round = devices * args.points
    interval = per_round / args.live_rate  # seconds between two scans of every device
    wlog = logs / f"worker-live-{tag}.log"
    worker = spawn(["worker", str(f), "--app-id", f"bench-{topo['name']}", "--loglevel", "info"], wlog)
    events = samples = None
    server: subprocess.Popen[bytes] | None = None
    load: subprocess.Popen[bytes] | None = None
    api_result: dict[str, Any] | None = None
    try:
        wait_settled([wlog], [worker], raw, args.partitions)
        if api:
            server, base, token = start_serve(f, topo, env, logs)
        if rules:
            events = TopicLatency(
                env["PLANTSTREAM_KAFKA"],
                topo["prefix"] + "alerts.events",
                lambda ev: ev["ts"] if ev["transition"] in ("raise", "clear") else None,
            )
            samples = TopicLatency(
                env["PLANTSTREAM_KAFKA"],
                topo["prefix"] + "alerts.samples",
                lambda body: body.get("t") if body.get("k") == "r" else None,
            )
        p = Producer(
            {"bootstrap.servers": env["PLANTSTREAM_KAFKA"], "linger.ms": 5, "compression.type": "lz4"}
        )
        rng = random.Random(1)
        points = [f"p{i:03d}" for i in range(args.points)]
        n = k = 0
        cpu0 = cpu_seconds(worker.pid)
        serve_cpu0 = cpu_seconds(server.pid) if server is not None else 0.0
        start = time.monotonic()
        if server is not None:
            # The load runs while the pipeline takes the full rate, after 10 s of warm-up.
            load = subprocess.Popen(
                [sys.executable, "-m", "bench.api_load", "--base", base, "--token", token, "--clients",
                 str(args.api_clients), "--rest", str(args.api_rest), "--delay", "10",
                 "--seconds", str(max(10, args.live_seconds - 20))],
                stdout=subprocess.PIPE,
            )  # fmt: skip
        with bench_progress() as prog:
            task = prog.add_task("live", total=args.live_seconds, rate="")
            while (now := time.monotonic()) - start < args.live_seconds:
                due = start + k * interval
                if due > now:
                    time.sleep(due - now)
                ts = int(time.time() * 1000)
                for d in range(devices):
                    batch = reading_batch(
                        device_name(d), ts, {q: rng.random() * 100 for q in points}, args.format
                    )
                    p.produce(
                        raw,
                        codec.dumps(batch),
                        f"site1/{device_name(d)}".encode(),
                        partition=d % args.partitions,
                        timestamp=ts,
                    )
                n += per_round
                k += 1
                p.poll(0)
                if not k % 10:
                    el = time.monotonic() - start
                    prog.update(task, completed=min(el, args.live_seconds), rate=f"{n / el:,.0f}/s")
            p.flush(60)
            produced = time.monotonic()
            if load is not None:
                out, _ = load.communicate(timeout=120)
                api_result = json.loads(out.decode().strip().splitlines()[-1])
                assert server is not None
                api_result["serve_cpu_s"] = cpu_seconds(server.pid) - serve_cpu0
                api_result["serve_peak_rss_mb"] = peak_rss_mb(server.pid)
            done = wait_rows(dsn, schema, n, 120, [worker], lambda total: None)
        cpu = cpu_seconds(worker.pid) - cpu0
        rss = peak_rss_mb(worker.pid)
        if events is not None:
            time.sleep(2)  # the last transitions on their way
        stop([worker])
        parts = {device_name(d): d % args.partitions for d in range(devices)}
        latency = close_to_commit(dsn, schema, window_closes([wlog]), parts)
    finally:
        alert_latency = events.stop() if events is not None else None
        if alert_latency is not None and samples is not None:
            alert_latency["routed_sample"] = samples.stop()
        stop([worker, *([server] if server else []), *([load] if load else [])])
        cleanup(env, topo)
    return {
        "scenario": "api"
        if api
        else "live"
        if alerts is None
        else ("alerts: with rules" if rules else "alerts: no rules"),
        "api": api_result,
        "rules": len(alerts["rules"]) if alerts else 0,
        "alert_latency": alert_latency,
        "series": devices * args.points,
        "workers": 1,
        "readings": n,
        "seconds": produced - start,
        "readings_per_s": n / (produced - start),
        "offered_readings_per_s": args.live_rate,
        "drain_seconds_after_last": done - produced,
        "worker_cpu_s_per_million": cpu / n * 1e6,
        "worker_peak_rss_mb": rss,
        "latency_p50_ms": latency["p50_ms"],
        "latency_p99_ms": latency["p99_ms"],
        "latency": latency,
    }


def run_mqtt(args: argparse.Namespace, env: dict[str, str], logs: Path) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    f, topo = prepare(tag, env, args.partitions, logs)
    procs = [
        spawn(["connect", str(f)], logs / f"connect-{tag}.log"),
        spawn(["worker", str(f), "--app-id", f"bench-{topo['name']}"], logs / f"worker-mqtt-{tag}.log"),
    ]
    _, _, expected = workload_size(args.series, args.readings, args.points)
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
        with bench_progress() as prog:
            pub = prog.add_task("published", total=expected, rate="")
            rows = prog.add_task("in agg_1m", total=expected, rate="")
            start = time.monotonic()
            last = None
            for site, d, ts, values in workload(args.series, args.readings, args.points):
                last = client.publish(
                    f"b{tag}/{site}/{device_name(d)}/data", codec.dumps({"ts": ts, **values}), qos=1
                )
                n += len(values)
                messages += 1
                if messages % 1000 == 0:
                    prog.update(pub, completed=n, rate=f"{n / (time.monotonic() - start):,.0f}/s")
            if last is not None:
                last.wait_for_publish(120)
            published = time.monotonic()
            prog.update(pub, completed=n, rate=f"{n / (published - start):,.0f}/s")

            def show_rows(total: int) -> None:
                prog.update(rows, completed=total, rate=f"{total / (time.monotonic() - start):,.0f}/s")

            done = wait_rows(
                env["PLANTSTREAM_PG_DSN"], topo["sinks"][0]["schema"], n, timeout_for(args), procs, show_rows
            )
        client.loop_stop()
        client.disconnect()
        cpu = cpu_seconds(procs[1].pid) - cpu0
    finally:
        stop(procs)
        cleanup(env, topo)
    secs = done - start
    return {
        "scenario": "mqtt",
        "series": args.series,
        "workers": 1,
        "readings": n,
        "mqtt_messages": messages,
        "seconds": secs,
        "readings_per_s": n / secs,
        "mqtt_messages_per_s_published": messages / (published - start),
        "worker_cpu_s_per_million": cpu / n * 1e6,
    }


# -- summary ------------------------------------------------------------------------------------------
def median(values: list[Any]) -> float | None:
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.median(xs) if xs else None


def fmt(v: float | None, spec: str = ",.0f") -> str:
    return "—" if v is None else format(v, spec)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (scenario, series, workers), in the order the runs were made."""
    groups: dict[tuple[str, int | None, int | None], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["scenario"], r.get("series"), r.get("workers")), []).append(r)
    out = []
    for (scenario, series, workers), rs in groups.items():
        rates = [r["readings_per_s"] for r in rs]
        out.append(
            {
                "scenario": scenario,
                "series": series,
                "workers": workers,
                "runs": len(rs),
                "median_readings_per_s": statistics.median(rates),
                "min_readings_per_s": min(rates),
                "max_readings_per_s": max(rates),
                "latency_p50_ms": median([r.get("latency_p50_ms") for r in rs]),
                "latency_p99_ms": median([r.get("latency_p99_ms") for r in rs]),
                "median_worker_cpu_s_per_million": median([r.get("worker_cpu_s_per_million") for r in rs]),
                "worker_peak_rss_mb": median([r.get("worker_peak_rss_mb") for r in rs]),
                "quix_readings_per_s": median([r.get("quix_readings_per_s") for r in rs]),
                "quix_cpu_s_per_million": median([r.get("quix_cpu_s_per_million") for r in rs]),
                "quix_peak_rss_mb": median([r.get("quix_peak_rss_mb") for r in rs]),
                "ratio_vs_quix": median([r.get("ratio_vs_quix") for r in rs]),
            }
        )
    for s in out:
        one = next(
            (o for o in out if (o["scenario"], o["series"], o["workers"]) == (s["scenario"], s["series"], 1)),
            None,
        )
        s["scaling_vs_1_worker"] = (
            s["median_readings_per_s"] / one["median_readings_per_s"]
            if one is not None and s["workers"] not in (None, 1)
            else None
        )
    return out


def summary_table(summary: list[dict[str, Any]]) -> Table:
    table = Table(title=f"plantstream bench — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores")
    cols = (
        "scenario",
        "series",
        "workers",
        "runs",
        "median readings/s",
        "min",
        "max",
        "p50 ms",
        "p99 ms",
        "worker CPU s/M",
        "peak RSS MB",
        "Quix readings/s",
        "Quix CPU s/M",
        "Quix RSS MB",
        "÷ Quix",
        "scaling",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "scenario" else "right")
    for s in summary:
        table.add_row(
            s["scenario"],
            fmt(s["series"]),
            fmt(s["workers"]),
            str(s["runs"]),
            fmt(s["median_readings_per_s"]),
            fmt(s["min_readings_per_s"]),
            fmt(s["max_readings_per_s"]),
            fmt(s["latency_p50_ms"]),
            fmt(s["latency_p99_ms"]),
            fmt(s["median_worker_cpu_s_per_million"], ",.1f"),
            fmt(s["worker_peak_rss_mb"]),
            fmt(s["quix_readings_per_s"]),
            fmt(s["quix_cpu_s_per_million"], ",.1f"),
            fmt(s["quix_peak_rss_mb"]),
            fmt(s["ratio_vs_quix"], ".2f"),
            fmt(s["scaling_vs_1_worker"], ".2f"),
        )
    return table


def describe(r: dict[str, Any]) -> str:
    line = f"  {r['readings_per_s']:,.0f} readings/s ({r['seconds']:.1f} s)"
    if r["scenario"] == "api" and r.get("api"):
        a = r["api"]
        return (
            f"{line}; {a['stream_clients']} stream clients: {a['stream_events_per_s']:,.0f} events/s, "
            f"latest-value lag p50 {fmt(a['stream_lag_p50_ms'])} ms p99 {fmt(a['stream_lag_p99_ms'])} ms; "
            f"REST {a['rest_queries_per_s']:,.0f} queries/s ({a['rest_workers']} workers), "
            f"p50 {fmt(a['rest_p50_ms'])} ms p99 {fmt(a['rest_p99_ms'])} ms, {a['rest_errors']} errors; "
            f"serve CPU {a['serve_cpu_s']:.0f} s, RSS {a['serve_peak_rss_mb']:.0f} MB"
        )
    if r["scenario"].startswith("alerts"):
        lat = r.get("alert_latency") or {}
        line += f"; {r['rules']:,} rules; CPU {r['worker_cpu_s_per_million']:,.1f} s/M"
        if lat:
            line += f"; {lat['events']:,} transitions, reading→event p50 {fmt(lat['p50_ms'])} ms"
            line += f", p99 {fmt(lat['p99_ms'])} ms"
            hop = lat.get("routed_sample") or {}
            if hop.get("events"):
                line += f" (reading→routed sample p50 {fmt(hop['p50_ms'])} ms, p99 {fmt(hop['p99_ms'])} ms)"
        if r.get("cpu_added_vs_no_rules") is not None:
            line += f"; CPU added {r['cpu_added_vs_no_rules']:+.0%}"
        return line
    if r["scenario"] == "live":
        lat = r["latency"]
        return line + (
            f" live; close→commit p50 {fmt(lat['p50_ms'])} ms, p99 {fmt(lat['p99_ms'])} ms over "
            f"{fmt(lat.get('rows'))} rows; CPU {r['worker_cpu_s_per_million']:,.1f} s/M; "
            f"RSS {r['worker_peak_rss_mb']:,.0f} MB; "
            f"all rows in {r['drain_seconds_after_last']:.1f} s after the last reading"
        )
    if r["scenario"] != "kafka":
        return line
    lat = r["latency"]
    line += (
        f"; close→commit p50 {fmt(lat['p50_ms'])} ms, p99 {fmt(lat['p99_ms'])} ms; "
        f"CPU {r['worker_cpu_s_per_million']:,.1f} s/M; RSS {r['worker_peak_rss_mb']:,.0f} MB"
    )
    if r["workers"] > 1:
        line += "; input partitions " + " | ".join(str(w["input_partitions"]) for w in r["per_worker"])
    if r["quix"] and "error" in r["quix"]:
        line += "; [red]Quix peer failed[/]"
    elif r["quix"]:
        line += (
            f"\n  Quix {fmt(r['quix_readings_per_s'])} readings/s ({r['quix']['seconds']:.1f} s), "
            f"CPU {fmt(r['quix_cpu_s_per_million'], ',.1f')} s/M, RSS {fmt(r['quix_peak_rss_mb'])} MB; "
            f"plantstream ÷ Quix {fmt(r['ratio_vs_quix'], '.2f')}"
        )
    if r["rebalanced_during_run"]:
        line += "\n  [yellow]the consumer group rebalanced during the run[/]"
    if lat.get("note"):
        line += f"\n  [yellow]latency: {lat['note']}[/]"
    return line


def int_list(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


DEFAULT_SCENARIOS = ("kafka", "live", "mqtt", "mqtt-rate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runners: dict[str, Callable[..., Any]] = {
        "kafka": run_kafka,
        "live": run_live,
        "mqtt": run_mqtt,
        **protocols.RUNNERS,
        **sinks.RUNNERS,
        "alerts": run_alerts,
        "api": run_api,
    }
    ap.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS), help=", ".join(runners))
    ap.add_argument("--series", type=int_list, default=[1000, 10_000, 100_000], help="comma list")
    ap.add_argument(
        "--readings", type=int, default=None, help="per run (default: max(3,000,000, 180 * series))"
    )
    ap.add_argument("--points", type=int, default=50, help="points per device (readings per batch)")
    ap.add_argument("--workers", type=int_list, default=[1, 2], help="comma list (kafka scenario)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument(
        "--format",
        type=int,
        choices=(1, 2),
        default=2,
        help="ReadingBatch version the kafka and live scenarios write (2: columns; 1: a list of readings)",
    )
    ap.add_argument("--api-clients", type=int, default=50, help="stream clients (api scenario)")
    ap.add_argument("--api-rest", type=int, default=8, help="concurrent REST workers (api scenario)")
    ap.add_argument("--grace", default="10s", help="aggregation grace of the kafka scenario")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--timeout", type=float, default=None, help="seconds to wait for agg_1m (default: by size)"
    )
    ap.add_argument("--live-series", type=int, default=10_000, help="series of the live scenario")
    ap.add_argument("--live-rate", type=float, default=100_000, help="readings/s of the live scenario")
    ap.add_argument("--live-seconds", type=float, default=150, help="duration of the live scenario")
    ap.add_argument("--no-quix", dest="quix", action="store_false", help="skip the Quix Streams peer")
    ap.add_argument(
        "--quix-closing",
        choices=("key", "partition"),
        default="key",
        help="the Quix peer's window closing: per device, as plantstream (default), or per partition",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="sample the workers with py-spy (kafka scenario; JSON and logs)",
    )
    ap.add_argument(
        "--worker-src",
        type=str,
        default=None,
        help="run the worker from this other checkout of the project (compare versions in one session)",
    )
    protocols.add_arguments(ap)
    sinks.add_arguments(ap)
    args = ap.parse_args()
    global WORKER_SRC
    WORKER_SRC = Path(args.worker_src).resolve() if args.worker_src else None
    scenarios = args.scenarios.split(",")
    unknown = [s for s in scenarios if s not in runners]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; choose from {sorted(runners)}")
    if max(args.workers) > args.partitions:
        ap.error("every worker needs an input partition: --workers must not exceed --partitions")
    if "kafka" in scenarios and args.quix:
        try:
            import bench.quix_peer  # noqa: F401  (fail now rather than after the first run)
        except ImportError as e:
            ap.error(f"the Quix Streams peer cannot be loaded ({e}); run with --no-quix")
    env = services.connection_env()
    services.up(("kafka", "postgres", "mosquitto"), progress=lambda m: None)
    os.environ.update(env)
    if "kafka" in scenarios and not commit_timestamps_on(env["PLANTSTREAM_PG_DSN"]):
        console.print(
            "[bold yellow]PostgreSQL runs without track_commit_timestamp: latency will be null. "
            f"To measure it, restart PostgreSQL: {RESTART_PG}[/]"
        )
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{datetime.now(UTC):%Y-%m-%dT%H%M%S}.json"
    runs: list[dict[str, Any]] = []

    def save() -> list[dict[str, Any]]:
        # After every run: a long session that fails late keeps what it measured.
        summary = summarize(runs)
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
        path.write_text(json.dumps(out, indent=2) + "\n")
        return summary

    for scenario in scenarios:
        # The MQTT path runs at the smallest size only: it measures the connector, not the series count.
        sizes = args.series if scenario == "kafka" else [min(args.series)] if scenario == "mqtt" else [None]
        for series in sizes:
            readings = args.readings or default_readings(series or args.series[0])
            # Repetitions outermost: runs with 1 and 2 workers alternate, so a slow phase of a shared machine
            # does not fall on one of them only.
            for rep in range(args.reps):
                for workers in args.workers if scenario == "kafka" else [1]:
                    a = argparse.Namespace(
                        **{**vars(args), "series": series or args.series[0], "readings": readings}
                    )
                    a.workers = workers
                    a.rep_index = rep
                    what = ""
                    if series:
                        what = f": {readings:,} readings, {series:,} series"
                        what += f", {workers} worker(s)" if scenario == "kafka" else ""
                    console.print(f"[dim]… {scenario} run {rep + 1}/{args.reps}{what}[/]")
                    got = runners[scenario](a, env, logs)
                    for r in got if isinstance(got, list) else [got]:
                        r["rep"] = rep + 1
                        if isinstance(got, list):
                            console.print(f"  [dim]{r['scenario']}[/]")
                        console.print(describe(r))
                        runs.append(r)
                    save()
    console.print(summary_table(save()))
    console.print(f"results written to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""The Quix Streams peer of plantstream's aggregation worker, for ``make bench``.

The same job as the worker's ``agg_1m`` path, written with Quix Streams (3.x) on the same broker and the same
data, so the benchmark can report the plantstream / Quix ratio: ReadingBatch JSON messages keyed
``site/device`` in, tumbling 1-minute event-time windows per series (``site/device/point``) with a grace
period, closed windows upserted into ``"<schema>".agg_1m`` in PostgreSQL. Statistics over good-quality
readings, as in ``pipeline/aggregate.py``: ``count`` (all readings), ``good_count``, min, max, mean and sample
stddev by Welford's method, the sum with Neumaier's compensation, ``first``/``last`` by event time.

How it is built (the way one would write it for speed with Quix's own API):

* **Windows keyed by device, not by series.** The message key (``site/device``) is kept and each window's
  value is a dict ``point -> statistics`` filled by a ``reduce`` over whole batches: one state read and one
  state write per message, and no repartition topic. The alternative, ``apply(expand=True)`` to one message
  per reading + ``group_by(series)`` + a per-series window, is kept as ``--by series`` for comparison.
  Measured on a 2-core machine (1,000 series, 50 points per batch, 4 partitions): by series about
  40,000 readings/s (200,000 readings, 5 s), by device 190,000 readings/s on the same 200,000 readings
  (1 s, much of it waiting for the last checkpoint) and 380,000-450,000 readings/s on 1,000,000
  (1.8 CPU s per million readings).
  By series every reading becomes a Kafka message (produced to the repartition topic, consumed again,
  one state read/write and one changelog key each); by device those costs are paid once per batch of 50.
  By series is also wrong for event time: a repartition partition's watermark mixes the progress of all
  input partitions, so a fast input partition makes a slower one's readings late (in that test, with a
  10 s grace, 61,100 readings were logged late and only 78,900 of 200,000 reached the table; with a
  10-minute grace 13-15 % were still lost silently, see the caveat below), and a tick reaches only the
  repartition partitions its series keys hash to.
* **Event time from the readings.** A batch is split per minute of its readings' ``ts`` (one piece in the
  usual case) and each piece carries the highest ``ts`` of its readings as its timestamp, so windows follow
  the readings even when a batch spans a minute boundary. Both ReadingBatch versions are read (version 2,
  in columns, is folded straight from its columns). Window closing is Quix's own:
  ``tumbling_window(60 s, grace).reduce(...).final(closing_strategy="key")``: a key's (a device's) windows
  close when that device's own event time passes their end plus the grace — the semantics of
  plantstream's clock per device. (``--closing partition`` closes by the partition's highest time, as
  plantstream did before it kept a clock per device; the benchmark ends every device with one reading
  past its last window, so both close every window.)
* **Checkpoints every 0.5 s** (Quix's default is 5 s, which would hold the last windows back for seconds;
  0.25, 0.5 and 1 s gave the same throughput within noise on 1,000,000 readings, the shorter interval
  bounds the wait for the last checkpoint) and a 0.1 s consumer poll timeout, so that last checkpoint of
  a drained topic is not delayed further by Quix's default 1 s poll.
* **Sink**: a ``BatchingSink`` that, at every checkpoint (``commit_interval``), COPYs the closed windows of
  all partitions into a temporary staging table and upserts them (``INSERT … ON CONFLICT (series, bucket)
  DO UPDATE``) in one transaction, with psycopg 3. Quix commits the Kafka offsets only after the flush.
* Changelog topics stay on (Quix's default), as plantstream's tables are changelog-backed too.

Not in the peer: plantstream's validation of every value with dead-lettering, late-data counting to the
DLQ, and ``telemetry.latest``. The peer does strictly less work per reading.

``run_quix`` runs the app in a subprocess (``python -m bench.quix_peer``), starts the clock when the app
reports its first consumed message, and stops it when ``agg_1m`` holds every expected reading.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from quixstreams import Application
from quixstreams.sinks import BatchingSink, SinkBatch

from bench.proc import cpu_seconds, peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
WINDOW_MS = 60_000
COMMIT_INTERVAL = 0.5  # seconds between Quix checkpoints (state, changelog, sink flush, offsets)
POLL_TIMEOUT = 0.1  # seconds
STARTUP_TIMEOUT = 120.0
FIRST_MESSAGE = "quix-peer: first message at monotonic "

# Layout of one series' window statistics (a list, as in pipeline/aggregate.py: it is serialised on
# every state write).
COUNT, GOOD, MEAN, M2, MIN, MAX, SUM, COMP, FIRST_TS, FIRST, LAST_TS, LAST = range(12)

Stats = list[Any]
Row = tuple[Any, ...]

COLUMNS = ("bucket", "series", "count", "good_count", "min", "max", "mean", "sum", "first", "last", "stddev")


# --- aggregation ----------------------------------------------------------------------------------


def new_stats() -> Stats:
    return [0, 0, 0.0, 0.0, None, None, 0.0, 0.0, None, None, None, None]


def add(st: Stats, ts: int, value: float, good: bool) -> None:
    """Fold one reading into a series' window statistics (Welford mean/variance, Neumaier sum)."""
    st[COUNT] += 1
    if not good:
        return
    n = st[GOOD] + 1
    st[GOOD] = n
    mean = st[MEAN]
    delta = value - mean
    mean += delta / n
    st[MEAN] = mean
    st[M2] += delta * (value - mean)
    s = st[SUM]
    t = s + value
    if abs(s) >= abs(value):
        st[COMP] += (s - t) + value
    else:
        st[COMP] += (value - t) + s
    st[SUM] = t
    if n == 1:
        st[MIN] = st[MAX] = st[FIRST] = st[LAST] = value
        st[FIRST_TS] = st[LAST_TS] = ts
        return
    if value < st[MIN]:
        st[MIN] = value
    elif value > st[MAX]:
        st[MAX] = value
    # by event time; on equal timestamps the earlier arrival is first and the later one last
    if ts < st[FIRST_TS]:
        st[FIRST_TS] = ts
        st[FIRST] = value
    if ts >= st[LAST_TS]:
        st[LAST_TS] = ts
        st[LAST] = value


def fold_batch(acc: dict[str, Stats], batch: dict[str, Any]) -> dict[str, Stats]:
    """Reducer of the device-keyed window: a batch's readings into ``point -> statistics``."""
    cols = batch.get("_cols")
    if cols is not None:  # version 2, in columns
        points, times, values, quality = cols
        for point, ts, value, q in zip(points, times, values, quality or _GOOD * len(points), strict=True):
            st = acc.get(point)
            if st is None:
                st = acc[point] = new_stats()
            add(st, ts, float(value), q == "good")
        return acc
    for r in batch["readings"]:
        point = r["point"]
        st = acc.get(point)
        if st is None:
            st = acc[point] = new_stats()
        add(st, r["ts"], r["value"], r["quality"] == "good")
    return acc


def init_batch(batch: dict[str, Any]) -> dict[str, Stats]:
    return fold_batch({}, batch)


def fold_reading(st: Stats, r: dict[str, Any]) -> Stats:
    """Reducer of the series-keyed window (``--by series``): one exploded reading."""
    add(st, r["t"], r["v"], r["g"])
    return st


def init_reading(r: dict[str, Any]) -> Stats:
    return fold_reading(new_stats(), r)


_GOOD = ["good"]


def split_minutes(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A batch as pieces that each fall in one minute of event time, each with its highest ``ts``."""
    if isinstance(batch, dict) and batch.get("v") == 2:
        points, values, quality = batch["points"], batch["values"], batch.get("quality")
        ts = batch["ts"]
        if type(ts) is int:  # one time for the scan: one piece
            return [{"_cols": (points, [ts] * len(points), values, quality), "_ts": ts}]
        by_minute: dict[int, list[int]] = {}
        for i, t in enumerate(ts):
            by_minute.setdefault(t // WINDOW_MS, []).append(i)
        return [
            {
                "_cols": (
                    [points[i] for i in ix],
                    [ts[i] for i in ix],
                    [values[i] for i in ix],
                    None if quality is None else [quality[i] for i in ix],
                ),
                "_ts": max(ts[i] for i in ix),
            }
            for ix in by_minute.values()
        ]
    readings = batch.get("readings") if isinstance(batch, dict) else None
    if not readings:
        return []  # not a ReadingBatch (e.g. a heartbeat record written by an older worker)
    minute = readings[0]["ts"] // WINDOW_MS
    hi = 0
    for r in readings:
        ts = r["ts"]
        if ts // WINDOW_MS != minute:
            break
        if ts > hi:
            hi = ts
    else:
        batch["_ts"] = hi
        return [batch]
    pieces: dict[int, list[dict[str, Any]]] = {}
    for r in readings:
        pieces.setdefault(r["ts"] // WINDOW_MS, []).append(r)
    return [{"readings": rs, "_ts": max(r["ts"] for r in rs)} for rs in pieces.values()]


def explode(batch: dict[str, Any], key: bytes) -> list[dict[str, Any]]:
    """One message per reading, for ``--by series``."""
    prefix = key.decode() + "/"
    return [
        {"s": prefix + r["point"], "t": r["ts"], "v": r["value"], "g": r["quality"] == "good"}
        for r in batch["readings"]
    ]


def stats_row(series: str, start: int, st: Stats) -> Row:
    n = st[GOOD]
    return (
        datetime.fromtimestamp(start / 1000, UTC),
        series,
        st[COUNT],
        n,
        st[MIN] if n else None,
        st[MAX] if n else None,
        st[MEAN] if n else None,
        st[SUM] + st[COMP] if n else None,
        st[FIRST] if n else None,
        st[LAST] if n else None,
        math.sqrt(max(st[M2], 0.0) / (n - 1)) if n >= 2 else None,
    )


# --- PostgreSQL -----------------------------------------------------------------------------------


def ensure_table(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    conn.execute(
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {}.agg_1m (
                bucket      timestamptz      NOT NULL,
                series      text             NOT NULL,
                count       integer          NOT NULL,
                good_count  integer          NOT NULL,
                min         double precision,
                max         double precision,
                mean        double precision,
                sum         double precision,
                first       double precision,
                last        double precision,
                stddev      double precision,
                PRIMARY KEY (series, bucket)
            )"""
        ).format(sql.Identifier(schema))
    )


class AggSink(BatchingSink):
    """Closed windows into ``"<schema>".agg_1m``: COPY to a staging table, then one idempotent upsert."""

    def __init__(self, dsn: str, schema: str, by: str) -> None:
        super().__init__()
        self.dsn = dsn
        self.schema = schema
        self.by = by
        self._conn: psycopg.Connection[Any] | None = None
        self._upsert = sql.SQL(
            "INSERT INTO {table} ({cols}) SELECT {cols} FROM stage_agg_1m "
            "ON CONFLICT (series, bucket) DO UPDATE SET {updates}"
        ).format(
            table=sql.Identifier(schema, "agg_1m"),
            cols=sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
            updates=sql.SQL(", ").join(
                sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c)) for c in COLUMNS[2:]
            ),
        )
        self._copy = sql.SQL("COPY stage_agg_1m ({}) FROM STDIN").format(
            sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        )

    def setup(self) -> None:
        conn = psycopg.connect(self.dsn, autocommit=True)
        ensure_table(conn, self.schema)
        conn.execute(
            sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS stage_agg_1m (LIKE {} INCLUDING DEFAULTS) "
                "ON COMMIT DELETE ROWS"
            ).format(sql.Identifier(self.schema, "agg_1m"))
        )
        self._conn = conn

    def _rows(self, batches: Iterable[SinkBatch]) -> Iterable[Row]:
        rows: dict[tuple[str, int], Row] = {}  # a replayed window within one flush: the last one wins
        for batch in batches:
            for item in batch:
                window = item.value
                start = window["start"]
                if self.by == "device":
                    prefix = item.key.decode() + "/"
                    for point, st in window["value"].items():
                        series = prefix + point
                        rows[series, start] = stats_row(series, start, st)
                else:
                    rows[item.key, start] = stats_row(item.key, start, window["value"])
        return rows.values()

    def _write(self, rows: Iterable[Row]) -> None:
        if self._conn is None:
            self.setup()
        conn = self._conn
        assert conn is not None
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(self._copy) as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(self._upsert)

    def write(self, batch: SinkBatch) -> None:
        self._write(self._rows([batch]))

    def flush(self) -> None:
        # All partitions' closed windows in one transaction, rather than one per partition.
        try:
            if any(b.size for b in self._batches.values()):
                self._write(self._rows(self._batches.values()))
        finally:
            self._batches.clear()


# --- the Quix app (subprocess) --------------------------------------------------------------------


def build_app(args: argparse.Namespace) -> Application:
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        commit_interval=args.commit_interval,
        # Quix checks for a due checkpoint between polls; its default 1 s poll timeout would hold back the
        # last checkpoint (and so the last sink flush) of a drained topic by up to a second.
        consumer_poll_timeout=POLL_TIMEOUT,
        state_dir=args.state_dir,
        loglevel="INFO",
    )
    sdf = app.dataframe(app.topic(args.topic, value_deserializer="json", key_deserializer="bytes"))

    announced = False

    def first_message(value: Any, key: Any, timestamp: int, headers: Any) -> None:
        nonlocal announced
        if not announced:
            announced = True
            print(f"{FIRST_MESSAGE}{time.monotonic():.6f}", flush=True)

    sdf = sdf.update(first_message, metadata=True)
    if args.by == "device":
        sdf = sdf.apply(split_minutes, expand=True)
        sdf = sdf.set_timestamp(lambda value, key, timestamp, headers: value["_ts"])
        window = sdf.tumbling_window(WINDOW_MS, grace_ms=args.grace_ms, name="agg_1m")
        sdf = window.reduce(fold_batch, init_batch).final(closing_strategy=args.closing)
    else:
        sdf = sdf.apply(
            lambda value, key, timestamp, headers: explode(value, key), expand=True, metadata=True
        )
        sdf = sdf.set_timestamp(lambda value, key, timestamp, headers: value["t"])
        sdf = sdf.group_by(
            lambda value: value["s"], name="series", key_serializer="str", key_deserializer="str"
        )
        window = sdf.tumbling_window(WINDOW_MS, grace_ms=args.grace_ms, name="agg_1m")
        sdf = window.reduce(fold_reading, init_reading).final(closing_strategy=args.closing)
    sdf.sink(AggSink(args.dsn, args.schema, args.by))
    return app


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.quix_peer",
        description="Quix Streams peer of plantstream's 1-minute aggregation, writing agg_1m to PostgreSQL.",
    )
    ap.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    ap.add_argument("--topic", required=True, help="input topic of ReadingBatch JSON messages")
    ap.add_argument("--dsn", required=True, help="PostgreSQL connection string")
    ap.add_argument("--schema", required=True, help="schema of the agg_1m table (created if missing)")
    ap.add_argument("--group", required=True, help="Kafka consumer group (unique per run)")
    ap.add_argument("--state-dir", required=True, help="Quix state directory")
    ap.add_argument("--grace-ms", type=int, default=10_000, help="grace period of the windows (ms)")
    ap.add_argument(
        "--commit-interval", type=float, default=COMMIT_INTERVAL, help="seconds between checkpoints"
    )
    ap.add_argument(
        "--closing",
        choices=("key", "partition"),
        default="key",
        help="Quix's window closing: per key (the device, like plantstream's clock per device) or partition",
    )
    ap.add_argument(
        "--by",
        choices=("device", "series"),
        default="device",
        help="window key: the message's device (default) or the series after a group_by",
    )
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    build_app(args).run()


# --- the benchmark side ---------------------------------------------------------------------------


def _wait_first_message(logs: list[Path], procs: list[subprocess.Popen[bytes]], timeout: float) -> float:
    """The monotonic clock reading at the first consumed message of any app (same clock as ours, Linux)."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for log in logs:
            text = log.read_text(errors="replace")
            at = text.find(FIRST_MESSAGE)
            if at >= 0:
                end = text.find("\n", at)
                if end >= 0:
                    found.append(float(text[at + len(FIRST_MESSAGE) : end]))
        if found:
            return min(found)
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the Quix app exited (code {proc.returncode}) before its first message; see {log}"
                )
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Quix app consumed no message within {timeout:.0f} s; see {logs[0]}")
        time.sleep(0.02)


def _readings_in_table(conn: psycopg.Connection[Any], schema: str) -> int:
    row = conn.execute(
        sql.SQL("SELECT coalesce(sum(count), 0) FROM {}").format(sql.Identifier(schema, "agg_1m"))
    ).fetchone()
    return int(row[0]) if row else 0


def _wait_rows(
    dsn: str, schema: str, expected: int, timeout: float, procs: list[subprocess.Popen[bytes]], log: Path
) -> float:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            n = _readings_in_table(conn, schema)
            if n >= expected:
                return time.monotonic()
            dead = next((q for q in procs if q.poll() is not None), None)
            if dead is not None:
                raise RuntimeError(
                    f"the Quix app exited (code {dead.returncode}) with {n:,} of {expected:,} readings "
                    f'in "{schema}".agg_1m; see {log}'
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f'timed out after {timeout:.0f} s: "{schema}".agg_1m holds {n:,} '
                    f"of {expected:,} readings; see {log}"
                )
            time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _delete_internal_topics(bootstrap: str, group: str) -> None:
    """The changelog (and repartition) topics Quix created for this run's consumer group."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = [t for t in admin.list_topics(timeout=10).topics if f"__{group}--" in t]
    if names:
        for fut in admin.delete_topics(names).values():
            with contextlib.suppress(Exception):
                fut.result(30)


def run_quix(
    *,
    bootstrap: str,
    topic: str,
    dsn: str,
    schema: str,
    expected_readings: int,
    grace_ms: int,
    timeout: float,
    logs: Path,
    tag: str,
    keep_schema: bool = False,
    by: str = "device",
    commit_interval: float = COMMIT_INTERVAL,
    closing: str = "key",
    instances: int = 1,
) -> dict[str, Any]:
    """Aggregate the preloaded ``topic`` with Quix Streams into ``"<schema>".agg_1m``; time it.

    ``instances`` apps share one consumer group (as plantstream's workers do), each with its own state
    directory. The clock runs from the first consumed message of any of them to the moment ``agg_1m``
    holds ``expected_readings`` (sum of ``count``); CPU is summed over the apps, peak RSS is the largest.
    """
    logs.mkdir(parents=True, exist_ok=True)
    group = f"quix-peer-{tag}-{uuid.uuid4().hex[:8]}"
    state_dirs = [Path(tempfile.mkdtemp(prefix=f"quix-state-{tag}-", dir=logs)) for _ in range(instances)]
    qlogs = [logs / (f"quix-{tag}.log" if i == 0 else f"quix-{tag}-{i + 1}.log") for i in range(instances)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_table(conn, schema)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    procs = []
    for state_dir, log in zip(state_dirs, qlogs, strict=True):
        cmd = [
            sys.executable,
            "-m",
            "bench.quix_peer",
            *("--bootstrap", bootstrap, "--topic", topic, "--dsn", dsn, "--schema", schema),
            *("--group", group, "--state-dir", str(state_dir), "--grace-ms", str(grace_ms)),
            *("--commit-interval", str(commit_interval), "--by", by, "--closing", closing),
        ]
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env))
    try:
        start = _wait_first_message(qlogs, procs, STARTUP_TIMEOUT)
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        done = _wait_rows(dsn, schema, expected_readings, timeout, procs, qlogs[0])
        cpu = sum(cpu_seconds(p.pid) - c for p, c in zip(procs, cpu0, strict=True))
        rss = max(peak_rss_mb(p.pid) for p in procs)
    finally:
        for proc in procs:
            _stop(proc)
        _delete_internal_topics(bootstrap, group)
        for state_dir in state_dirs:
            shutil.rmtree(state_dir, ignore_errors=True)
        if not keep_schema:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    secs = done - start
    return {
        "readings": expected_readings,
        "seconds": secs,
        "readings_per_s": expected_readings / secs,
        "cpu_s_per_million": cpu / expected_readings * 1e6,
        "peak_rss_mb": rss,
    }


if __name__ == "__main__":
    main()

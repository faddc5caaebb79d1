"""End to end over the real services: MQTT → connector → Kafka → worker → PostgreSQL.

Publishes ≥ 10,000 readings on 6 series over 4 minutes of event time through a real MQTT client, shuffled
within the grace period, plus late readings and malformed payloads; stops the worker with SIGTERM in the
middle and starts it again; then checks every ``agg_1m`` row against pandas and the dead-letter topic
against what was sent to be rejected.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
import yaml
from confluent_kafka import Consumer
from paho.mqtt.enums import CallbackAPIVersion

from pipeline.core import codec
from tests.conftest import wait_for
from tests.reference import compare, expected_aggregates

pytestmark = pytest.mark.e2e

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z: event time, unrelated to the wall clock
GRACE_MS = 10_000
MINUTES = 4
# Event time runs 10x faster than the wall clock while publishing. The connector batches up to 200 ms of
# wall time per device, i.e. 2 s of event time here; with the 5 s shuffle below, readings reach the worker
# at most 7 s behind the newest on their partition, inside the 10 s grace, as live devices would.
SPEED = 10.0
SHUFFLE_MS = 5_000


def topology(ns: dict[str, str]) -> dict[str, Any]:
    return {
        "name": f"e2e{ns['tag']}",
        "prefix": ns["prefix"],
        "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 4},
        "sources": [
            {
                "id": "mqtt-e2e",
                "type": "mqtt",
                "url": ns["PLANTSTREAM_MQTT_URL"],
                "client_id": f"e2e-{ns['tag']}",
                "topics": [
                    {
                        "filter": f"{ns['mqtt_root']}/+/+/+",
                        "template": f"{ns['mqtt_root']}/{{site}}/{{device}}/{{point}}",
                    },
                    {
                        "filter": f"{ns['mqtt_root']}-obj/+/data",
                        "template": f"{ns['mqtt_root']}-obj/{{device}}/data",
                        "site": "plant",
                    },
                ],
            }
        ],
        "aggregates": {"grace": "10s", "idle_timeout": "4s"},
        "sinks": [
            {
                "id": "pg",
                "type": "postgres",
                "dsn": ns["PLANTSTREAM_PG_DSN"],
                "schema": ns["schema"],
                "topics": ["agg_1m", "readings"],
                "batch_delay": "200ms",
            }
        ],
    }


def make_traffic(ns: dict[str, str], seed: int = 7):
    """Returns (messages in publish order, on-time readings, late readings, malformed payloads).

    All devices report concurrently, as a plant does: the per-partition watermark (docs/semantics.md) judges a
    device by the newest event time of every device on its partition, so devices replaying different
    hours one after the other would rightly be late.
    """
    rng = random.Random(seed)
    root = ns["mqtt_root"]
    on_time: list[tuple[str, int, float, str]] = []
    late: list[tuple[str, int, float]] = []
    span = MINUTES * 60_000
    events: list[tuple[int, str, bytes, list[tuple[str, int, float, str]]]] = []
    # Point-per-topic devices: 2 devices x 2 points, ~2,200 readings per series.
    for dev in ("pump1", "pump2"):
        for point, base in (("pressure", 4.0), ("flow", 120.0)):
            ts = T0
            while True:
                ts += rng.randint(60, 160)
                if ts >= T0 + span:
                    break
                value = base + rng.gauss(0, base * 0.05)
                quality = "bad" if rng.random() < 0.03 else "good"
                body: dict[str, Any] = {"value": value, "ts": ts}
                if quality != "good":
                    body["quality"] = quality
                events.append(
                    (
                        ts,
                        f"{root}/site1/{dev}/{point}",
                        codec.dumps(body),
                        [(f"site1/{dev}/{point}", ts, value, quality)],
                    )
                )
    # A JSON-object device whose topic carries no point: two points per message, ts in epoch seconds.
    ts = T0
    while True:
        ts += rng.randint(200, 300)
        if ts >= T0 + span:
            break
        a, b = 20 + rng.gauss(0, 1), 50 + rng.gauss(0, 5)
        events.append(
            (
                ts,
                f"{root}-obj/hp1/data",
                codec.dumps({"ts": ts / 1000.0, "temp": {"supply": a}, "power": b}),
                [("plant/hp1/temp.supply", ts, a, "good"), ("plant/hp1/power", ts, b, "good")],
            )
        )
    # Shuffle within the grace: a reading is published after others up to 8 s newer, never more.
    order = sorted(events, key=lambda e: e[0] + rng.uniform(0, SHUFFLE_MS))
    messages: list[tuple[str, bytes, int | None]] = []
    newest: dict[str, int] = {}
    for ts, topic, payload, readings in order:
        messages.append((topic, payload, ts))
        on_time.extend(readings)
        series = readings[0][0]
        newest[series] = max(newest.get(series, 0), ts)
        # Now and then a reading 80-170 s behind its series' newest: its minute has surely closed.
        if "/pump" in topic and newest[series] - T0 > 180_000 and rng.random() < 0.01:
            lts = newest[series] - rng.randint(80_000, 170_000)
            messages.append((topic, codec.dumps({"value": 999.0, "ts": lts}), None))
            late.append((series, lts, 999.0))
    malformed = [
        (f"{root}/site1/pump9/x", b"not a number"),
        (f"{root}/site1/pump9/x", b"NaN"),
        (f"{root}/site1/pump9/x", b"Infinity"),
        (f"{root}/site1/pump9/x", b"-inf"),
        (f"{root}/site1/pump9/x", b'{"value": "12"}'),
        (f"{root}/site1/pump9/x", b'{"value": null}'),
        (f"{root}/site1/pump9/x", b'{"value": [1, 2]}'),
        (f"{root}/site1/pump9/x", b'{"value": {"a": 1}}'),
        (f"{root}/site1/pump9/x", b'{"ts": 1767225600000}'),
        (f"{root}/site1/pump9/x", b'{"value": 1, "ts": "yesterday"}'),
        (f"{root}/site1/pump9/x", b'{"value": 1, "ts": 99999999999999999}'),
        (f"{root}/site1/pump9/x", b'{"value": 1, "quality": "great"}'),
        (f"{root}/site1/pump9/x", b"\xff\xfe\x00garbage"),
        (f"{root}/site1/pump9/x", b""),
        (f"{root}/site1/pump9/x", b'{"value": 1e400}'),
        (f"{root}/site1/pump9/x", b"[1, 2, 3]"),
        (f"{root}/site1/pump9/x", b'"a string"'),
        (f"{root}/site1/pump9/x", b"null"),
        (f"{root}-obj/hp9/data", b"42"),
        (f"{root}-obj/hp9/data", b'{"ts": 1767225600}'),
        (f"{root}-obj/hp9/data", b'{"ts": 1767225600, "mode": "auto"}'),
        (f"{root}-obj/hp9/data", b'{"ts": 1767225600, "alarms": [1]}'),
        (f"{root}-obj/hp9/data", b"{broken json"),
    ]
    # Spread the malformed payloads through the stream.
    for i, m in enumerate(malformed):
        messages.insert((i + 1) * len(messages) // (len(malformed) + 2), (*m, None))
    return messages, on_time, late, malformed


def publish(url: str, messages: list[tuple[str, bytes, int | None]], client_id: str) -> None:
    """Publish at SPEED x event time: a message goes out when the wall clock reaches its event time."""
    host, port = url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.max_inflight_messages_set(500)
    client.connect(host, int(port))
    client.loop_start()
    infos = []
    first_ts = next(ts for _, _, ts in messages if ts is not None)
    start = time.monotonic()
    for topic, payload, ts in messages:
        if ts is not None:
            delay = start + (ts - first_ts) / 1000.0 / SPEED - time.monotonic()
            if delay > 0.005:
                time.sleep(delay)
        infos.append(client.publish(topic, payload, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def deploy_cli(topo_file: Path) -> str:
    """``plantstream deploy`` of a topology file in a child process; what it said (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "deploy", str(topo_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-2000:]
    return said


def stop(procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    """SIGTERM to every process still running, then wait for each; kill what does not stop in time."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def agg_rows(dsn: str, schema: str) -> dict[tuple[str, int], dict[str, Any]]:
    with psycopg.connect(dsn) as conn:
        try:
            rows = conn.execute(
                "SELECT series, (extract(epoch FROM bucket) * 1000)::bigint, count, good_count, min, max, "
                f'mean, sum, first, last, stddev FROM "{schema}".agg_1m'
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    cols = ("count", "good_count", "min", "max", "mean", "sum", "first", "last", "stddev")
    return {(r[0], int(r[1])): dict(zip(cols, r[2:], strict=True)) for r in rows}


def read_dlq(bootstrap: str, topic: str, expect: int, timeout: float) -> list[dict[str, Any]]:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"dlq-reader-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    c.subscribe([topic])
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(out) < expect:
        msg = c.poll(0.5)
        if msg is not None and msg.error() is None:
            out.append(codec.loads(msg.value()))
    # Drain a little longer: more than expected would be a finding too.
    end = time.monotonic() + 2
    while time.monotonic() < end:
        msg = c.poll(0.2)
        if msg is not None and msg.error() is None:
            out.append(codec.loads(msg.value()))
    c.close()
    return out


@pytest.mark.parametrize("mode", ["restart-then-publish", "restart-on-backlog", "second-worker-joins"])
def test_mqtt_to_postgres_matches_pandas_with_a_worker_restart(namespace, tmp_path, mode):
    ns = namespace
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topology(ns)))
    deploy_cli(topo_file)

    messages, on_time, late, malformed = make_traffic(ns)
    assert len(on_time) >= 10_000 and len({s for s, *_ in on_time}) >= 5 and len(malformed) >= 20
    assert late, "the traffic must include late readings"

    connector = spawn(["connect", str(topo_file)], tmp_path / "connect.log")
    worker = spawn(
        ["worker", str(topo_file), "--app-id", f"e2e-{ns['tag']}", "--loglevel", "info"],
        tmp_path / "worker1.log",
    )
    dsn = ns["PLANTSTREAM_PG_DSN"]
    procs = [connector, worker]
    try:
        # Publish only once the connector's subscription is in place (its persistent session then keeps
        # every later message for it, even across reconnects).
        wait_for(
            lambda: "subscribed to" in (tmp_path / "connect.log").read_text(),
            60,
            "the connector to subscribe",
        )
        half = len(messages) // 2
        publish(ns["PLANTSTREAM_MQTT_URL"], messages[:half], f"pub1-{ns['tag']}")
        # Mid-run: some minutes are in the table, others are still open. Stop the worker gracefully.
        if mode != "second-worker-joins":
            wait_for(lambda: len(agg_rows(dsn, ns["schema"])) >= 4, 180, "the first aggregates in PostgreSQL")
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(90) is not None
        before_restart = len(agg_rows(dsn, ns["schema"]))

        def restart() -> subprocess.Popen[bytes]:
            w = spawn(
                ["worker", str(topo_file), "--app-id", f"e2e-{ns['tag']}", "--loglevel", "info"],
                tmp_path / "worker2.log",
            )
            procs.append(w)
            return w

        if mode == "second-worker-joins":
            # A second worker joins the group while the second half streams in (no pause: a pause longer
            # than the idle timeout would rightly close the open windows early): the first hands over
            # partitions at the rebalance, checkpointed and committed in the revoke callback.
            restart()
            publish(ns["PLANTSTREAM_MQTT_URL"], messages[half:], f"pub2-{ns['tag']}")
            log2 = tmp_path / "worker2.log"
            wait_for(
                lambda: "aggregation: assigned input partitions [" in log2.read_text(),
                120,
                "the second worker to take partitions",
            )
        elif mode == "restart-on-backlog":
            # The second half arrives while the worker is down: it restarts on a backlog.
            publish(ns["PLANTSTREAM_MQTT_URL"], messages[half:], f"pub2-{ns['tag']}")
            worker = restart()
        else:
            worker = restart()
            wait_for(
                lambda: "worker ready:" in (tmp_path / "worker2.log").read_text(),
                120,
                "the worker to restart",
            )
            publish(ns["PLANTSTREAM_MQTT_URL"], messages[half:], f"pub2-{ns['tag']}")

        expected = expected_aggregates(on_time)
        assert before_restart < len(expected)
        if mode == "second-worker-joins":
            # The hand-over happened while data flowed: the first worker gave partitions away mid-stream.
            assert "aggregation: revoked input partitions [" in (tmp_path / "worker1.log").read_text()

        def complete() -> int | None:
            n = len(agg_rows(dsn, ns["schema"]))
            return n if n >= len(expected) else None

        try:
            wait_for(complete, 180, f"{len(expected)} rows in agg_1m")
        except AssertionError:
            have = agg_rows(dsn, ns["schema"])
            raise AssertionError(
                f"{len(have)} of {len(expected)} rows; missing {sorted(set(expected) - set(have))[:10]}"
            ) from None
        time.sleep(0)  # rows are final once present; any extra row would show below
        actual = agg_rows(dsn, ns["schema"])
        problems = compare(actual, expected)
        if problems:
            dl = read_dlq(ns["PLANTSTREAM_KAFKA"], f"{ns['prefix']}telemetry.dlq", 10**9, 10)
            n_late = sum(1 for x in dl if x["reason"].startswith("late"))
            problems.insert(0, f"DLQ holds {n_late} late readings; {len(late)} were sent late on purpose")
        assert problems == [], "\n".join(problems[:30])

        # Raw readings: every valid reading, on time or late, once per (series, ts), whatever the replays.
        raw_keys = {(s, ts) for s, ts, *_ in on_time} | {(s, ts) for s, ts, _ in late}
        with psycopg.connect(dsn) as conn:
            n_raw = wait_for(
                lambda: (lambda n: n if n >= len(raw_keys) else None)(
                    conn.execute(f'SELECT count(*) FROM "{ns["schema"]}".readings').fetchone()[0]
                ),
                60,
                f"{len(raw_keys)} rows in readings",
            )
        assert n_raw == len(raw_keys)

        dlq = read_dlq(
            ns["PLANTSTREAM_KAFKA"], f"{ns['prefix']}telemetry.dlq", len(late) + len(malformed), 120
        )
        late_seen = {
            (d["reading"]["point"], d["reading"]["ts"])
            for d in (codec.loads(x["payload"]) for x in dlq if x["reason"].startswith("late"))
        }
        assert {(s.split("/")[2], ts) for s, ts, _ in late} <= late_seen
        assert all(x["reason"] for x in dlq)
        malformed_seen = [x for x in dlq if not x["reason"].startswith("late")]
        # Each malformed payload is in the DLQ with its MQTT topic (duplicates allowed: at-least-once).
        sent = set(malformed)
        got = set()
        for x in malformed_seen:
            payload = (
                x["payload"].encode()
                if x.get("payload_encoding", "text") == "text"
                else __import__("base64").b64decode(x["payload"])
            )
            got.add((x.get("topic"), payload))
        assert sent <= got, f"missing from the DLQ: {sorted(sent - got)[:5]}"
    finally:
        stop(procs)

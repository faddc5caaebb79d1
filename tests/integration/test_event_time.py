"""Event time per device on the real Kafka and PostgreSQL: a backfill beside live devices, a device whose
clock runs hours ahead, poison records and DBL_MAX readings across a worker restart, duplicates sent
straight to telemetry.raw, telemetry.raw growing from 4 to 8 partitions under load, a truncated restore."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest
from confluent_kafka import Producer

from connectors.common.producer import TelemetryProducer
from pipeline.core import codec
from pipeline.core.kafka import IncompleteRead, Outbox, ensure_compacted_topic, partition_for, read_all
from pipeline.deploy import deploy
from pipeline.repartition import RepartitionRefused
from pipeline.topology import Topology, validate_data
from pipeline.worker import build_worker
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import agg_rows, read_dlq
from tests.reference import compare, expected_aggregates

pytestmark = pytest.mark.integration
MAX = sys.float_info.max
Reading = tuple[str, int, float, str]  # series, ts, value, quality


def topo_for(ns: dict[str, str], partitions: int = 1, **aggregates: Any) -> Topology:
    return validate_data(
        {
            "name": f"et{ns['tag']}",
            "prefix": ns["prefix"],
            "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": partitions},
            "aggregates": {
                "grace": "10s",
                "idle_timeout": "2s",
                "checkpoint_interval": "300ms",
                **aggregates,
            },
            "sinks": [
                {
                    "id": "pg",
                    "type": "postgres",
                    "dsn": ns["PLANTSTREAM_PG_DSN"],
                    "schema": ns["schema"],
                    "topics": ["agg_1m"],
                    "batch_delay": "100ms",
                }
            ],
        }
    )


def minute_now() -> int:
    now = int(time.time() * 1000)
    return now - now % 60_000


def series_of(
    device: str, start: int, seconds: int, points: str = "ab", step_ms: int = 1000
) -> list[Reading]:
    out = []
    for i in range(seconds * 1000 // step_ms):
        for k, pt in enumerate(points):
            out.append(
                (f"site/{device}/{pt}", start + i * step_ms, float((i * 7 + k * 3) % 19) - 4.5, "good")
            )
    return out


def send(producer: TelemetryProducer, readings: list[Reading], per: int = 10) -> None:
    """ReadingBatches of ``per`` readings of one device, in the order given."""
    by_dev: dict[str, list[Reading]] = {}
    for r in readings:
        by_dev.setdefault(r[0].rsplit("/", 1)[0], []).append(r)
    for dev, rs in by_dev.items():
        site, device = dev.split("/")
        for i in range(0, len(rs), per):
            chunk = rs[i : i + per]
            batch = {
                "v": 1,
                "source": "test",
                "site": site,
                "device": device,
                "readings": [
                    {"point": s.rsplit("/", 1)[1], "ts": ts, "value": v, "quality": q}
                    for s, ts, v, q in chunk
                ],
            }
            producer.send_batch(batch, lambda err: None)


def interleave(*streams: list[Reading], per: int = 10) -> list[list[Reading]]:
    """Batches of each stream in turn, so devices share the partition the way live devices do."""
    batches = [[s[i : i + per] for i in range(0, len(s), per)] for s in streams]
    out = []
    for i in range(max(len(b) for b in batches)):
        out.extend(b[i] for b in batches if i < len(b))
    return out


def complete(ns: dict[str, str], expected: dict[Any, Any], timeout: float = 120) -> dict[Any, Any]:
    dsn = ns["PLANTSTREAM_PG_DSN"]
    wait_for(
        lambda: len(agg_rows(dsn, ns["schema"])) >= len(expected), timeout, f"{len(expected)} rows in agg_1m"
    )
    return agg_rows(dsn, ns["schema"])


def dead_letters(ns: dict[str, str], expect: int, timeout: float = 30) -> list[dict[str, Any]]:
    return read_dlq(ns["PLANTSTREAM_KAFKA"], f"{ns['prefix']}telemetry.dlq", expect, timeout)


def test_a_backfill_beside_live_devices_on_one_partition(namespace):
    ns = namespace
    topo = topo_for(ns)
    deploy(topo, say=lambda m: None)
    live_start = minute_now() - 180_000  # the last three minutes, as live devices just reported them
    backfill_start = live_start - 86_400_000  # the same minutes yesterday, from a site's buffer
    live = series_of("live1", live_start, 180) + series_of("live2", live_start, 180)
    old = series_of("buffer", backfill_start, 180)
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    worker = build_worker(topo, f"et-{ns['tag']}")
    worker.start()  # running while the devices send: the backfill interleaved with the live stream
    try:
        for batch in interleave(
            series_of("live1", live_start, 180), series_of("live2", live_start, 180), old
        ):
            send(producer, batch, per=len(batch))
            producer.poll(0)
        assert producer.flush(30) == 0
        expected = expected_aggregates(live + old)
        assert compare(complete(ns, expected), expected) == []
        assert worker.counters.late == 0
    finally:
        worker.stop()


def test_a_clock_hours_ahead_goes_to_the_dlq_and_its_neighbours_are_unaffected(namespace):
    ns = namespace
    topo = topo_for(ns)
    deploy(topo, say=lambda m: None)
    start = minute_now() - 120_000
    good = series_of("n1", start, 120) + series_of("n2", start, 120)
    ahead = series_of("ahead", start + 2 * 3_600_000, 30, points="x")
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    for batch in interleave(series_of("n1", start, 120), ahead, series_of("n2", start, 120)):
        send(producer, batch, per=len(batch))
    assert producer.flush(30) == 0
    worker = build_worker(topo, f"et-{ns['tag']}")
    worker.start()
    try:
        expected = expected_aggregates(good)
        assert compare(complete(ns, expected), expected) == []
        dl = dead_letters(ns, len(ahead))
        future = [x for x in dl if x["reason"].startswith("future")]
        assert len(future) == len(ahead) and len(dl) == len(ahead), {x["reason"][:40] for x in dl}
        assert worker.counters.late == 0
    finally:
        worker.stop()


def test_poison_and_dbl_max_between_good_records_across_a_restart(namespace):
    ns = namespace
    topo = topo_for(ns, idle_timeout="5m")  # windows close by their devices' clocks only, across the restart
    deploy(topo, say=lambda m: None)
    start = minute_now() - 600_000
    good = series_of("g", start, 150)
    raw = Producer({"bootstrap.servers": topo.broker.bootstrap})
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    reading = {"point": "a", "ts": start, "value": 1.0}
    poison = [
        {
            "v": 1,
            "source": "t",
            "site": "site",
            "device": "g",
            "readings": [{**reading, "quality": ["good"]}],
        },
        {"v": 1, "site": "site", "device": "g", "readings": {"not": "a list"}},
        {"site": ["x"], "device": "g", "readings": []},
        [1, 2, 3],
    ]
    first, second = good[: len(good) // 2], good[len(good) // 2 :]
    send(producer, first)
    for p in poison:
        raw.produce(topo.raw_topic, json.dumps(p).encode(), b"site/g")
    raw.produce(topo.raw_topic, b"\xff\x00 not json", b"site/g")
    # DBL_MAX twice in one window: the second would overflow the sum.
    send(
        producer,
        [("site/big/m", start + 1_000, MAX, "good"), ("site/big/m", start + 2_000, MAX, "good")],
        per=1,
    )
    assert producer.flush(30) == 0 and raw.flush(30) == 0
    worker = build_worker(topo, f"et-{ns['tag']}")
    worker.start()
    try:
        dsn = ns["PLANTSTREAM_PG_DSN"]
        wait_for(lambda: len(agg_rows(dsn, ns["schema"])) >= 1, 60, "the first aggregates")
        assert worker.counters.rejected == len(poison) + 1
    finally:
        worker.stop()  # a restart with the DBL_MAX window open
    big_rest = [("site/big/m", start + 3_000, -MAX, "good"), ("site/big/m", start + 4_000, 2.0, "good")]
    closers = [("site/g/a", start + 200_000, 0.0, "good"), ("site/big/m", start + 80_000, 5.0, "good")]
    send(producer, second + big_rest + closers, per=5)
    assert producer.flush(30) == 0
    worker = build_worker(topo, f"et-{ns['tag']}")
    worker.start()
    try:
        expected = expected_aggregates(good)
        expected = {k: v for k, v in expected.items() if k[1] < start + 180_000}
        actual = complete(ns, {**expected, "big": None})
        big = actual.pop(("site/big/m", start))
        # All four readings, across the restart; the sum, mean and variance left the range of a double.
        assert big["count"] == 4 and big["max"] == MAX and big["min"] == -MAX and big["last"] == 2.0
        assert big["sum"] is None and big["mean"] is None and big["stddev"] is None
        assert compare(actual, expected) == []
        dl = dead_letters(ns, len(poison) + 1)
        reasons = [x["reason"] for x in dl]
        assert len(reasons) == len(poison) + 1, reasons
        assert all(r.startswith(("invalid", "malformed")) for r in reasons), reasons
    finally:
        worker.stop()


def test_duplicates_sent_straight_to_the_topic_change_nothing(namespace):
    ns = namespace
    topo = topo_for(ns)
    deploy(topo, say=lambda m: None)
    start = minute_now() - 180_000
    readings = series_of("dup", start, 180, points="abc", step_ms=700)
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    for i in range(0, len(readings), 12):
        chunk = readings[i : i + 12]
        send(producer, chunk, per=12)
        send(producer, chunk[:5] + chunk, per=17)  # resent, with some readings twice in one batch
    assert producer.flush(30) == 0
    worker = build_worker(topo, f"et-{ns['tag']}")
    worker.start()
    try:
        expected = expected_aggregates(readings)
        assert compare(complete(ns, expected), expected) == []
        assert worker.counters.duplicates >= len(readings)  # every reading came at least twice
    finally:
        worker.stop()


def test_growing_the_raw_topic_from_4_to_8_partitions_loses_nothing(namespace):
    """Data flows, the worker stops (deploy refuses while it runs), deploy grows the topic and moves each
    device's open windows after it, data flows again: every aggregate equals pandas, none late."""
    ns = namespace
    app_id = f"et-{ns['tag']}"
    topo = topo_for(ns, partitions=4, idle_timeout="5m", latest=True)
    deploy(topo, say=lambda m: None, app_id=app_id)
    start = minute_now() - 600_000
    devices = [f"dev{i}" for i in range(12)]
    streams = [series_of(d, start, 240) for d in devices]
    batches = interleave(*streams)
    half = len(batches) // 2
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    worker = build_worker(topo, app_id)
    worker.start()
    grown = topo_for(ns, partitions=8, idle_timeout="5m", latest=True)
    try:
        for b in batches[:half]:
            send(producer, b, per=len(b))
        assert producer.flush(30) == 0
        with pytest.raises(RepartitionRefused, match="running member"):
            deploy(grown, say=lambda m: None, app_id=app_id)
        wait_for(
            lambda: worker.counters.readings >= sum(len(b) for b in batches[:half]), 60, "the first half"
        )
    finally:
        worker.stop()
    said: list[str] = []
    deploy(grown, say=said.append, app_id=app_id)
    assert any("moved with their devices" in m and not m.startswith("aggregation state: 0 ") for m in said), (
        said
    )
    after = TelemetryProducer(grown.broker.bootstrap, grown.raw_topic, grown.dlq_topic)
    moved = {b[0][0].rsplit("/", 1)[0] for b in batches[half:]}
    assert any(partition_for(d.encode(), 8, "consistent_random") >= 4 for d in moved)
    for b in batches[half:]:
        send(after, b, per=len(b))
    closers = [(f"site/{d}/a", start + 330_000, 0.0, "good") for d in devices]  # close minute 4 by clock
    send(after, closers, per=1)
    assert after.flush(30) == 0
    worker = build_worker(grown, app_id)
    worker.start()
    try:
        expected = expected_aggregates([r for s in streams for r in s])
        actual = complete(ns, expected)
        assert compare(actual, expected) == []
        assert worker.counters.late == 0
    finally:
        worker.stop()


def test_a_restore_that_cannot_read_the_whole_state_fails_loudly(namespace):
    ns = namespace
    name = f"{ns['prefix']}state-truncated"
    ensure_compacted_topic(ns["PLANTSTREAM_KAFKA"], name, 1, 1)
    out = Outbox(ns["PLANTSTREAM_KAFKA"], "truncated-restore")  # waits for room when its queue is full
    for i in range(200_000):
        out.produce(name, f"k{i}".encode(), codec.dumps({"i": i, "pad": "x" * 100}), None, 0)
    out.flush_sync(60)
    assert len(read_all(ns["PLANTSTREAM_KAFKA"], name, 0)) == 200_000
    with pytest.raises(IncompleteRead, match=r"refusing to start from part of the state"):
        read_all(ns["PLANTSTREAM_KAFKA"], name, 0, timeout=0.2)

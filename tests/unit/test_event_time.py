"""Per-device event time, future readings, duplicates, overflow, eviction and moves between partitions
(pipeline/stages/windows.py), without Kafka."""

from __future__ import annotations

import json
import random
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.stages.windows import MinuteAggregator
from tests.reference import compare, expected_aggregates
from tests.unit.test_aggregate import T0, batch, restored, run_all, run_with_crash

MAX = sys.float_info.max


def feed(agg, msgs, partition=0, start=0, wall_ms=None):
    """apply/due/finish per message as the stage does; returns (emitted aggregates, applied results)."""
    emitted, results = {}, []
    for off, m in enumerate(msgs, start=start):
        res = agg.apply(partition, off, m, wall_ms)
        results.append(res)
        closes = agg.due(partition, device=f"{m['site']}/{m['device']}")
        emitted.update({(c.series, c.window_start): c.aggregate for c in closes})
        agg.finish(partition, off, closes)
    return emitted, results


def test_a_backfilling_device_does_not_make_its_neighbours_late():
    agg = MinuteAggregator(grace_ms=10_000)
    live = T0 + 86_400_000  # a day later
    msgs = []
    for i in range(180):  # the live device and a device uploading yesterday's buffer, interleaved
        msgs.append(batch("live", [("p", live + i * 1000, float(i), "good")]))
        msgs.append(batch("old", [("p", T0 + i * 1000, float(i), "good")]))
    emitted, results = feed(agg, msgs)
    assert sum(len(r.late) for r in results) == 0
    emitted.update(run_all(agg, [], flush=True))
    for dev, t0 in (("live", live), ("old", T0)):
        for minute in range(3):
            a = emitted[(f"s1/{dev}/p", t0 + minute * 60_000)]
            assert a["count"] == 60 and a["first"] == minute * 60.0


def test_a_device_closes_its_windows_by_its_own_clock():
    agg = MinuteAggregator(grace_ms=10_000)
    feed(agg, [batch("a", [("p", T0 + 1_000, 1.0, "good")]), batch("b", [("p", T0 + 2_000, 2.0, "good")])])
    emitted, _ = feed(agg, [batch("a", [("p", T0 + 75_000, 1.0, "good")])], start=2)
    assert list(emitted) == [("s1/a/p", T0)]  # b's window stays open: b's clock has not moved
    assert agg.watermark("s1/b") == T0 + 2_000 - 10_000


def test_future_readings_go_back_and_move_no_clock():
    agg = MinuteAggregator(grace_ms=10_000, max_future_ms=300_000)
    wall = T0 + 30_000
    _, (res,) = feed(
        agg,
        [batch("d", [("p", T0 + 2 * 3_600_000, 9.0, "good"), ("p", T0 + 20_000, 1.0, "good")])],
        wall_ms=wall,
    )
    assert [r["ts"] for r in res.future] == [T0 + 2 * 3_600_000] and res.applied == 1
    assert agg.devices["s1/d"].mx == T0 + 20_000  # the future reading did not move the clock
    _, (ok,) = feed(agg, [batch("d", [("p", T0 + 21_000, 2.0, "good")])], start=1, wall_ms=wall)
    assert ok.applied == 1 and not ok.late


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31))
def test_every_reading_twice_gives_the_aggregates_of_once(seed):
    rng = random.Random(seed)
    readings = [
        (rng.choice("abc"), T0 + i * 700 + rng.choice([0, 0, 0, 13]), rng.uniform(-50, 50), "good")
        for i in range(300)
    ]
    seen: set[tuple[str, int]] = set()
    readings = [r for r in readings if (r[0], r[1]) not in seen and not seen.add((r[0], r[1]))]
    once = [batch("d", readings[i : i + 7]) for i in range(0, len(readings), 7)]
    twice = []
    for m in once:  # a redelivery soon after, and now and then a duplicate inside the same batch
        twice.append(m)
        if rng.random() < 0.5:
            twice.append(m)
        else:
            twice.append({**m, "readings": m["readings"] + m["readings"][:2]})
    a = run_all(MinuteAggregator(grace_ms=20_000), once)
    agg = MinuteAggregator(grace_ms=20_000)
    b = run_all(agg, twice)
    assert a == b and agg.duplicate_count > 0
    assert compare(b, expected_aggregates((f"s1/d/{p}", ts, v, q) for p, ts, v, q in readings)) == []


def test_statistics_that_overflow_are_null_and_the_state_stays_valid_json():
    agg = MinuteAggregator(grace_ms=10_000)
    feed(agg, [batch("d", [("p", T0 + 1_000, MAX, "good"), ("p", T0 + 2_000, MAX, "good")])])
    feed(agg, [batch("d", [("p", T0 + 3_000, -MAX, "good"), ("q", T0 + 3_000, MAX, "good")])], start=1)
    records = agg.checkpoint(0)
    for _, value in records:  # no Infinity, no NaN: strict JSON
        json.loads(value, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    again = restored(records, 10_000)  # a restart mid-window
    feed(again, [batch("d", [("p", T0 + 4_000, 2.0, "good")])], start=2)
    emitted, _ = feed(again, [batch("d", [("p", T0 + 80_000, 1.0, "good")])], start=3)
    a = emitted[("s1/d/p", T0)]
    assert a["count"] == 4 and a["max"] == MAX and a["min"] == -MAX and a["first"] == MAX and a["last"] == 2.0
    assert a["sum"] is None and a["mean"] is None and a["stddev"] is None  # beyond a double: unknown
    q = emitted[("s1/d/q", T0)]
    assert q["sum"] == MAX and q["mean"] == MAX and q["stddev"] is None


def test_an_evicted_device_keeps_its_clock():
    agg = MinuteAggregator(grace_ms=10_000)
    feed(agg, [batch("d", [("p", T0 + 1_000, 1.0, "good"), ("q", T0 + 2_000, 1.0, "good")])])
    agg.finish(0, 1, agg.due(0, flush_all=True))
    assert agg.evict(0, "s1/d") and not agg.series
    records = agg.checkpoint(0)
    assert (b"s1/d#0", None) in records  # the chunk leaves the compacted topic
    for engine in (agg, restored(records, 10_000)):
        _, (res,) = feed(engine, [batch("d", [("p", T0 + 30_000, 2.0, "good")])], start=5)
        assert len(res.late) == 1  # its window closed before the eviction


def test_a_device_that_moves_to_a_new_partition_loses_nothing():
    """telemetry.raw grew: the device's messages now come from partition 1, with lower offsets."""
    agg = MinuteAggregator(grace_ms=10_000)
    first = [batch("d", [("p", T0 + i * 1000, float(i), "good")]) for i in range(50)]
    later = [batch("d", [("p", T0 + (50 + i) * 1000, float(50 + i), "good")]) for i in range(100)]
    e1, _ = feed(agg, first, partition=0, start=1000)
    e2, results = feed(agg, later, partition=1, start=0)
    assert all(r.applied == 1 for r in results)
    out = {**e1, **e2, **run_all(agg, [], partition=1)}
    expected = expected_aggregates(("s1/d/p", T0 + i * 1000, float(i), "good") for i in range(150))
    assert compare(out, expected) == []


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 7), st.integers(0, 89), st.integers(0, 12))
def test_crash_anywhere_with_devices_on_their_own_clocks(seed, every, crash_at, cut):
    rng = random.Random(seed)
    offsets = {"a": 0, "b": 3_600_000, "c": -86_400_000}  # live, an hour ahead, a backfill
    msgs = []
    for i in range(90):
        dev = rng.choice("abc")
        base = T0 + offsets[dev] + i * 4_000
        msgs.append(
            batch(dev, [(pt, base + rng.randint(0, 3_000), rng.uniform(-9, 9), "good") for pt in "pqrst"])
        )
    clean = run_all(MinuteAggregator(grace_ms=5_000, chunk_points=2), msgs)
    assert run_with_crash(msgs, 5_000, every, crash_at, cut) == clean


def test_a_checkpoint_cut_before_the_device_head_replays_exactly():
    """The head commits its device's chunks: cut short after a chunk, the older head makes the replay judge
    each reading as the first run did (a newer head with an older chunk would call on-time readings late)."""
    msgs = [
        batch("other", [("p", T0 + 1_000, 0.0, "good")]),
        batch("d", [("p", T0 + 50_000, 1.0, "good"), ("q", T0 + 50_000, 2.0, "good")]),  # checkpointed
        batch("d", [("q", T0 + 58_000, 3.0, "good")]),
        batch("d", [("p", T0 + 70_000, 4.0, "good")]),  # closes [T0, T0 + 60 s); its checkpoint is cut
    ]
    clean = run_all(MinuteAggregator(grace_ms=5_000, chunk_points=1), msgs)
    for cut in range(6):
        assert run_with_crash(msgs, 5_000, every=2, crash_at=3, cut=cut) == clean, cut

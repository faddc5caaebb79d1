import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.aggregate import WM_PREFIX, MinuteAggregator
from tests.reference import compare, expected_aggregates

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def batch(device, readings, site="s1"):
    return {
        "v": 1,
        "source": "t",
        "site": site,
        "device": device,
        "readings": [{"point": p, "ts": ts, "value": v, "quality": q} for p, ts, v, q in readings],
    }


def run_all(agg, messages, partition=0, flush=True):
    """Feed messages through apply/due/finish as the agent does; return emitted aggregates."""
    emitted = {}
    for off, msg in enumerate(messages):
        agg.apply(partition, off, msg)
        closes = agg.due(partition)
        for c in closes:
            emitted[(c.series, c.window_start)] = c.aggregate
        agg.finish(partition, off, closes)
    if flush:
        closes = agg.due(partition, flush_all=True)
        for c in closes:
            emitted[(c.series, c.window_start)] = c.aggregate
        agg.finish(partition, len(messages), closes)
    return emitted


def test_single_window_statistics():
    agg = MinuteAggregator({}, grace_ms=0)
    msgs = [
        batch(
            "d",
            [
                ("p", T0 + 1000, 1.0, "good"),
                ("p", T0 + 3000, 3.0, "good"),
                ("p", T0 + 2000, 2.0, "bad"),
                ("p", T0 + 500, 4.0, "good"),
            ],
        )
    ]
    out = run_all(agg, msgs)
    a = out[("s1/d/p", T0)]
    assert a["count"] == 4 and a["good_count"] == 3
    assert a["min"] == 1.0 and a["max"] == 4.0 and a["sum"] == 8.0
    assert a["first"] == 4.0 and a["last"] == 3.0  # by event time, not arrival
    assert a["stddev"] == pytest.approx(1.5275252316519468)
    assert a["window_end"] == T0 + 60_000


def test_window_closes_only_after_grace():
    agg = MinuteAggregator({}, grace_ms=10_000)
    agg.apply(0, 0, batch("d", [("p", T0 + 59_000, 1.0, "good")]))
    assert agg.due(0) == []
    agg.apply(0, 1, batch("d", [("p", T0 + 69_999, 1.0, "good")]))
    assert agg.due(0) == []  # watermark T0+59_999 < window end
    agg.apply(0, 2, batch("d", [("p", T0 + 70_000, 1.0, "good")]))
    closes = agg.due(0)
    assert [c.window_start for c in closes] == [T0]


def test_late_reading_is_returned_not_applied():
    agg = MinuteAggregator({}, grace_ms=10_000)
    run_all(
        agg,
        [batch("d", [("p", T0 + 1_000, 1.0, "good")]), batch("d", [("p", T0 + 200_000, 1.0, "good")])],
        flush=False,
    )
    res = agg.apply(0, 5, batch("d", [("p", T0 + 2_000, 9.0, "good"), ("p", T0 + 195_000, 2.0, "good")]))
    assert [r["ts"] for r, _ in res.late] == [T0 + 2_000]
    assert res.applied == 1
    assert agg.late_count == 1


def test_replayed_message_is_skipped():
    store = {}
    agg = MinuteAggregator(store, grace_ms=0)
    m = batch("d", [("p", T0 + 1_000, 1.0, "good")])
    agg.apply(0, 0, m)
    agg.finish(0, 0, agg.due(0))
    assert agg.apply(0, 0, m).skipped
    # A new aggregator on the same state (a restart) skips it too.
    agg2 = MinuteAggregator(store, grace_ms=0)
    agg2.rebuild()
    assert agg2.apply(0, 0, m).skipped
    assert store[WM_PREFIX + "0"]["o"] == 0


def test_crash_between_apply_and_finish_replays_to_the_same_result():
    msgs = [
        batch("d", [("p", T0 + i * 7_000, float(i), "good"), ("q", T0 + i * 7_000, -float(i), "good")])
        for i in range(40)
    ]
    clean = run_all(MinuteAggregator({}, grace_ms=5_000), msgs)
    store = {}
    agg = MinuteAggregator(store, grace_ms=5_000)
    emitted = {}
    for off, m in enumerate(msgs[:25]):
        agg.apply(0, off, m)
        closes = agg.due(0)
        emitted.update({(c.series, c.window_start): c.aggregate for c in closes})
        if off == 24:
            break  # crash: message 24 applied, its windows not deleted, watermark not stored
        agg.finish(0, off, closes)
    restarted = MinuteAggregator(store, grace_ms=5_000)
    restarted.rebuild()
    out = {}
    for off, m in enumerate(msgs):
        if off < 20:
            continue  # committed offset was 19
        restarted.apply(0, off, m)
        closes = restarted.due(0)
        out.update({(c.series, c.window_start): c.aggregate for c in closes})
        restarted.finish(0, off, closes)
    closes = restarted.due(0, flush_all=True)
    out.update({(c.series, c.window_start): c.aggregate for c in closes})
    emitted.update(out)
    assert emitted == clean


def test_idle_flush_closes_everything_and_later_data_is_late():
    agg = MinuteAggregator({}, grace_ms=10_000)
    agg.apply(0, 0, batch("d", [("p", T0 + 5_000, 1.0, "good")]))
    closes = agg.due(0, flush_all=True)
    agg.finish(0, 1, closes)
    assert len(closes) == 1
    assert agg.watermark(0) == T0 + 60_000
    assert len(agg.apply(0, 2, batch("d", [("p", T0 + 6_000, 1.0, "good")])).late) == 1


def test_latest_only_moves_forward():
    agg = MinuteAggregator({}, grace_ms=60_000)
    r1 = agg.apply(0, 0, batch("d", [("p", T0 + 5_000, 1.0, "good"), ("p", T0 + 4_000, 2.0, "good")]))
    assert [(x["ts"], x["value"]) for x in r1.latest] == [(T0 + 5_000, 1.0)]
    r2 = agg.apply(0, 1, batch("d", [("p", T0 + 3_000, 3.0, "good")]))
    assert r2.latest == []


def test_all_bad_window_has_null_statistics():
    out = run_all(MinuteAggregator({}, grace_ms=0), [batch("d", [("p", T0, 1.0, "bad")])])
    a = out[("s1/d/p", T0)]
    assert a["count"] == 1 and a["good_count"] == 0
    assert a["mean"] is None and a["stddev"] is None and a["first"] is None


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 400), st.integers(0, 20_000))
def test_matches_pandas_on_shuffled_on_time_data(seed, n, grace):
    rng = random.Random(seed)
    points = ["a", "b", "c"]
    readings = []
    for i in range(n):
        ts = T0 + i * rng.randint(1, 3000)
        readings.append((rng.choice(points), ts, rng.uniform(-1e3, 1e3), rng.choice(["good"] * 5 + ["bad"])))
    # Unique timestamps per series: ties would make first/last depend on arrival order.
    seen = set()
    readings = [r for r in readings if (r[0], r[1]) not in seen and not seen.add((r[0], r[1]))]
    # Shuffle within the grace: a reading may arrive after newer ones, but never more than grace behind.
    arrival = sorted(readings, key=lambda r: r[1] + rng.uniform(0, grace))
    msgs, i = [], 0
    while i < len(arrival):
        k = rng.randint(1, 30)
        msgs.append(batch("d", [(p, ts, v, q) for p, ts, v, q in arrival[i : i + k]]))
        i += k
    agg = MinuteAggregator({}, grace_ms=grace)
    out = run_all(agg, msgs)
    assert agg.late_count == 0
    expected = expected_aggregates((f"s1/d/{p}", ts, v, q) for p, ts, v, q in readings)
    assert compare(out, expected) == []

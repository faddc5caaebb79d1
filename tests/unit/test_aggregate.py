import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.stages.windows import DEV_PREFIX, WM_PREFIX, MinuteAggregator
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
    agg = MinuteAggregator(grace_ms=0)
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
    agg = MinuteAggregator(grace_ms=10_000)
    agg.apply(0, 0, batch("d", [("p", T0 + 59_000, 1.0, "good")]))
    assert agg.due(0) == []
    agg.apply(0, 1, batch("d", [("p", T0 + 69_999, 1.0, "good")]))
    assert agg.due(0) == []  # watermark T0+59_999 < window end
    agg.apply(0, 2, batch("d", [("p", T0 + 70_000, 1.0, "good")]))
    closes = agg.due(0)
    assert [c.window_start for c in closes] == [T0]


def test_late_reading_is_returned_not_applied():
    agg = MinuteAggregator(grace_ms=10_000)
    run_all(
        agg,
        [batch("d", [("p", T0 + 1_000, 1.0, "good")]), batch("d", [("p", T0 + 200_000, 1.0, "good")])],
        flush=False,
    )
    res = agg.apply(0, 5, batch("d", [("p", T0 + 2_000, 9.0, "good"), ("p", T0 + 195_000, 2.0, "good")]))
    assert [r["ts"] for r, _ in res.late] == [T0 + 2_000]
    assert res.applied == 1
    assert agg.late_count == 1


def restored(records, grace_ms, partition=0, **kw):
    """A restarted aggregator: the state is what the checkpoint records hold."""
    agg = MinuteAggregator(grace_ms=grace_ms, **kw)
    agg.restore(partition, records)
    return agg


def test_replayed_message_is_skipped():
    agg = MinuteAggregator(grace_ms=0)
    m = batch("d", [("p", T0 + 1_000, 1.0, "good")])
    agg.apply(0, 0, m)
    agg.finish(0, 0, agg.due(0))
    assert agg.apply(0, 0, m).skipped
    records = agg.checkpoint(0)
    assert dict(records)[(WM_PREFIX + "0").encode()] == b'{"o":0}'
    assert dict(records)[(DEV_PREFIX + "s1/d").encode()] == b'{"p":0,"mx":%d,"wm":%d,"q":1}' % (
        T0 + 1_000,
        T0 + 1_000,
    )
    # A new aggregator on the checkpoint (a restart) skips it too.
    assert restored(records, 0).apply(0, 0, m).skipped
    assert agg.checkpoint(0) == []  # nothing changed since


def test_checkpoint_holds_only_what_changed():
    agg = MinuteAggregator(grace_ms=60_000, chunk_points=2)
    agg.apply(0, 0, batch("d", [("a", T0, 1.0, "good"), ("b", T0, 1.0, "good"), ("c", T0, 1.0, "good")]))
    keys = [k for k, _ in agg.checkpoint(0)]
    head, part = (DEV_PREFIX + "s1/d").encode(), (WM_PREFIX + "0").encode()
    assert keys == [b"s1/d#0", b"s1/d#1", head, part]  # chunks of 2 series in order, the device's head
    agg.apply(0, 1, batch("d", [("c", T0 + 1, 2.0, "good")]))
    assert [k for k, _ in agg.checkpoint(0)] == [b"s1/d#1", head, part]


def run_with_crash(msgs, grace, every, crash_at, cut):
    """Run with a checkpoint every ``every`` messages, crash after message ``crash_at`` (keeping only the
    first ``cut`` records of the checkpoint in flight, if any), restart and replay from the committed offset.
    Returns every aggregate emitted, before and after the crash (the later emission of a window wins, as
    the database upsert would have it)."""
    agg = MinuteAggregator(grace_ms=grace, chunk_points=2)
    log: list[tuple[bytes, bytes]] = []
    committed = -1
    emitted = {}
    for off, m in enumerate(msgs):
        agg.apply(0, off, m)
        closes = agg.due(0)
        emitted.update({(c.series, c.window_start): c.aggregate for c in closes})
        agg.finish(0, off, closes)
        if off % every == every - 1 or off == crash_at:
            records = agg.checkpoint(0)
            if off == crash_at:
                log.extend(records[:cut])  # the crash cut this checkpoint short: no ack, no commit
                break
            log.extend(records)
            committed = off
    again = restored(log, grace, chunk_points=2)
    for off in range(committed + 1, len(msgs)):
        again.apply(0, off, msgs[off])
        closes = again.due(0)
        emitted.update({(c.series, c.window_start): c.aggregate for c in closes})
        again.finish(0, off, closes)
    emitted.update({(c.series, c.window_start): c.aggregate for c in again.due(0, flush_all=True)})
    return emitted


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 7), st.integers(0, 59), st.integers(0, 8))
def test_crash_anywhere_replays_to_the_same_result(seed, every, crash_at, cut):
    rng = random.Random(seed)
    points = ["p", "q", "r", "s", "t"]  # three chunks of at most two series
    msgs = [
        batch(
            "d",
            [
                (pt, T0 + i * 7_000 + rng.randint(0, 4_000), rng.uniform(-9, 9), "good")
                for pt in points
                if rng.random() < 0.7
            ],
        )
        for i in range(60)
    ]
    clean = run_all(MinuteAggregator(grace_ms=5_000, chunk_points=2), msgs)
    assert run_with_crash(msgs, 5_000, every, crash_at, cut) == clean


def test_idle_flush_closes_everything_and_later_data_is_late():
    agg = MinuteAggregator(grace_ms=10_000)
    agg.apply(0, 0, batch("d", [("p", T0 + 5_000, 1.0, "good")]))
    closes = agg.due(0, flush_all=True)
    agg.finish(0, 1, closes)
    assert len(closes) == 1
    assert agg.watermark("s1/d") == T0 + 60_000
    assert len(agg.apply(0, 2, batch("d", [("p", T0 + 6_000, 1.0, "good")])).late) == 1


def test_latest_only_moves_forward():
    agg = MinuteAggregator(grace_ms=60_000)
    agg.apply(0, 0, batch("d", [("p", T0 + 5_000, 1.0, "good"), ("p", T0 + 4_000, 2.0, "good")]))
    assert [(x["ts"], x["value"]) for x in agg.take_latest(0)] == [(T0 + 5_000, 1.0)]
    agg.apply(0, 1, batch("d", [("p", T0 + 3_000, 3.0, "good")]))
    assert agg.take_latest(0) == []
    agg.apply(0, 2, batch("d", [("p", T0 + 6_000, 4.0, "good"), ("p", T0 + 7_000, 5.0, "good")]))
    assert [(x["ts"], x["value"]) for x in agg.take_latest(0)] == [(T0 + 7_000, 5.0)]  # coalesced


def test_all_bad_window_has_null_statistics():
    out = run_all(MinuteAggregator(grace_ms=0), [batch("d", [("p", T0, 1.0, "bad")])])
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
    agg = MinuteAggregator(grace_ms=grace)
    out = run_all(agg, msgs)
    assert agg.late_count == 0
    expected = expected_aggregates((f"s1/d/{p}", ts, v, q) for p, ts, v, q in readings)
    assert compare(out, expected) == []

"""The vectorised fold (MinuteAggregator.apply_many) against the same messages applied one at a time: the
same aggregates to the bit, the same late, future and duplicate readings, the same newest readings."""

from __future__ import annotations

import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.records import Scan
from pipeline.stages import windows
from pipeline.stages.windows import MinuteAggregator
from tests.unit.test_aggregate import T0, batch

MAX = sys.float_info.max


def workload(seed: int, n_msgs: int) -> list[dict]:
    rng = random.Random(seed)
    devices = ["a", "b", "c"]
    clock = {d: T0 + rng.randint(0, 5_000) for d in devices}
    msgs = []
    for _ in range(n_msgs):
        d = rng.choice(devices)
        clock[d] += rng.choice([0, 500, 1_000, 1_000, 1_000, 3_000, 20_000])
        readings = []
        for p in rng.sample(["p", "q", "r", "s", "t", "u"], rng.randint(1, 6)):
            for _ in range(rng.choice([1, 1, 1, 2, 12])):
                ts = clock[d] + rng.choice([0, 0, 0, -1_000, -2_000, 7, -45_000, -90_000, 1_000])
                v = rng.choice([rng.uniform(-100, 100), rng.uniform(-1e6, 1e6), float(rng.randint(0, 3))])
                if rng.random() < 0.01:
                    v = rng.choice([MAX, -MAX])
                q = rng.choices(["good", "uncertain", "bad"], [90, 5, 5])[0]
                readings.append((p, ts, v, q))
        m = batch(d, readings)
        if rng.random() < 0.2:
            m["readings"] = m["readings"] + m["readings"][: rng.randint(1, 3)]  # duplicates inside
        msgs.append(m)
        if rng.random() < 0.1:
            msgs.append(m)  # a redelivery
    return msgs


def one_by_one(msgs, wall_ms=None, **kw):
    agg = MinuteAggregator(**kw)
    emitted, per_msg, latest = {}, [], []
    for off, m in enumerate(msgs):
        res = agg.apply(0, off, m, wall_ms)
        per_msg.append((sorted((r["ts"], r["point"], w) for r, w in res.late), res.duplicates, res.applied))
        closes = agg.due(0, device=f"{m['site']}/{m['device']}")
        emitted.update({(c.series, c.window_start): c.aggregate for c in closes})
        agg.finish(0, off, closes)
        latest.extend((x["point"], x["ts"], x["value"], x["quality"]) for x in agg.take_latest(0))
    closes = agg.due(0, flush_all=True)
    emitted.update({(c.series, c.window_start): c.aggregate for c in closes})
    return emitted, per_msg, agg


def batched(msgs, cuts, wall_ms=None, **kw):
    agg = MinuteAggregator(**kw)
    emitted, per_msg = {}, []
    start = 0
    for end in [*cuts, len(msgs)]:
        group = msgs[start:end]
        if not group:
            continue
        items = [(off, Scan.of_batch(m)) for off, m in enumerate(group, start=start)]
        for res in agg.apply_many(0, items, wall_ms):
            late = sorted((r["ts"], r["point"], w) for r, w in res.late)
            per_msg.append((late, res.duplicates, res.applied))
        closes = []
        for dev in sorted({f"{m['site']}/{m['device']}" for m in group}):
            closes += agg.due(0, device=dev)
        emitted.update({(c.series, c.window_start): c.aggregate for c in closes})
        agg.finish(0, end - 1, closes)
        start = end
    closes = agg.due(0, flush_all=True)
    emitted.update({(c.series, c.window_start): c.aggregate for c in closes})
    agg.finish(0, len(msgs), closes)
    return emitted, per_msg, agg


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 120), st.data())
def test_batches_of_any_size_give_what_one_at_a_time_gives(seed, n_msgs, data):
    msgs = workload(seed, n_msgs)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(msgs)), max_size=8))))
    a, pa, _ = one_by_one(msgs, grace_ms=10_000)
    b, pb, _ = batched(msgs, cuts, grace_ms=10_000)
    assert b == a  # every statistic to the bit
    assert pb == pa


@pytest.mark.parametrize("fold_max", [1, 7, 1 << 19])
def test_one_big_batch_with_long_windows(monkeypatch, fold_max):
    # 200 readings per window in one batch: the vector steps, then the long tail one by one.
    monkeypatch.setattr(windows, "FOLD_MAX", fold_max)
    rng = random.Random(5)
    msgs = [
        batch(f"d{d}", [(f"p{p}", T0 + i * 250 + d, rng.uniform(-5, 5), "good") for p in range(12)])
        for i in range(200)
        for d in range(3)
    ]
    msgs[17]["readings"][3]["value"] = MAX  # one window overflows mid-batch
    a, pa, _ = one_by_one(msgs, grace_ms=5_000)
    b, pb, agg = batched(msgs, [], grace_ms=5_000)
    assert b == a and pb == pa
    assert agg.cols.cap - len(agg.cols.free) == 0  # every window closed, every slot given back


def test_newest_reading_per_series_across_a_batch():
    agg = MinuteAggregator(grace_ms=120_000)
    msgs = [
        batch("d", [("p", T0 + 5_000, 1.0, "good"), ("q", T0 + 1_000, 7.0, "bad")]),
        batch("d", [("p", T0 + 65_000, 2.0, "uncertain"), ("p", T0 + 4_000, 3.0, "good")]),
        batch("d", [("p", T0 + 65_000, 4.0, "good")]),  # same time, later arrival: a duplicate, not newer
        batch("d", [("q", T0 + 1_000, 8.0, "good")]),  # a duplicate of q's first
    ]
    res = agg.apply_many(0, [(i, Scan.of_batch(m)) for i, m in enumerate(msgs)])
    assert [r.duplicates for r in res] == [0, 0, 1, 1]
    got = sorted((x["point"], x["ts"], x["value"], x["quality"]) for x in agg.take_latest(0))
    assert got == [("p", T0 + 65_000, 2.0, "uncertain"), ("q", T0 + 1_000, 7.0, "bad")]


def test_latest_records_are_the_json_of_take_latest():
    import orjson

    msgs = [
        batch(
            "d", [("p", T0 + 5_000, 1.5, "good"), ("q", T0 + 1_000, -0.0, "bad"), ("r", T0, 1e300, "good")]
        ),
        {
            "v": 1,
            "source": "t",
            "site": "s1",
            "device": "e",
            "readings": [
                {"point": 'x"y', "ts": T0, "value": 2.0, "quality": "uncertain", "unit": "°C"},
                {"point": "z", "ts": T0, "value": 3.0, "quality": "good", "status": {"code": 7}},
            ],
        },
    ]
    a, b = MinuteAggregator(grace_ms=0), MinuteAggregator(grace_ms=0)
    for agg in (a, b):
        for i, m in enumerate(msgs):
            agg.apply(0, i, m)
    want = {f"{x['site']}/{x['device']}/{x['point']}": x for x in a.take_latest(0)}
    got = {k.decode(): (orjson.loads(v), ts) for k, v, ts in b.latest_records(0)}
    assert {k: v for k, (v, _) in got.items()} == want
    assert all(ts == want[k]["ts"] for k, (_, ts) in got.items())
    assert list(b.latest_records(0)) == []


def test_a_checkpoint_of_the_list_format_is_restored():
    # What versions before the columns wrote: a list per window. A restart on it goes on exactly.
    import orjson

    from pipeline.stages.windows import DEV_PREFIX, WM_PREFIX

    msgs = [
        batch("d", [("p", T0 + i * 1_000, float(i), "good"), ("q", T0 + i * 1_000 + 7, 2.0 * i, "bad")])
        for i in range(5)
    ]
    clean = MinuteAggregator(grace_ms=10_000)
    for off, m in enumerate(msgs):
        clean.apply(0, off, m)
    p_state = [2, 2, 0.5, 0.5, 0.0, 1.0, 1.0, 0.0, T0, 0.0, T0 + 1_000, 1.0, 0b11, None, 0, 0]
    q_state = [2, 0, 0.0, 0.0, None, None, 0.0, 0.0, None, None, None, None, 0, [7, 1_007], 0, 7]
    legacy = [
        (
            b"s1/d#0",
            orjson.dumps(
                {
                    "o": {"0": 1},
                    "s": [
                        ["p", T0 + 1_000, None, [[T0, *p_state]]],
                        ["q", T0 + 1_007, "kW", [[T0, *q_state]]],
                    ],
                }
            ),
        ),
        (
            (DEV_PREFIX + "s1/d").encode(),
            orjson.dumps({"p": 0, "mx": T0 + 1_007, "wm": T0 + 1_007 - 10_000, "q": 1}),
        ),
        ((WM_PREFIX + "0").encode(), b'{"o":1}'),
    ]
    again = MinuteAggregator(grace_ms=10_000)
    again.restore(0, legacy)
    for off, m in enumerate(msgs[2:], start=2):
        again.apply(0, off, m)
    a = {(c.series, c.window_start): c.aggregate for c in clean.due(0, flush_all=True)}
    b = {(c.series, c.window_start): c.aggregate for c in again.due(0, flush_all=True)}
    assert a.keys() == b.keys()
    for k in a:
        assert {f: v for f, v in b[k].items() if f != "unit"} == {
            f: v for f, v in a[k].items() if f != "unit"
        }
    assert b[("s1/d/q", T0)]["unit"] == "kW"
    # and the columns written now restore to the same state
    third = MinuteAggregator(grace_ms=10_000)
    third.restore(0, again.checkpoint(0))
    assert {(c.series, c.window_start): c.aggregate for c in third.due(0, flush_all=True)} == b


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31))
def test_partitions_folded_together_give_what_each_alone_gives(seed):
    msgs0 = workload(seed, 40)
    msgs1 = [{**m, "site": "s2"} for m in workload(seed + 1, 40)]  # other devices, on partition 1
    a = MinuteAggregator(grace_ms=10_000)
    b = MinuteAggregator(grace_ms=10_000)
    ra = [
        a.apply_many(p, [(i, Scan.of_batch(m)) for i, m in enumerate(ms)])
        for p, ms in ((0, msgs0), (1, msgs1))
    ]
    rb = b.apply_partitions(
        {p: [(i, Scan.of_batch(m)) for i, m in enumerate(ms)] for p, ms in ((0, msgs0), (1, msgs1))}
    )
    for p, res in enumerate(ra):
        assert [(r.applied, r.duplicates, len(r.late)) for r in res] == [
            (r.applied, r.duplicates, len(r.late)) for r in rb[p]
        ]
        ea = {(c.series, c.window_start): c.aggregate for c in a.due(p, flush_all=True)}
        eb = {(c.series, c.window_start): c.aggregate for c in b.due(p, flush_all=True)}
        assert ea == eb and ea
    assert a.duplicate_count == b.duplicate_count

"""Loop KPI stream logic without Kafka: routing, state, alignment, window closing, replays and crashes."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator, MutableMapping
from typing import Any

import numpy as np
import orjson
import pytest

from connectors.timescale.rows import kpi_rows
from connectors.timescale.writer import COLUMNS as WRITER_COLUMNS
from pipeline.core.records import ReadingBatch
from pipeline.stages.loops.engine import (
    BUCKET_INFIX,
    Grid,
    LoopDef,
    LoopEngine,
    LoopRouter,
    align_grid,
    horizon_key,
    run_job,
)
from pipeline.topology import validate_data
from tests.unit.test_loops_reference import T0, differences, reference_kpis, scenario_samples

COLUMNS = WRITER_COLUMNS["kpi_results"]

LOOP = {
    "id": "L1",
    "pv": "s/d/pv",
    "sp": "s/d/sp",
    "op": "s/d/op",
    "mode": "s/d/mode",
    "pv_lo": 0,
    "pv_hi": 100,
    "ti": 10,
    "dead_time": 2,
    "ts": 1,
    "window": "2m",
    "horizon": "20m",
    "grace": "10s",
}


def loop_def(**over: Any) -> LoopDef:
    topo = validate_data({"name": "t", "loops": [{**LOOP, **over}]})
    return LoopDef.from_topology(topo.loops[0])


def messages(samples: list[list[Any]], per: int, shuffle_ms: int = 0, seed: int = 1) -> list[list[list[Any]]]:
    """Samples in messages of ``per`` samples, optionally out of order within ``shuffle_ms``."""
    rows = list(samples)
    if shuffle_ms:
        rng = random.Random(seed)
        rows.sort(key=lambda s: s[1] + rng.uniform(0, shuffle_ms))
    return [rows[i : i + per] for i in range(0, len(rows), per)]


class Driver:
    """Runs messages through apply/due/run_job/finish as the loop-kpi agent does."""

    def __init__(self, d: LoopDef, store: MutableMapping[str, Any] | None = None) -> None:
        self.d = d
        self.store: MutableMapping[str, Any] = {} if store is None else store
        self.engine = LoopEngine(self.store, {d.id: d})
        self.emitted: list[dict[str, Any]] = []
        self.late: list[list[Any]] = []

    def feed(self, msgs: list[list[list[Any]]], start: int = 0, src: bool = True) -> None:
        for off in range(start, len(msgs)):
            a = self.engine.apply(self.d.id, 0, off, msgs[off], [0, off] if src else None)
            self.late += a.late
            self.close(off)

    def close(self, off: int, flush_all: bool = False) -> None:
        job = self.engine.due(self.d.id, flush_all=flush_all)
        if job is not None:
            res = run_job(job)
            self.emitted += orjson.loads(orjson.dumps(res.records))  # as sent: JSON
            self.engine.finish(self.d.id, 0, off, job, res)

    def flush(self, off: int) -> None:
        self.close(off, flush_all=True)

    def results(self) -> dict[int, dict[str, Any]]:
        return {r["window_start"]: r["kpis"] for r in self.emitted}


# -- routing ---------------------------------------------------------------------------------------


def test_router_picks_only_loop_points_and_shares_series_between_loops():
    a = loop_def()
    b = loop_def(id="L2", pv="s/e/pv", sp="s/d/op", op="s/e/op", mode=None)  # a cascade slave: SP = L1's OP
    r = LoopRouter([a, b])
    assert set(r.devices) == {("s", "d"), ("s", "e")}
    batch: ReadingBatch = {
        "v": 1,
        "source": "x",
        "site": "s",
        "device": "d",
        "readings": [
            {"point": "pv", "ts": T0, "value": 1.0, "quality": "good"},
            {"point": "other", "ts": T0, "value": 2.0, "quality": "good"},
            {"point": "op", "ts": T0, "value": 3.0, "quality": "bad"},
        ],
    }
    out = r.split(batch)
    assert out == {"L1": [[0, T0, 1.0, 1], [2, T0, 3.0, 0]], "L2": [[1, T0, 3.0, 0]]}
    batch["device"] = "zz"
    assert r.split(batch) == {}


# -- windows equal the offline reference -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "per", "shuffle"),
    [
        ("sticky_valve", 4, 0),
        ("aggressive", 40, 0),
        ("external_disturbance", 200, 8_000),
        ("mostly_manual", 37, 5_000),
    ],
)
def test_stream_windows_equal_the_offline_reference(name, per, shuffle):
    d = loop_def()
    samples, _ = scenario_samples(name, 1500)
    drv = Driver(d)
    drv.feed(messages(samples, per, shuffle))
    drv.flush(10_000)
    assert drv.late == []
    got = drv.results()
    assert len(got) == 13 and len(drv.emitted) == 13  # 1500 s: 12 full windows and a partial one
    assert [r["closed_by"] for r in drv.emitted] == ["watermark"] * 12 + ["idle"]
    assert differences(got, reference_kpis(d, samples)) == []
    assert all(r["samples"] == 480 for r in drv.emitted[:12])


def test_the_reference_comparison_can_fail():
    d = loop_def()
    samples, _ = scenario_samples("aggressive", 600)
    drv = Driver(d)
    dropped = [s for s in samples if not (s[0] == 0 and T0 + 200_000 <= s[1] < T0 + 210_000)]  # 10 s of PV
    drv.feed(messages(dropped, 20))
    drv.flush(10_000)
    diff = differences(drv.results(), reference_kpis(d, samples))
    assert any("data_quality" in line for line in diff)


def test_windows_close_on_the_loops_own_event_time_plus_grace():
    d = loop_def(grace="15s")
    samples, _ = scenario_samples("well_tuned", 140)
    drv = Driver(d)
    drv.feed(messages([s for s in samples if s[1] < T0 + 134_000], 4))
    assert drv.emitted == []  # newest 133 s: the first window [0, 120) needs 135 s
    drv.feed(messages(samples, 4), start=134 * 4 // 4)
    assert [r["window_start"] for r in drv.emitted] == [T0]


# -- state and replays ------------------------------------------------------------------------------


class LoggedStore(dict):
    """A dict that logs every write as the changelog would hold it (JSON), in order."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, Any]] = []

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.log.append((key, orjson.loads(orjson.dumps(value))))

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.log.append((key, None))

    def restored(self, upto: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.log[:upto]:
            if value is None:
                out.pop(key, None)
            else:
                out[key] = copy.deepcopy(value)
        return out


def test_replaying_the_input_changes_nothing():
    d = loop_def()
    samples, _ = scenario_samples("sticky_valve", 700)
    msgs = messages(samples, 12)
    drv = Driver(d)
    drv.feed(msgs)
    once = {k: orjson.dumps(v) for k, v in drv.store.items()}
    n = len(drv.emitted)
    drv.feed(msgs)  # the same offsets again: every message skipped
    assert {k: orjson.dumps(v) for k, v in drv.store.items()} == once and len(drv.emitted) == n


def test_samples_routed_again_after_an_aggregation_restart_are_dropped():
    d = loop_def()
    samples, _ = scenario_samples("aggressive", 400)
    msgs = messages(samples, 16)
    drv = Driver(d)
    for off, m in enumerate(msgs[:60]):
        drv.engine.apply(d.id, 0, off, m, [3, 1000 + off])
        drv.close(off)
    # The aggregation agent restarts from raw offset 1040 and routes messages 40..59 again, at new offsets.
    for i, m in enumerate(msgs[40:60]):
        a = drv.engine.apply(d.id, 0, 60 + i, m, [3, 1040 + i])
        assert a.duplicate and a.applied == 0 and a.late == []
    for off, m in enumerate(msgs[60:], start=80):
        drv.engine.apply(d.id, 0, off, m, [3, 1000 + off - 20])
        drv.close(off)
    drv.flush(10_000)
    assert differences(drv.results(), reference_kpis(d, samples)) == []


@pytest.mark.parametrize("seed", range(6))
def test_a_crash_at_any_point_then_a_replay_gives_the_same_records(seed):
    """Kill the worker after any state write; restart from the changelog and an older committed offset."""
    d = loop_def()
    samples, _ = scenario_samples("sticky_valve", 1300, seed=seed)
    msgs = messages(samples, 23, shuffle_ms=3_000, seed=seed)
    expected = reference_kpis(d, samples)

    clean = Driver(d, LoggedStore())
    clean.feed(msgs)
    clean.flush(10_000)
    assert differences(clean.results(), expected) == []
    writes = clean.store.log  # type: ignore[attr-defined]

    rng = random.Random(seed)
    for _ in range(12):
        # Crash after write j; the input was committed up to some message at or before that write's.
        j = rng.randrange(1, len(writes))
        run = Driver(d, LoggedStore())
        crashed_at = None
        for off in range(len(msgs)):
            before = len(run.store.log)  # type: ignore[attr-defined]
            run.engine.apply(d.id, 0, off, msgs[off], [0, off])
            run.close(off)
            if len(run.store.log) >= j:  # type: ignore[attr-defined]
                crashed_at = off
                cut = max(before, j)
                break
        assert crashed_at is not None
        restored = run.store.restored(cut)  # type: ignore[attr-defined]
        committed = rng.randint(0, crashed_at)
        again = Driver(d, restored)
        again.emitted = list(run.emitted)  # what reached loops.kpi before the crash stays there
        again.feed(msgs, start=committed)
        again.flush(10_000)
        # Every record sent for a window, before or after the crash, is the reference's.
        for rec in again.emitted:
            assert (
                differences(
                    {rec["window_start"]: rec["kpis"]}, {rec["window_start"]: expected[rec["window_start"]]}
                )
                == []
            )
        assert set(again.results()) == set(expected)


def test_a_crash_between_the_horizon_record_and_the_head_is_repaired():
    d = loop_def()
    samples, _ = scenario_samples("aggressive", 700)
    msgs = messages(samples, 30)
    # Find a message that closes a window, and stop right after its horizon record is written.
    drv = Driver(d)
    for off, m in enumerate(msgs):
        drv.engine.apply(d.id, 0, off, m, [0, off])
        job = drv.engine.due(d.id)
        if job is not None and job.windows:
            res = run_job(job)
            drv.emitted += orjson.loads(orjson.dumps(res.records))
            drv.store[horizon_key(d.id)] = res.horizon  # ... and the worker dies here
            break
    assert drv.emitted
    drv.feed(msgs, start=off)  # replayed from this message
    drv.flush(10_000)
    assert differences(drv.results(), reference_kpis(d, samples)) == []
    assert not any(
        BUCKET_INFIX in k and int(k.split(BUCKET_INFIX)[1]) < drv.store[d.id]["ct"] for k in drv.store
    )


def test_late_samples_are_returned_not_applied():
    d = loop_def()
    samples, _ = scenario_samples("well_tuned", 300)
    drv = Driver(d)
    drv.feed(messages(samples, 40))
    ct = drv.store[d.id]["ct"]
    assert ct == T0 + 240_000
    a = drv.engine.apply(d.id, 0, 9_999, [[0, T0 + 100_000, 5.0, 1], [0, T0 + 299_500, 5.0, 1]], None)
    assert a.late == [[0, T0 + 100_000, 5.0, 1]] and a.applied == 1


def test_idle_flush_closes_open_windows_and_later_samples_for_them_are_late():
    d = loop_def()
    samples, _ = scenario_samples("well_tuned", 330)
    drv = Driver(d)
    drv.feed(messages(samples[: 4 * 150], 8))  # up to 150 s: window [0, 120) closed, [120, 240) open
    assert [r["window_start"] for r in drv.emitted] == [T0]
    drv.flush(5_000)
    assert [(r["window_start"], r["closed_by"], r["samples"]) for r in drv.emitted[1:]] == [
        (T0 + 120_000, "idle", 120)
    ]
    a = drv.engine.apply(d.id, 0, 6_000, [[0, T0 + 150_000, 1.0, 1], [0, T0 + 240_000, 1.0, 1]], None)
    assert [s[1] for s in a.late] == [T0 + 150_000] and a.applied == 1


def test_windows_without_samples_give_no_record_and_the_horizon_holds_the_gap():
    d = loop_def()
    samples, _ = scenario_samples("external_disturbance", 2400)
    gap = [s for s in samples if not (T0 + 600_000 <= s[1] < T0 + 1_440_000)]  # 14 min without data
    drv = Driver(d)
    drv.feed(messages(gap, 50))
    drv.flush(10_000)
    got = drv.results()
    assert T0 + 600_000 not in got and T0 + 1_320_000 not in got and T0 + 1_440_000 in got
    assert differences(got, reference_kpis(d, gap)) == []
    # A gap longer than the horizon as well.
    long_gap = [s for s in samples if not (T0 + 240_000 <= s[1] < T0 + 1_800_000)]
    drv = Driver(d)
    drv.feed(messages(long_gap, 50))
    drv.flush(10_000)
    assert differences(drv.results(), reference_kpis(d, long_gap)) == []


def test_state_records_stay_small():
    d = loop_def(window="1m", horizon="30m")
    samples, _ = scenario_samples("aggressive", 3600)
    drv = Driver(d, LoggedStore())
    drv.feed(messages(samples, 8))
    head = drv.store[d.id]
    assert len(head["b"]) <= 2 and len(orjson.dumps(head)) < 300
    h = drv.store[horizon_key(d.id)]
    assert h["grid"]["n"] == d.capacity == 1800
    assert len(orjson.dumps(h)) < 1800 * 16 * 4 // 3 + 2048  # PV, SP, OP, MODE as float32, base64
    biggest = max(len(orjson.dumps(v)) for k, v in drv.store.log if v is not None and BUCKET_INFIX in k)  # type: ignore[attr-defined]
    assert biggest < 6_000  # a bucket: 50 s x 4 tags
    grid = Grid.from_record(h["grid"])
    assert grid.n == 1800 and grid.valid.all() and grid.t0 == head["ct"] - 1800_000


# -- alignment ---------------------------------------------------------------------------------------


def test_align_grid_hold_quality_modes_and_float32_storage():
    d = loop_def(pv_lo=1000, pv_hi=1010)
    s = [
        [0, T0 + 0, 1005.123456789, 1],
        [1, T0, 1005.0, 1],
        [2, T0, 40.0, 1],
        [3, T0, 1.0, 1],
        [0, T0 + 1000, 1006.0, 0],  # bad quality
        [3, T0 + 2000, 7.0, 1],  # unknown mode code
        [0, T0 + 2000, 1006.5, 1],
    ]
    g = align_grid(d, s, T0, T0 + 6000)
    w = g.window(d)
    assert w.valid.tolist() == [True, False, True, True, False, False]  # hold 3 s; bad PV at 1 s
    assert w.mode.tolist()[:3] == ["AUTO", "AUTO", "7"]
    assert w.pv[0] == pytest.approx(1005.123456789, abs=1e-5) and w.pv[0] != 1005.123456789
    assert w.t[0] == T0 / 1000 and w.ts == 1.0


def test_a_loop_without_mode_is_always_in_normal_mode_and_sp_can_be_held_longer():
    d = loop_def(mode=None, hold={"sp": "1h"})
    pv = [[0, T0 + k * 1000, 50.0 + np.sin(k / 5), 1] for k in range(240)]
    op = [[2, T0 + k * 1000, 40.0, 1] for k in range(240)]
    sp = [[1, T0, 50.0, 1]]  # reported once, on change
    drv = Driver(d)
    drv.feed(messages(sorted(sp + pv + op, key=lambda s: s[1]), 30))
    drv.flush(1_000)
    k = drv.results()[T0]
    assert k["data_quality"]["value"] == 100.0 and k["service_factor"]["value"] == 100.0
    d2 = loop_def(mode=None)
    drv2 = Driver(d2)
    drv2.feed(messages(sorted(sp + pv + op, key=lambda s: s[1]), 30))
    drv2.flush(1_000)
    assert drv2.results()[T0]["data_quality"]["value"] == pytest.approx(100 * 4 / 120)


# -- the sink rows -----------------------------------------------------------------------------------


def test_kpi_rows_one_per_kpi():
    d = loop_def()
    samples, _ = scenario_samples("well_tuned", 140)
    drv = Driver(d)
    drv.feed(messages(samples, 40))
    rec = drv.emitted[0]
    rows = kpi_rows(rec)
    assert len(rows) == len(rec["kpis"]) and len(rows[0]) == len(COLUMNS)
    by = {r[2]: dict(zip(COLUMNS, r, strict=True)) for r in rows}
    assert by["service_factor"]["value"] == 100.0 and by["service_factor"]["loop_id"] == "L1"
    assert (
        by["osc_flag"]["status"] == "insufficient_data" and orjson.loads(by["osc_flag"]["extras"]) is not None
    )
    assert by["sat_hi"]["window_start"].timestamp() * 1000 == T0 and by["sat_hi"]["samples"] == 480
    with pytest.raises(KeyError):
        kpi_rows({"loop": "x"})


def _iter_scenarios() -> Iterator[str]:
    yield from ("well_tuned", "saturated")


@pytest.mark.parametrize("name", list(_iter_scenarios()))
def test_horizon_record_round_trips_exactly(name):
    d = loop_def()
    samples, _ = scenario_samples(name, 400)
    drv = Driver(d)
    drv.feed(messages(samples, 40))
    rec = drv.store[horizon_key(d.id)]
    assert orjson.loads(orjson.dumps(rec)) == rec  # the changelog form is the in-memory form
    g = Grid.from_record(rec["grid"])
    assert Grid.from_record(g.to_record()).to_record() == rec["grid"]

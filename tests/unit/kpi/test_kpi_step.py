"""docs/loop-kpis.md §7: set-point step response."""

import math

import numpy as np
import pytest

from pipeline.kpi import LoopConfig, LoopWindow, Status, compute_all
from pipeline.kpi.step import INTERRUPTED, NOT_SETTLED, SETTLED, find_step_responses, step_kpis


def run_step(z, t, sp=None, ok=None, ts=1.0):
    sp = np.where(t >= 0, 1.0, 0.0) if sp is None else sp
    ok = np.ones(t.size, dtype=bool) if ok is None else ok
    return find_step_responses(t, z, sp, ok, ok, ts=ts, delta_sp=0.01)


def first_order(t):
    return np.where(t >= 5, 1 - np.exp(-(t - 5) / 20.0), 0.0)


def second_order(t, zeta=0.5, wn=0.1):
    wd = wn * math.sqrt(1 - zeta**2)
    tt = np.maximum(t, 0.0)
    y = 1 - np.exp(-zeta * wn * tt) / math.sqrt(1 - zeta**2) * np.sin(wd * tt + math.acos(zeta))
    return np.where(t >= 0, y, 0.0)


def test_s7_first_order_with_dead_time():
    t = np.arange(-20.0, 700.0)
    (r,) = run_step(first_order(t), t)
    assert r.outcome == SETTLED
    assert r.rise_time_s == pytest.approx(20 * math.log(9), abs=0.1)  # 43.9 s
    assert r.overshoot_pct == 0.0
    # 5 + 20·ln 50 = 83.2 s; 84 s when read off the samples, 83.2 with interpolation
    assert r.settling_time_s == pytest.approx(5 + 20 * math.log(50), abs=1.0)
    assert r.t90_s == pytest.approx(5 + 20 * math.log(10), abs=0.1)
    assert r.apparent_dead_time_s == pytest.approx(5.0, abs=0.1)


@pytest.mark.parametrize("ts", [1.0, 0.1])
def test_s7_second_order_zeta_0_5(ts):
    t = np.arange(-20.0, 700.0, ts)
    (r,) = run_step(second_order(t), t, ts=ts)
    assert r.overshoot_pct == pytest.approx(16.3, abs=0.2)
    assert r.rise_time_s == pytest.approx(16.4, abs=0.2)
    assert r.settling_time_s == pytest.approx(81.0, abs=1.0)


def test_s7_new_step_before_settling_is_interrupted():
    t = np.arange(-20.0, 700.0)
    sp = np.where(t >= 0, 1.0, 0.0)
    sp[t >= 40] = 2.0
    rs = run_step(first_order(t), t, sp=sp)
    assert rs[0].outcome == INTERRUPTED and math.isnan(rs[0].settling_time_s)
    res = step_kpis(rs[:1])
    assert res["step_settling_time"].status is Status.UNDETERMINED
    assert res["step_settling_time"].reason == INTERRUPTED


def test_s7_mode_change_before_settling_is_interrupted():
    t = np.arange(-20.0, 700.0)
    ok = np.ones(t.size, dtype=bool)
    ok[(t >= 60) & (t < 100)] = False  # MAN
    (r,) = run_step(first_order(t), t, ok=ok)
    assert r.outcome == INTERRUPTED and r.interrupted_by == "mode_change_or_bad_data"


def test_s7_not_settled_within_horizon():
    t = np.arange(-20.0, 700.0)
    z = first_order(t) + 0.1 * np.sin(2 * np.pi * t / 50.0) * (t > 0)
    (r,) = run_step(z, t)
    assert r.outcome == NOT_SETTLED
    res = step_kpis([r])
    assert res["step_settling_time"].reason == NOT_SETTLED
    assert res["step_rise_time"].status is Status.OK


def test_s7_step_still_in_progress_and_no_step():
    t = np.arange(-20.0, 300.0)
    (r,) = run_step(first_order(t), t)
    assert r.outcome == "in_progress"
    assert step_kpis([r])["step_rise_time"].status is Status.UNDETERMINED
    assert step_kpis([])["step_rise_time"].status is Status.NOT_APPLICABLE


def test_s7_small_or_manual_steps_are_ignored():
    t = np.arange(-20.0, 700.0)
    assert (
        find_step_responses(
            t,
            first_order(t),
            np.where(t >= 0, 0.005, 0.0),
            np.ones(t.size, bool),
            np.ones(t.size, bool),
            ts=1.0,
            delta_sp=0.01,
        )
        == []
    )
    ok = np.ones(t.size, dtype=bool)
    ok[t < 0] = False  # in MAN before the step (SP tracking PV)
    assert run_step(first_order(t), t, ok=ok) == []


def test_s7_compute_all_reports_step_in_auto_only():
    t = np.arange(-20.0, 700.0)
    pv = 40.0 + 10.0 * first_order(t)
    sp = np.where(t >= 0, 50.0, 40.0)
    cfg = LoopConfig(ti=20.0, dead_time=5.0)
    w = LoopWindow.from_arrays(pv, sp, 50.0, "AUTO", t0=-20.0)
    res, _ = compute_all(w, w, cfg, None, raise_errors=True)
    assert res["step_rise_time"]["value"] == pytest.approx(43.9, abs=0.1)
    assert res["step_settling_time"]["extras"]["outcome"] == SETTLED
    assert res["step_settling_time"]["extras"]["ts_over_theta"] == pytest.approx(83.2 / 5.0, abs=0.2)
    cas = LoopWindow.from_arrays(pv, sp, 50.0, "CAS", t0=-20.0)
    res, _ = compute_all(cas, cas, cfg, None, raise_errors=True)
    assert res["step_rise_time"]["status"] == "not_applicable"  # remote SP of a cascade slave

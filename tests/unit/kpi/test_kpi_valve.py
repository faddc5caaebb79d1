"""docs/loop-kpis.md §6: valve travel and reversals through a backlash filter."""

import numpy as np
import pytest

from pipeline.kpi import Status
from pipeline.kpi.valve import ValveConfig, backlash, valve_kpis

T = np.arange(3600.0)  # 1 h at Ts = 1 s
ALL = np.ones(T.size, dtype=bool)


def test_s6_sine_plus_noise_travel_and_reversals():
    for seed in range(5):
        op = 50 + 5 * np.sin(2 * np.pi * T / 60.0) + np.random.default_rng(seed).normal(0, 0.05, T.size)
        out, _ = valve_kpis(op, T, ALL, ALL, 1.0, ValveConfig(deadband_pct=0.5))
        assert out["valve_travel"].value == pytest.approx(60 * (20 - 1), rel=0.02)
        assert out["valve_reversals"].value == pytest.approx(120, abs=1)
        assert out["valve_travel_normal"].value == pytest.approx(1140, rel=0.02)
        assert out["valve_reversals_normal"].value == pytest.approx(120, abs=1)


def test_s6_noise_only_gives_nothing():
    for seed in range(20):
        op = 50 + np.random.default_rng(seed).normal(0, 0.05, T.size)
        out, _ = valve_kpis(op, T, ALL, ALL, 1.0)
        assert out["valve_travel"].value == 0.0 and out["valve_reversals"].value == 0.0


def test_s6_raw_travel_is_noise_dominated():
    op = 50 + np.random.default_rng(0).normal(0, 0.05, T.size)
    assert np.sum(np.abs(np.diff(op))) == pytest.approx(206, rel=0.05)  # why the filter exists


def test_s6_backlash_filter_definition():
    y = backlash(np.array([0.0, 0.2, 0.6, 1.0, 0.9, 0.4]), 0.5)
    assert y.tolist() == pytest.approx([0.0, 0.0, 0.35, 0.75, 0.75, 0.65])


def test_s6_state_carries_over_windows():
    op = 50 + 5 * np.sin(2 * np.pi * T / 60.0) + np.random.default_rng(1).normal(0, 0.05, T.size)
    whole, _ = valve_kpis(op, T, ALL, ALL, 1.0)
    travel = rev = 0.0
    state = None
    for a in range(0, 3600, 900):
        out, state = valve_kpis(op[a : a + 900], T[a : a + 900], ALL[:900], ALL[:900], 1.0, state=state)
        travel += out["valve_travel"].value / 4
        rev += out["valve_reversals"].value / 4
    assert travel == pytest.approx(whole["valve_travel"].value, rel=1e-9)
    assert rev == pytest.approx(whole["valve_reversals"].value, abs=1e-9)


def test_s6_scopes_and_statuses():
    op = 50 + 5 * np.sin(2 * np.pi * T / 60.0)
    norm = ALL.copy()
    norm[:1200] = False
    out, _ = valve_kpis(op, T, ALL, norm, 1.0)
    assert out["valve_travel"].value == pytest.approx(out["valve_travel_normal"].value, rel=0.02)
    out, _ = valve_kpis(op, T, ALL, np.zeros_like(ALL), 1.0)
    assert out["valve_travel_normal"].status is Status.NOT_IN_NORMAL_MODE
    assert out["valve_travel"].status is Status.OK
    out, _ = valve_kpis(op, T, np.zeros_like(ALL), np.zeros_like(ALL), 1.0)
    assert {r.status for r in out.values()} == {Status.INSUFFICIENT_DATA}

"""Edge cases (docs/loop-kpis.md §0): whatever the data, compute_all gives each KPI a status, never raises."""

import json
import math
import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.kpi import KPI_NAMES, LoopConfig, LoopWindow, Status, align, compute_all

STATUSES = {s.value for s in Status}
CFG = LoopConfig(pv_lo=0.0, pv_hi=100.0, ti=30.0, dead_time=3.0)
CFG_CODES = LoopConfig(pv_lo=0.0, pv_hi=100.0, ti=30.0, normal_modes=frozenset({1}))
PROPS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NORMAL_MODE_KPIS = (
    "err_mean",
    "err_std",
    "iae",
    "ise",
    "rmse",
    "itae",
    "sat_hi_normal",
    "sat_lo_normal",
    "valve_travel_normal",
    "valve_reversals_normal",
    "osc_hagglund",
    "osc_flag",
    "osc_period",
    "osc_regularity",
    "osc_amplitude",
    "harris",
    "cpi",
    "stiction",
    "stiction_ccf",
    "stiction_area",
    "nonlinearity",
    "step_rise_time",
    "step_t90",
    "step_overshoot",
    "step_settling_time",
)
HORIZON_KPIS = (
    "osc_flag",
    "osc_period",
    "osc_regularity",
    "osc_amplitude",
    "harris",
    "cpi",
    "stiction",
    "stiction_ccf",
    "stiction_area",
    "nonlinearity",
)


def signal(kind, n, rng):
    t = np.arange(n, dtype=float)
    if kind == "random":
        return 50 + rng.normal(0, 2, n)
    if kind == "sine":
        return 50 + 3 * np.sin(2 * np.pi * t / rng.uniform(5, 400)) + rng.normal(0, 0.3, n)
    if kind == "constant":
        return np.full(n, rng.uniform(-1e3, 1e3))
    if kind == "walk":
        return 50 + np.cumsum(rng.normal(0, 0.5, n))
    if kind == "huge":
        return rng.choice([1e12, -1e12, 0.0], n)
    return np.where(rng.random(n) < 0.05, 1e6, 50.0)  # spikes


@st.composite
def loop_windows(draw, max_n=3000):
    n = draw(st.integers(0, max_n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pv = signal(draw(st.sampled_from(["random", "sine", "constant", "walk", "huge", "spikes"])), n, rng)
    sp = signal(draw(st.sampled_from(["constant", "random", "steps"])), n, rng)
    if n and draw(st.booleans()):
        sp = np.where(np.arange(n) > n // 2, sp + 10.0, sp)
    op = np.clip(signal(draw(st.sampled_from(["random", "sine", "constant"])), n, rng), 0, 100)
    mode_kind = draw(st.sampled_from(["auto", "man", "mixed", "codes", "missing"]))
    if mode_kind == "auto":
        mode = np.full(n, "AUTO", dtype=object)
    elif mode_kind == "man":
        mode = np.full(n, "MAN", dtype=object)
    elif mode_kind == "mixed":
        mode = rng.choice(np.array(["AUTO", "MAN", "CAS", "auto", None], dtype=object), n)
    elif mode_kind == "codes":
        mode = rng.integers(0, 3, n)
    else:
        mode = np.full(n, None, dtype=object)
    bad = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    valid = rng.random(n) >= bad
    for arr in (pv, sp, op):
        if n and draw(st.booleans()):
            arr[rng.random(n) < 0.02] = np.nan
    ts = draw(st.sampled_from([0.5, 1.0, 60.0]))
    w = LoopWindow(1.7e9 + ts * np.arange(n), pv, sp, op, mode, valid, ts)
    return w, (CFG_CODES if mode_kind == "codes" else CFG)


def check(res, state):
    assert set(res) == set(KPI_NAMES)
    for name, r in res.items():
        assert set(r) == {"value", "status", "coverage", "horizon_s", "reason", "extras"}, name
        assert r["status"] in STATUSES, name
        assert 0.0 <= r["coverage"] <= 1.0, name
        assert r["value"] is None or math.isfinite(r["value"]), name
        if r["status"] not in ("ok", "constant_signal"):
            assert r["value"] is None and r["reason"], name
    json.dumps(res, allow_nan=False)
    assert json.loads(json.dumps(state, allow_nan=False)) == state


def run(w, h, cfg, state=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warnings are bugs here too
        return compute_all(w, h, cfg, state, raise_errors=True)


@PROPS
@given(loop_windows())
def test_any_window_gives_a_status_for_every_kpi(wc):
    h, cfg = wc
    w = h.tail_seconds(900 * h.ts)
    res, state = run(w, h, cfg)
    check(res, state)
    res2, state2 = run(w, h, cfg, json.loads(json.dumps(state)))  # same window again, with its state
    check(res2, state2)


@PROPS
@given(st.integers(2500, 5000), st.floats(-500, 500), st.floats(-500, 500), st.floats(0, 100))
def test_constant_signals(n, pv, sp, op):
    w = LoopWindow.from_arrays(np.full(n, pv), sp, op, "AUTO")
    res, state = run(w.tail_seconds(900), w, CFG)
    check(res, state)
    for k in ("osc_flag", "osc_period", "osc_regularity", "harris", "cpi", "stiction"):
        assert res[k]["status"] == "constant_signal" and res[k]["value"] is None, k
    for k in ("err_mean", "iae", "itae"):
        assert res[k]["status"] == "constant_signal"
        assert res[k]["value"] == (sp - pv if k == "err_mean" else abs(sp - pv)) or math.isclose(
            res[k]["value"], sp - pv if k == "err_mean" else abs(sp - pv), rel_tol=1e-9, abs_tol=1e-9
        )
    assert res["service_factor"]["value"] == 100.0


@PROPS
@given(loop_windows())
def test_all_bad_quality(wc):
    h, cfg = wc
    h = LoopWindow(h.t, h.pv, h.sp, h.op, h.mode, np.zeros(h.n, dtype=bool), h.ts)
    res, state = run(h.tail_seconds(900 * h.ts), h, cfg)
    check(res, state)
    for k, r in res.items():
        if k != "data_quality":
            assert r["status"] == "insufficient_data", k
    assert res["data_quality"]["value"] in (0.0, None)


@PROPS
@given(loop_windows())
def test_manual_for_the_whole_window(wc):
    h, cfg = wc
    h = LoopWindow(h.t, h.pv, h.sp, h.op, np.full(h.n, "MAN", dtype=object), h.valid, h.ts)
    res, state = run(h, h, cfg)
    check(res, state)
    if h.valid.sum() >= 0.8 * h.n and h.n:
        assert res["service_factor"]["value"] == 0.0
    if h.valid.any():
        for k in NORMAL_MODE_KPIS:
            assert res[k]["status"] in ("not_in_normal_mode", "insufficient_data"), k
        if h.valid.mean() >= 0.8:
            for k in NORMAL_MODE_KPIS:
                assert res[k]["status"] == "not_in_normal_mode", k


@PROPS
@given(st.integers(1, 255), st.integers(0, 2**32 - 1), st.sampled_from(["random", "sine", "walk"]))
def test_too_little_data_for_the_horizon(n, seed, kind):
    rng = np.random.default_rng(seed)
    w = LoopWindow.from_arrays(signal(kind, n, rng), 50.0, 50.0, "AUTO")
    res, state = run(w, w, CFG)
    check(res, state)
    for k in HORIZON_KPIS:
        assert res[k]["status"] in ("insufficient_data", "constant_signal"), k


@PROPS
@given(st.integers(0, 2**32 - 1), st.floats(4.0, 400.0), st.floats(0.5, 5.0))
def test_gaps_longer_than_hold_are_invalid(seed, gap, ts):
    rng = np.random.default_rng(seed)
    n = 300
    t = np.cumsum(rng.uniform(0.2, 1.0, n) * ts)
    t[n // 2 :] += gap * ts  # one gap of gap·Ts
    rows = {
        tag: [(float(a), float(v), "good") for a, v in zip(t, rng.normal(50, 1, n), strict=True)]
        for tag in ("pv", "sp", "op")
    }
    rows["mode"] = [(float(a), "AUTO", "good") for a in t]
    w = align(rows, float(t[0]), float(t[-1]) + ts, ts)
    last_before, first_after = t[n // 2 - 1], t[n // 2]
    in_gap = (w.t > last_before + 3 * ts + 1e-9) & (w.t < first_after)
    assert not w.valid[in_gap].any() and np.isnan(w.pv[in_gap]).all()
    assert w.valid[~in_gap].all()
    res, state = run(w, w, CFG)
    check(res, state)
    if w.valid.mean() < 0.8:
        assert res["service_factor"]["status"] == "insufficient_data"

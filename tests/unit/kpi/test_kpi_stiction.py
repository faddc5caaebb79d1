"""docs/loop-kpis.md §5: valve stiction (5a cross-correlation, 5b area ratio, verdict, 5c bicoherence)."""

import math
from dataclasses import replace

import numpy as np
import pytest

from connectors.sim.loops import LoopSimulator, PiTuning, scenario
from pipeline.kpi import LoopConfig, LoopWindow, compute_all
from pipeline.kpi.oscillation import acf_regularity
from pipeline.kpi.stiction import NONE, STICTION, UNDETERMINED, area_ratio, bicoherence, ccf_stiction, combine

T = np.arange(3600.0)


def sticky_run(seed, **changes):
    spec = replace(scenario("sticky_valve").spec, seed=seed, **changes)
    return LoopSimulator(spec).run(3600)


def error_pct(run):
    return run.sp - run.pv  # span 0..100: e% = e


# ------------------------------------------------------------------------------------------- 5a


def test_s5a_odd_vs_even_ccf_sine():
    y = np.sin(2 * np.pi * T / 60.0)
    c = ccf_stiction(-y, y, 60.0, 1.0)
    assert c.dphi == pytest.approx(0.0, abs=0.01)
    assert c.verdict == NONE


def test_s5a_square_wave_and_integrated_op():
    y = np.sign(np.sin(2 * np.pi * (T + 0.5) / 60.0))
    c = ccf_stiction(-np.cumsum(y), y, 60.0, 1.0)
    assert abs(c.dphi) / math.pi == pytest.approx(0.97, abs=0.01)
    assert c.verdict == STICTION


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_s5a_closed_loop_he_stiction_fs3(seed):
    # K = 1, τ = 10 s, 2-sample delay; PI Kc = 0.3, Ti = 10 s; He et al. (2007) fs = 3 %, fd = 0
    run = sticky_run(seed)
    a = acf_regularity(error_pct(run), 1.0)
    assert a.flag
    assert a.period_s == pytest.approx(144.0, rel=0.10)
    c = ccf_stiction(run.op, run.pv, a.period_s, 1.0)
    assert abs(c.dphi) / math.pi == pytest.approx(0.73, abs=0.05)
    assert c.verdict == STICTION


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_s5a_closed_loop_aggressive_without_stiction_phase(seed):
    run = sticky_run(seed, valve=None, tuning=PiTuning(kc=3.5, ti=5.0))
    a = acf_regularity(error_pct(run), 1.0)
    c = ccf_stiction(run.op, run.pv, a.estimated_period_s, 1.0)
    assert abs(c.dphi) / math.pi == pytest.approx(0.20, abs=0.05)
    assert c.verdict == NONE


@pytest.mark.xfail(
    strict=True,
    reason="not reproduced: in this discretisation the Kc = 3.5, Ti = 5 s loop is well damped "
    "(dominant pole |p| = 0.91, period 12.9 s); the ACF gate does not flag it and its period "
    "estimate scatters 7-12.5 s over seeds instead of the spec's 11.6 s",
)
def test_s5a_closed_loop_aggressive_without_stiction_period_11_6():
    run = sticky_run(0, valve=None, tuning=PiTuning(kc=3.5, ti=5.0))
    a = acf_regularity(error_pct(run), 1.0)
    assert a.flag and a.period_s == pytest.approx(11.6, abs=0.5)


def test_s5a_false_positive_external_sinusoid_needs_5b():
    run = scenario("external_disturbance").run(3600)
    e = error_pct(run)
    a = acf_regularity(e, 1.0)
    c = ccf_stiction(run.op, run.pv, a.period_s, 1.0)
    assert abs(c.dphi) / math.pi == pytest.approx(0.68, abs=0.05)
    r = area_ratio(e, 0.15)
    assert r.verdict == NONE
    assert combine(c.verdict, r.verdict) != STICTION


# ------------------------------------------------------------------------------------------- 5b


def shark_fin(samples_per_half_cycle=100, n_half=20, rise=0.8):
    r = int(rise * samples_per_half_cycle)
    f = samples_per_half_cycle - r
    hc = np.concatenate([np.linspace(0, 1, r, endpoint=False), np.linspace(1, 0, f, endpoint=False)])
    return np.concatenate([hc * (1 if i % 2 == 0 else -1) for i in range(n_half)])


def test_s5b_sine_ratio_one():
    e = np.sin(2 * np.pi * T / 60.0) + np.random.default_rng(0).normal(0, 0.05, T.size)
    r = area_ratio(e, 0.15)
    assert r.ratio == pytest.approx(1.00, abs=0.05)
    assert r.verdict == NONE


@pytest.mark.parametrize("per_half", [100, 200, 400])
def test_s5b_shark_fin_ratio_four(per_half):
    r = area_ratio(shark_fin(per_half), 0.1)
    assert r.ratio == pytest.approx(4.0, rel=0.15)
    assert r.verdict == STICTION


def test_s5b_simulations():
    for seed in range(3):
        run = sticky_run(seed)
        assert area_ratio(error_pct(run), 0.15).ratio >= 1.2
    agg = scenario("aggressive").run(3600)
    ext = scenario("external_disturbance").run(3600)
    for run in (agg, ext):
        assert 0.9 <= area_ratio(error_pct(run), 0.15).ratio <= 1.1


def test_s5b_too_few_half_cycles():
    r = area_ratio(np.sin(2 * np.pi * np.arange(200.0) / 100.0), 0.1)
    assert r.verdict == UNDETERMINED and r.n_half_cycles < 6


def test_s5_verdict_rules():
    assert combine(STICTION, STICTION) == STICTION
    assert combine(NONE, NONE) == NONE
    assert combine(STICTION, NONE) == UNDETERMINED
    assert combine(NONE, STICTION) == UNDETERMINED
    assert combine(STICTION, UNDETERMINED) == UNDETERMINED
    assert combine(NONE, UNDETERMINED) == NONE


def test_s5_not_applicable_without_oscillation_or_for_integrating_loops():
    run = sticky_run(0)
    w = LoopWindow(run.t, run.pv, run.sp, run.op, run.mode, np.ones(run.t.size, bool), 1.0)
    res, _ = compute_all(w, w, LoopConfig(ti=10.0, dead_time=2.0), None, raise_errors=True)
    assert res["stiction"]["value"] == 1.0
    res, _ = compute_all(
        w, w, LoopConfig(ti=10.0, dead_time=2.0, loop_type="integrating"), None, raise_errors=True
    )
    assert res["stiction"]["status"] == "not_applicable" and res["stiction"]["reason"] == "integrating_loop"
    flat = LoopWindow.from_arrays(50.0 + np.random.default_rng(0).normal(0, 0.2, 3600), 50.0, 50.0)
    res, _ = compute_all(flat, flat, LoopConfig(ti=10.0), None, raise_errors=True)
    assert res["stiction"]["status"] == "not_applicable" and res["stiction"]["reason"] == "no_oscillation"


# ------------------------------------------------------------------------------------------- 5c


def test_s5c_bicoherence_quadratic_coupling_detected():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, 8192)
    x = np.zeros(8192)
    for k in range(1, x.size):
        x[k] = 0.8 * x[k - 1] + a[k]
    lin = bicoherence(x)
    quad = bicoherence(x + 0.3 * x**2)
    assert lin.ngi < 0.001 and not lin.nonlinear
    assert quad.ngi > 0.001 and quad.nonlinear


def test_s5c_bicoherence_misses_half_wave_symmetric_limit_cycle():
    t = np.arange(8192.0)
    sq = np.sign(np.sin(2 * np.pi * (t + 0.5) / 60.0)) + np.random.default_rng(1).normal(0, 0.1, t.size)
    assert bicoherence(sq).ngi < 0  # the documented false negative


def test_s5c_bicoherence_needs_4096_samples():
    assert bicoherence(np.random.default_rng(0).normal(size=4000)).status.value == "insufficient_data"

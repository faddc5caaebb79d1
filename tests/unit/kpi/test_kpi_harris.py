"""docs/loop-kpis.md §4: Harris minimum-variance index."""

import numpy as np
import pytest

from pipeline.kpi import LoopConfig, LoopWindow, Status, compute_all
from pipeline.kpi.harris import HarrisConfig, delay_samples, eta_curve, harris_index, harris_kpi


def ar1(n, phi, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, n + 500)
    y = np.zeros(n + 500)
    for k in range(1, y.size):
        y[k] = phi * y[k - 1] + a[k]
    return y[500:]


def test_s4_delay_samples():
    assert delay_samples(0.0, 1.0) == 1
    assert delay_samples(4.0, 1.0) == 5
    assert delay_samples(150.0, 60.0) == 3


@pytest.mark.parametrize("b", [1, 3, 10])
def test_s4_white_noise_is_mv_optimal(b):
    e = np.random.default_rng(b).normal(0, 1, 5000)
    est = harris_index(e, b)
    assert est.eta == pytest.approx(0.998, abs=0.01)
    assert 1.0 - est.eta <= 0.012  # CPI ≈ 0


def test_s4_ar1_b3_theory_0_469():
    theory = (1 + 0.81 + 0.6561) * (1 - 0.81)
    assert theory == pytest.approx(0.469, abs=5e-4)
    for seed in range(10):
        assert harris_index(ar1(2000, 0.9, seed), 3).eta == pytest.approx(0.469, abs=0.08)
    mean = np.mean([harris_index(ar1(2000, 0.9, s), 3).eta for s in range(40)])
    assert mean == pytest.approx(0.469, abs=0.015)


def test_s4_estimators_agree():
    etas = {
        m: [harris_index(ar1(2000, 0.9, s), 3, method=m).eta for s in range(20)] for m in ("ar", "dh", "fcor")
    }
    means = {m: float(np.mean(v)) for m, v in etas.items()}
    assert abs(means["ar"] - means["dh"]) <= 0.005
    assert abs(means["ar"] - means["fcor"]) <= 0.005


def test_s4_ma_model_b2_0_906():
    vals = []
    for seed in range(5):
        a = np.random.default_rng(seed).normal(0, 1, 5003)
        y = a[3:] + 0.5 * a[2:-1] + 0.3 * a[1:-2] + 0.2 * a[:-3]
        vals.append(harris_index(y, 2).eta)
    theory = 1.25 / 1.38  # (1 + 0.5²)/(1 + 0.5² + 0.3² + 0.2²)
    assert theory == pytest.approx(0.906, abs=5e-4)
    assert np.mean(vals) == pytest.approx(0.906, abs=0.015)
    assert all(abs(v - 0.906) <= 0.03 for v in vals)


def test_s4_offset_of_one_sigma_halves_eta():
    e = np.random.default_rng(9).normal(0, 1, 5000)
    e = e + np.std(e)
    assert harris_index(e, 3).eta == pytest.approx(0.50, abs=0.02)


def test_s4_unknown_dead_time_publishes_curve():
    y = ar1(2000, 0.9, 1)
    eta, cpi = harris_kpi(y, 1.0, None)
    assert eta.status is Status.UNDETERMINED and eta.reason == "dead_time_unknown"
    curve = eta.extras["eta_curve"]
    assert len(curve) == 30 and np.all(np.diff(curve) >= -1e-12)
    assert curve[2] == pytest.approx(harris_index(y, 3).eta, abs=1e-9)
    eta, cpi = harris_kpi(y, 1.0, None, HarrisConfig(assumed_dead_time_s=2.0))
    assert eta.status is Status.OK and eta.extras["deadtime_assumed"] is True and eta.extras["b"] == 3
    assert cpi.value == pytest.approx(1.0 - eta.value)
    eta, _ = harris_kpi(y, 1.0, 2.0)
    assert eta.extras["deadtime_assumed"] is False and eta.extras["rating"] == "review"


def test_s4_constant_and_short_data():
    eta, cpi = harris_kpi(np.full(2000, 1.0), 1.0, 2.0, constant=True)
    assert eta.status is Status.CONSTANT_SIGNAL and np.isnan(eta.value) and np.isnan(cpi.value)
    eta, _ = harris_kpi(np.random.default_rng(0).normal(size=900), 1.0, 2.0)
    assert eta.status is Status.INSUFFICIENT_DATA


def test_s4_eta_curve_monotone_and_bounded():
    c = eta_curve(ar1(3000, 0.7, 2), 20)
    assert np.all((c >= 0) & (c <= 1)) and np.all(np.diff(c) >= -1e-12)


def test_s4_compute_all_uses_steady_segment_and_oscillation_gives_low_eta():
    t = np.arange(3000.0)
    rng = np.random.default_rng(3)
    pv = 50.0 + 3.0 * np.sin(2 * np.pi * t / 40.0) + rng.normal(0, 0.2, t.size)
    w = LoopWindow.from_arrays(pv, 50.0, 50.0, "AUTO")
    res, _ = compute_all(w, w, LoopConfig(ti=30.0, dead_time=2.0), None, raise_errors=True)
    assert res["harris"]["status"] == "ok" and res["harris"]["value"] < 0.3
    assert res["harris"]["extras"]["rating"] == "poor"
    assert res["cpi"]["value"] == pytest.approx(1 - res["harris"]["value"])

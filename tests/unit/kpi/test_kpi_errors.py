"""docs/loop-kpis.md §2: error statistics over normal-mode samples."""

import numpy as np
import pytest

from pipeline.kpi import LoopConfig, LoopWindow, Status, compute_all
from pipeline.kpi.errors import error_statistics

T = np.arange(900.0)
ALL = np.ones(900, dtype=bool)


def test_s2_offset_sine_whole_cycles():
    e = 2.0 + np.sin(2 * np.pi * T / 60.0)
    out = error_statistics(e, ALL, ALL, 1.0, t=T, itae_t0=0.0)
    assert out["err_mean"].value == pytest.approx(2.000, abs=5e-4)
    assert out["err_std"].value == pytest.approx(0.707, abs=1e-3)
    assert out["iae"].value == pytest.approx(2.000, abs=5e-4)
    assert out["rmse"].value == pytest.approx(2.121, abs=5e-4)
    assert out["ise"].value == pytest.approx(4.5, abs=1e-3)
    assert {r.status for r in out.values()} == {Status.OK}


def test_s2_constant_error_itae_equals_c():
    e = np.full(900, 3.0)
    out = error_statistics(e, ALL, ALL, 1.0, t=T, itae_t0=0.0, constant=True)
    assert out["itae"].value == pytest.approx(3.0, abs=1e-12)
    # a constant signal keeps its means and IAE (spec §0) but says so
    assert out["itae"].status is Status.CONSTANT_SIGNAL
    assert out["err_mean"].value == 3.0 and out["iae"].value == 3.0


def test_s2_constant_error_via_compute_all():
    w = LoopWindow.from_arrays(np.full(900, 47.0), 50.0, 40.0, "AUTO")
    res, _ = compute_all(w, w, LoopConfig(ti=60.0), None, raise_errors=True)
    assert res["itae"]["value"] == pytest.approx(3.0)
    assert res["itae"]["status"] == "constant_signal"
    assert res["err_mean"]["value"] == pytest.approx(3.0)


def test_s2_half_window_manual_uses_auto_half_only():
    rng = np.random.default_rng(3)
    e = np.empty(900)
    e[:450] = 1.0 + rng.normal(0, 0.5, 450)
    e[450:] = 40.0  # MAN: large error that must not leak in
    norm = np.zeros(900, dtype=bool)
    norm[:450] = True
    out = error_statistics(e, ALL, norm, 1.0, t=T, itae_t0=0.0)
    assert out["err_mean"].status is Status.OK
    assert out["err_mean"].value == pytest.approx(float(np.mean(e[:450])))
    assert out["err_std"].value == pytest.approx(float(np.std(e[:450], ddof=1)))
    assert out["iae"].value == pytest.approx(float(np.mean(np.abs(e[:450]))))
    assert out["err_mean"].coverage == 0.5


def test_s2_under_half_normal_is_insufficient_and_all_manual_says_so():
    norm = np.zeros(900, dtype=bool)
    norm[:300] = True
    out = error_statistics(np.ones(900), ALL, norm, 1.0)
    assert {r.status for r in out.values()} == {Status.INSUFFICIENT_DATA}
    out = error_statistics(np.ones(900), ALL, np.zeros(900, dtype=bool), 1.0)
    assert {r.status for r in out.values()} == {Status.NOT_IN_NORMAL_MODE}


def test_s2_itae_measured_from_last_sp_step():
    # SP step at 600 s: ITAE covers the 300 s after it only; a constant error there gives that constant.
    sp = np.where(T >= 600, 60.0, 50.0)
    pv = np.where(T >= 600, 58.0, 50.0 + np.sin(T))
    w = LoopWindow.from_arrays(pv, sp, 50.0, "AUTO")
    res, _ = compute_all(w, w, LoopConfig(ti=60.0), None, raise_errors=True)
    assert res["itae"]["extras"]["t0"] == 600.0
    assert res["itae"]["value"] == pytest.approx(2.0)

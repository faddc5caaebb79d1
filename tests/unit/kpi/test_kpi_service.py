"""docs/loop-kpis.md §1: service factor and OP saturation."""

import numpy as np

from pipeline.kpi import LoopConfig, LoopWindow, Status, compute_all
from pipeline.kpi.service import ServiceConfig, saturation, service_factor


def test_s1_saturation_op_100_for_270_of_900():
    op = np.full(900, 50.0)
    op[100:370] = 100.0
    ok = np.ones(900, dtype=bool)
    out = saturation(op, ok, ok)
    assert out["sat_hi"].status is Status.OK
    assert out["sat_hi"].value == 30.0
    assert out["sat_lo"].value == 0.0
    assert out["sat_hi_normal"].value == 30.0


def test_s1_service_factor_9_of_15_min_manual():
    valid = np.ones(900, dtype=bool)
    norm = valid.copy()
    norm[:540] = False  # MAN for 9 of 15 min at Ts = 1 s
    r = service_factor(valid, norm)
    assert r.status is Status.OK
    assert r.value == 40.0
    assert r.coverage == 1.0


def test_s1_service_factor_via_modes():
    mode = np.array(["MAN"] * 540 + ["AUTO"] * 360, dtype=object)
    w = LoopWindow.from_arrays(np.full(900, 50.0), 50.0, 50.0, mode)
    res, _ = compute_all(w, w, LoopConfig(ti=60.0), None, raise_errors=True)
    assert res["service_factor"]["value"] == 40.0
    assert res["service_factor"]["status"] == "ok"


def test_s1_all_bad_quality_is_insufficient_data():
    valid = np.zeros(900, dtype=bool)
    assert service_factor(valid, valid).status is Status.INSUFFICIENT_DATA
    out = saturation(np.full(900, 100.0), valid, valid)
    assert {r.status for r in out.values()} == {Status.INSUFFICIENT_DATA}


def test_s1_saturation_delta_is_configurable_and_normal_only_value():
    op = np.full(1000, 99.0)
    valid = np.ones(1000, dtype=bool)
    norm = valid.copy()
    norm[:400] = False
    op[:400] = 100.0  # at the limit only while in MAN: the operator's choice
    assert saturation(op, valid, norm)["sat_hi"].value == 40.0
    assert saturation(op, valid, norm)["sat_hi_normal"].value == 0.0
    wide = saturation(op, valid, norm, cfg=ServiceConfig(sat_delta_pct=1.5))
    assert wide["sat_hi_normal"].value == 100.0


def test_s0_low_coverage_is_insufficient_data():
    valid = np.ones(900, dtype=bool)
    valid[:200] = False  # 77.8 % < 80 %
    r = service_factor(valid, valid)
    assert r.status is Status.INSUFFICIENT_DATA
    assert abs(r.coverage - 700 / 900) < 1e-12

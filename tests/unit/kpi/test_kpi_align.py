"""docs/loop-kpis.md §0: resampling onto the uniform grid with last-value hold ≤ 3·Ts."""

import math

import numpy as np
import pytest

from pipeline.kpi import LoopWindow, align, quality_is_good


def tags(pv, sp=None, op=None, mode=None):
    n_t = [r[0] for r in pv]
    return {
        "pv": pv,
        "sp": sp if sp is not None else [(t, 50.0, "good") for t in n_t],
        "op": op if op is not None else [(t, 40.0, "good") for t in n_t],
        "mode": mode if mode is not None else [(t, "AUTO", "good") for t in n_t],
    }


def test_s0_grid_and_last_value_hold():
    pv = [(0.0, 1.0, "good"), (2.5, 2.0, "good"), (4.0, 3.0, "good")]
    w = align(tags(pv), 0.0, 10.0, 1.0)
    assert w.t.tolist() == [float(k) for k in range(10)]
    # held at most 3 s after the last sample (t = 4): grid 4..7 keep 3.0, 8 and 9 are gaps
    assert w.pv[:8].tolist() == [1.0, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0]
    assert np.isnan(w.pv[8:]).all()
    assert w.valid.tolist() == [True] * 8 + [False] * 2


def test_s0_gap_longer_than_hold_is_invalid_and_hold_configurable():
    pv = [(0.0, 1.0, "good"), (10.0, 2.0, "good")]
    sp = [(0.0, 50.0, "good")]
    w = align(
        tags(pv, sp=sp, op=[(0.0, 1.0, "good")], mode=[(0.0, "AUTO", "good")]), 0.0, 11.0, 1.0, hold=20.0
    )
    assert w.valid.all()
    w = align(tags(pv), 0.0, 11.0, 1.0)
    assert w.valid.tolist() == [True] * 4 + [False] * 6 + [True]


def test_s0_bad_quality_unsorted_and_sample_before_window():
    pv = [(5.0, 9.0, "bad"), (-1.0, 7.0, "good"), (3.0, 8.0, "good")]
    t_all = [-1.0, 3.0, 5.0]
    w = align(
        tags(
            pv,
            sp=[(t, 50.0, "good") for t in t_all],
            op=[(t, 40.0, "good") for t in t_all],
            mode=[(t, "AUTO", "good") for t in t_all],
        ),
        0.0,
        7.0,
        1.0,
    )
    assert w.pv[:5].tolist() == [7.0, 7.0, 7.0, 8.0, 8.0]
    assert np.isnan(w.pv[5:]).all()  # the latest sample is bad: no fallback to an older one
    assert w.valid.tolist() == [True, True, True, True, True, False, False]


def test_s0_each_tag_must_be_good():
    pv = [(0.0, 1.0, "good")]
    w = align(tags(pv, mode=[(0.0, None, "good")]), 0.0, 3.0, 1.0)
    assert not w.valid.any()
    w = align(tags(pv, op=[(0.0, float("nan"), "good")]), 0.0, 3.0, 1.0)
    assert not w.valid.any()
    w = align({"pv": pv}, 0.0, 3.0, 1.0)  # missing tags
    assert not w.valid.any() and w.n == 3


def test_s0_quality_conventions():
    assert quality_is_good("good") and quality_is_good("GOOD") and quality_is_good(None)
    assert not quality_is_good("uncertain") and not quality_is_good("bad")
    assert quality_is_good(0) and not quality_is_good(0x80000000) and not quality_is_good(0x40000000)
    assert quality_is_good(True) and not quality_is_good(False)


def test_s0_empty_and_degenerate_windows():
    assert align({}, 0.0, 0.0, 1.0).n == 0
    assert align({}, 10.0, 0.0, 1.0).n == 0
    assert align({}, 0.0, math.inf, 1.0).n == 0
    with pytest.raises(ValueError):
        align({}, 0.0, 10.0, 0.0)


def test_s0_stale_tags_flag_compression():
    n = 60
    pv = [(float(t), 50.0 + (t // 20), "good") for t in range(n)]  # changes every 20 s
    w = align(tags(pv), 0.0, float(n), 1.0)
    assert "pv" in w.stale_tags
    pv = [(float(t), 50.0 + 0.01 * t, "good") for t in range(n)]
    assert "pv" not in align(tags(pv), 0.0, float(n), 1.0).stale_tags


def test_loop_window_helpers():
    w = LoopWindow.from_arrays(np.arange(10.0), 5.0, 1.0, "AUTO", ts=2.0, t0=100.0)
    assert w.n == 10 and w.duration_s == 20.0
    tail = w.tail_seconds(6.0)
    assert tail.t.tolist() == [114.0, 116.0, 118.0]
    both = w.slice(0, 5).concat(w.slice(3, 10))
    assert both.t.tolist() == w.t.tolist()
    with pytest.raises(ValueError):
        LoopWindow(np.zeros(3), np.zeros(2), np.zeros(3), np.zeros(3), np.zeros(3), np.ones(3), 1.0)

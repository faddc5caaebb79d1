"""Valve travel and reversals (docs/loop-kpis.md §6).

OP first goes through a backlash (deadband) filter of width δr, because raw Σ|ΔOP| is dominated by
noise (0.05 % white noise alone gives about 200 %/h). Travel = Σ|Δy| per valid hour, reversals = sign
changes of the non-zero Δy per valid hour, over all modes (wear) and over normal mode only. The filter
state carries over between windows so a reversal at a window boundary is neither lost nor doubled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import (
    DEFAULT_GATE,
    BoolArray,
    FloatArray,
    GateConfig,
    KpiResult,
    Status,
    gate_normal,
    gate_valid,
    missing,
    runs,
)

VALVE_KPIS = ("valve_travel", "valve_reversals", "valve_travel_normal", "valve_reversals_normal")


@dataclass(frozen=True)
class ValveConfig:
    deadband_pct: float = 0.5  # δr (choose ≥ 4x the OP noise sigma)
    init_samples: int = 10  # a fresh filter at rest starts at the median of this many samples


def backlash(op: FloatArray, deadband: float, y0: float | None = None) -> FloatArray:
    """y_k = y_{k-1} unless |OP_k - y_{k-1}| > δr/2, then y_k = OP_k ∓ δr/2 (the play is taken up)."""
    y = np.empty(op.size)
    if op.size == 0:
        return y
    half = deadband / 2.0
    prev = float(op[0]) if y0 is None else float(y0)
    for k, u in enumerate(op.tolist()):
        d = u - prev
        if d > half:
            prev = u - half
        elif d < -half:
            prev = u + half
        y[k] = prev
    return y


def valve_kpis(
    op: FloatArray,
    t: FloatArray,
    valid: BoolArray,
    norm: BoolArray,
    ts: float,
    cfg: ValveConfig | None = None,
    gate: GateConfig = DEFAULT_GATE,
    state: Mapping[str, Any] | None = None,
    *,
    hold: float | None = None,
    horizon_s: float = math.nan,
) -> tuple[dict[str, KpiResult], dict[str, Any]]:
    """Travel (%/h) and reversals (1/h), all modes and normal mode; returns (results, filter state).

    The filter restarts after invalid samples (gaps longer than the hold); the state continues it
    across windows when the next window starts within ``hold`` of the last processed sample.
    """
    cfg = cfg or ValveConfig()
    hold = 3.0 * ts if hold is None else hold
    y_prev: float | None = None
    dir_all = 0
    dir_norm = 0
    prev_norm = False
    if isinstance(state, Mapping) and state:
        try:
            last_t = float(state["t"])
            first_valid = np.flatnonzero(valid)
            if first_valid.size and 0 < t[first_valid[0]] - last_t <= hold + 1e-9 and first_valid[0] == 0:
                y_prev = float(state["y"])
                dir_all = int(state.get("dir", 0))
                dir_norm = int(state.get("dir_normal", 0))
                prev_norm = bool(state.get("normal", False))
        except (KeyError, TypeError, ValueError):
            y_prev = None
    if y_prev is not None and not math.isfinite(y_prev):
        y_prev = None

    half = cfg.deadband_pct / 2.0
    travel = travel_n = 0.0
    rev = rev_n = 0
    last_state: dict[str, Any] = {}
    n = op.size
    for start, stop in runs(valid):
        seg = op[start:stop]
        if y_prev is None or start > 0:
            head = seg[: cfg.init_samples]
            # Start a resting valve at the median (a single noisy sample could later look like a move);
            # a moving one at its first sample (a median would invent a move back to the start).
            y_prev = float(np.median(head)) if np.ptp(head) <= cfg.deadband_pct else float(seg[0])
            dir_all, dir_norm, prev_norm = 0, 0, False
        for k in range(start, stop):
            u = float(op[k])
            d = u - y_prev
            step = 0.0
            if d > half:
                step = d - half
            elif d < -half:
                step = d + half
            y_prev += step
            nk = bool(norm[k])
            if step != 0.0:
                sgn = 1 if step > 0 else -1
                travel += abs(step)
                if dir_all and sgn != dir_all:
                    rev += 1
                dir_all = sgn
                if nk and prev_norm:
                    travel_n += abs(step)
                    if dir_norm and sgn != dir_norm:
                        rev_n += 1
                    dir_norm = sgn
            if not nk:
                dir_norm = 0
            prev_norm = nk
        last_state = {
            "y": y_prev,
            "dir": dir_all,
            "dir_normal": dir_norm,
            "normal": prev_norm,
            "t": float(t[stop - 1]),
        }
    if not last_state or (n and not valid[-1]):
        last_state = {}

    n_valid, n_norm = int(valid.sum()), int(norm.sum())
    ext = {"deadband_pct": cfg.deadband_pct}
    out: dict[str, KpiResult] = {}
    st, cov, why = gate_valid(n, n_valid, gate)
    hours = n_valid * ts / 3600.0
    if st is not None:
        out["valve_travel"] = missing(st, cov, why, horizon_s, ext)
        out["valve_reversals"] = missing(st, cov, why, horizon_s, ext)
    else:
        out["valve_travel"] = KpiResult(travel / hours, Status.OK, cov, horizon_s, None, ext)
        out["valve_reversals"] = KpiResult(rev / hours, Status.OK, cov, horizon_s, None, ext)
    st, cov, why = gate_normal(n, n_valid, n_norm, gate)
    hours_n = n_norm * ts / 3600.0
    if st is not None:
        out["valve_travel_normal"] = missing(st, cov, why, horizon_s, ext)
        out["valve_reversals_normal"] = missing(st, cov, why, horizon_s, ext)
    else:
        out["valve_travel_normal"] = KpiResult(travel_n / hours_n, Status.OK, cov, horizon_s, None, ext)
        out["valve_reversals_normal"] = KpiResult(rev_n / hours_n, Status.OK, cov, horizon_s, None, ext)
    return out, last_state

"""Set-point step response (docs/loop-kpis.md §7).

A step is |ΔSP| ≥ δsp (1 % of span and at least 5 sigma of SP noise) with the loop in a local-SP normal
mode before and after it. The response is followed for H_s = max(10 min, 20θ, 5Ti) while SP stays within
±δsp/4; a new step, a mode change or bad data earlier ends it as ``interrupted`` unless the response had
already settled (and stayed in the band for 10 % of H_s, a default added here).

With z = (PV - y0)/(SP_new - y0), y0 the mean PV over the 10 samples before the step: rise time
t(z=0.9) - t(z=0.1) and t90 (interpolated), overshoot 100·max(0, max z - 1), settling time until
|z - 1| ≤ 2 % for every remaining sample (interpolated at the last band crossing). Optional dimensionless
forms t_s/θ and IAE/(|Δ|·θ) follow Swanda & Seborg (1999, ACC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import BoolArray, FloatArray, KpiResult, Status, missing, sp_step_indices

STEP_KPIS = ("step_rise_time", "step_t90", "step_overshoot", "step_settling_time")

SETTLED = "settled"
NOT_SETTLED = "not_settled"
INTERRUPTED = "interrupted"
IN_PROGRESS = "in_progress"


@dataclass(frozen=True)
class StepConfig:
    delta_frac: float = 0.01  # δsp ≥ delta_frac·span …
    noise_mult: float = 5.0  # … and ≥ noise_mult·sigma(SP noise)
    hold_frac: float = 0.25  # SP must stay within ±hold_frac·δsp of the new value
    min_horizon_s: float = 600.0  # H_s = max(min_horizon_s, theta_mult·θ, ti_mult·Ti)
    theta_mult: float = 20.0
    ti_mult: float = 5.0
    pre_samples: int = 10  # samples before the step averaged for y0
    band: float = 0.02  # settling band on |z - 1|
    # Added default (not in the spec): the response must then stay in the band for at least this share
    # of H_s, so a ringing response that merely touches the band at the end is not "settled".
    min_settled_dwell_frac: float = 0.1
    rise_lo: float = 0.1
    rise_hi: float = 0.9
    # Modes with a local SP: a cascade slave in CAS follows its master, so its SP moves are not tests.
    step_modes: frozenset[str] = frozenset({"AUTO"})


@dataclass(frozen=True)
class StepResponse:
    index: int
    t_step: float
    sp_old: float
    sp_new: float
    y0: float
    delta: float
    outcome: str
    interrupted_by: str | None
    horizon_s: float
    observed_s: float
    t10_s: float
    t90_s: float
    rise_time_s: float
    overshoot_pct: float
    settling_time_s: float
    apparent_dead_time_s: float
    ts_over_theta: float
    iae_over_delta_theta: float


def _first_crossing(z: FloatArray, level: float, ts: float) -> float:
    """Time (from the step) at which z first reaches ``level``, linearly interpolated."""
    idx = np.flatnonzero(z >= level)
    if idx.size == 0:
        return math.nan
    i = int(idx[0])
    if i == 0:
        return 0.0
    za, zb = float(z[i - 1]), float(z[i])
    return (i - 1 + (level - za) / (zb - za)) * ts


def analyse_step(
    t: FloatArray,
    pv: FloatArray,
    sp: FloatArray,
    ok: BoolArray,
    k: int,
    *,
    ts: float,
    delta_sp: float,
    ti: float | None,
    theta: float | None,
    cfg: StepConfig | None = None,
) -> StepResponse | None:
    """Analyse the SP step at index ``k`` (``ok``: valid, normal and in a step mode). None if the step is
    not analysable (no clean pre-step stretch, or PV already at the new SP)."""
    cfg = cfg or StepConfig()
    n = pv.size
    pre = cfg.pre_samples
    if k < pre or k >= n or not ok[k - pre : k + 1].all():
        return None
    y0 = float(np.mean(pv[k - pre : k]))
    sp_new, sp_old = float(sp[k]), float(sp[k - 1])
    delta = sp_new - y0
    if abs(delta) < delta_sp / 2.0:
        return None
    h_s = max(cfg.min_horizon_s, cfg.theta_mult * (theta or 0.0), cfg.ti_mult * (ti or 0.0))
    end = k + math.ceil(h_s / ts - 1e-9) + 1  # samples k … k + H_s/Ts
    lim = min(end, n)
    held = np.abs(sp[k:lim] - sp_new) <= cfg.hold_frac * delta_sp
    good = ok[k:lim] & held
    bad = np.flatnonzero(~good)
    interrupted_by: str | None = None
    if bad.size:
        stop = k + int(bad[0])
        interrupted_by = "sp_change" if ok[stop] else "mode_change_or_bad_data"
    else:
        stop = lim
    z = (pv[k:stop] - y0) / delta
    t10 = _first_crossing(z, cfg.rise_lo, ts)
    t90 = _first_crossing(z, cfg.rise_hi, ts)
    dev = np.abs(z - 1.0)
    viol = np.flatnonzero(dev > cfg.band)
    if z.size == 0 or (viol.size and viol[-1] == z.size - 1):
        t_settle = math.nan
    elif viol.size == 0:
        t_settle = 0.0
    else:
        i = int(viol[-1])
        da, db = float(dev[i]), float(dev[i + 1])
        t_settle = (i + (da - cfg.band) / (da - db)) * ts
    if math.isfinite(t_settle) and (stop - k - 1) * ts - t_settle < cfg.min_settled_dwell_frac * h_s:
        t_settle = math.nan
    if interrupted_by is not None:
        outcome = SETTLED if math.isfinite(t_settle) else INTERRUPTED
    elif end > n:
        outcome = IN_PROGRESS
    else:
        outcome = SETTLED if math.isfinite(t_settle) else NOT_SETTLED
    app_theta = math.nan
    if math.isfinite(t10) and math.isfinite(t90) and t90 > t10:
        # FOPDT reading of the 10 % and 90 % times: τ = (t90 - t10)/ln 9, θ = t10 - τ·ln(10/9).
        tau = (t90 - t10) / math.log(9.0)
        app_theta = max(0.0, t10 - tau * math.log(10.0 / 9.0))
    os_pct = 100.0 * max(0.0, float(z.max()) - 1.0) if z.size else math.nan
    iae_n = ts_th = math.nan
    if theta and theta > 0 and z.size:
        iae_n = float(np.sum(np.abs(1.0 - z)) * ts / theta)
        ts_th = t_settle / theta if math.isfinite(t_settle) else math.nan
    return StepResponse(
        index=k,
        t_step=float(t[k]),
        sp_old=sp_old,
        sp_new=sp_new,
        y0=y0,
        delta=delta,
        outcome=outcome,
        interrupted_by=interrupted_by if outcome == INTERRUPTED else None,
        horizon_s=h_s,
        observed_s=(stop - k) * ts,
        t10_s=t10,
        t90_s=t90,
        rise_time_s=t90 - t10 if math.isfinite(t10) and math.isfinite(t90) else math.nan,
        overshoot_pct=os_pct,
        settling_time_s=t_settle if outcome == SETTLED else math.nan,
        apparent_dead_time_s=app_theta,
        ts_over_theta=ts_th if outcome == SETTLED else math.nan,
        iae_over_delta_theta=iae_n,
    )


def find_step_responses(
    t: FloatArray,
    pv: FloatArray,
    sp: FloatArray,
    valid: BoolArray,
    ok: BoolArray,
    *,
    ts: float,
    delta_sp: float,
    ti: float | None = None,
    theta: float | None = None,
    cfg: StepConfig | None = None,
) -> list[StepResponse]:
    """All analysable SP steps in the data, oldest first."""
    out = []
    for k in sp_step_indices(sp, valid, delta_sp).tolist():
        r = analyse_step(t, pv, sp, ok, int(k), ts=ts, delta_sp=delta_sp, ti=ti, theta=theta, cfg=cfg)
        if r is not None:
            out.append(r)
    return out


def step_kpis(
    responses: list[StepResponse], *, coverage: float = 1.0, horizon_s: float = math.nan
) -> dict[str, KpiResult]:
    """Results for the most recent step whose outcome is known (settled, not settled or interrupted)."""
    done = [r for r in responses if r.outcome != IN_PROGRESS]
    if not done:
        why = "step_in_progress" if responses else "no_sp_step"
        st = Status.UNDETERMINED if responses else Status.NOT_APPLICABLE
        pending = {"step_time": responses[-1].t_step} if responses else {}
        return {k: missing(st, coverage, why, horizon_s, pending) for k in STEP_KPIS}
    r = done[-1]
    ext: dict[str, Any] = {
        "step_time": r.t_step,
        "sp_old": r.sp_old,
        "sp_new": r.sp_new,
        "y0": r.y0,
        "outcome": r.outcome,
        "interrupted_by": r.interrupted_by,
        "eval_horizon_s": r.horizon_s,
        "observed_s": r.observed_s,
        "apparent_dead_time_s": r.apparent_dead_time_s,
        "ts_over_theta": r.ts_over_theta,
        "iae_over_delta_theta": r.iae_over_delta_theta,
        "steps_found": len(responses),
    }
    complete = r.outcome in (SETTLED, NOT_SETTLED)

    def res(value: float, usable: bool, why: str) -> KpiResult:
        if usable and math.isfinite(value):
            return KpiResult(value, Status.OK, coverage, horizon_s, None, ext)
        return missing(Status.UNDETERMINED, coverage, why, horizon_s, ext)

    not_reached = "interrupted" if r.outcome == INTERRUPTED else "z_did_not_reach_level"
    return {
        "step_rise_time": res(r.rise_time_s, True, not_reached),
        "step_t90": res(r.t90_s, True, not_reached),
        "step_overshoot": res(r.overshoot_pct, complete or r.outcome == SETTLED, r.outcome),
        "step_settling_time": res(r.settling_time_s, r.outcome == SETTLED, r.outcome),
    }

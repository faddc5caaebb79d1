"""Control-loop performance KPIs (docs/loop-kpis.md), pure numpy.

A stream agent calls :func:`compute_all` once per reporting window W with the window, the analysis
ring buffer H (both :class:`LoopWindow`, built with :func:`align`), the loop's :class:`LoopConfig` and
the state returned by the previous call. See README.md in this package for what each KPI means.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .common import (
    DEFAULT_GATE,
    GateConfig,
    KpiResult,
    LoopWindow,
    Status,
    align,
    error_pct,
    is_constant,
    longest_run,
    missing,
    mode_labels,
    noise_sigma,
    normal_mask,
    quality_is_good,
    sp_step_indices,
    sp_step_threshold,
)
from .config import LoopConfig, LoopType
from .errors import ERROR_KPIS, error_statistics
from .harris import HarrisConfig, harris_kpi
from .oscillation import AcfConfig, HagglundConfig, HagglundState, acf_regularity, hagglund_update, hysteresis
from .service import ServiceConfig, saturation, service_factor
from .step import STEP_KPIS, StepConfig, find_step_responses, step_kpis
from .stiction import StictionConfig, nonlinearity_kpi, stiction_kpis
from .valve import VALVE_KPIS, ValveConfig, valve_kpis

__all__ = [
    "DEFAULT_GATE",
    "KPI_NAMES",
    "STATE_VERSION",
    "AcfConfig",
    "GateConfig",
    "HagglundConfig",
    "HarrisConfig",
    "KpiResult",
    "LoopConfig",
    "LoopType",
    "LoopWindow",
    "ServiceConfig",
    "Status",
    "StepConfig",
    "StictionConfig",
    "ValveConfig",
    "align",
    "compute_all",
    "quality_is_good",
]

log = logging.getLogger(__name__)

STATE_VERSION = 1

_WINDOW_KEYS = ("data_quality", "service_factor", "sat_hi", "sat_lo", "sat_hi_normal", "sat_lo_normal")
_OSC_KEYS = ("osc_flag", "osc_period", "osc_regularity", "osc_amplitude")
_HARRIS_KEYS = ("harris", "cpi")
_STICTION_KEYS = ("stiction", "stiction_ccf", "stiction_area")
KPI_NAMES: tuple[str, ...] = (
    *_WINDOW_KEYS,
    *ERROR_KPIS,
    *VALVE_KPIS,
    "osc_hagglund",
    *_OSC_KEYS,
    *_HARRIS_KEYS,
    *_STICTION_KEYS,
    "nonlinearity",
    *STEP_KPIS,
)


def compute_all(
    window: LoopWindow,
    horizon: LoopWindow | None,
    cfg: LoopConfig,
    osc_state: Mapping[str, Any] | None = None,
    *,
    raise_errors: bool = False,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """All KPIs of one loop for one reporting window.

    ``window`` is the reporting window W (tumbling, e.g. 15 min); ``horizon`` the analysis buffer H
    ending with W (None: use W). ``osc_state`` is the dict returned by the previous call (None at
    start); it carries the Hägglund detector and the valve backlash filter across windows and is plain
    JSON. Returns ``({kpi_name: result_dict}, new_state)`` where each result dict is
    ``{"value": float|None, "status": str, "coverage": float, "horizon_s": float|None,
    "reason": str|None, "extras": {...}}`` with NaN written as None. Degenerate data never raises:
    the status says why there is no value. With ``raise_errors`` False an unexpected failure inside one
    KPI family is logged and reported as ``undetermined``/``internal_error`` for that family only.
    """
    h = horizon if horizon is not None and horizon.n > 0 else window
    st_in = osc_state if isinstance(osc_state, Mapping) else {}
    if st_in.get("version") != STATE_VERSION:
        st_in = {}
    res: dict[str, KpiResult] = {}
    new_state: dict[str, Any] = {"version": STATE_VERSION}

    def guard(keys: tuple[str, ...], fn: Callable[[], None], horizon_s: float) -> None:
        if raise_errors:
            fn()
            return
        try:
            fn()
        except Exception as exc:  # one family failing must not take the others down
            log.exception("loop KPI family %s failed", keys[0])
            for k in keys:
                res[k] = missing(Status.UNDETERMINED, 0.0, f"internal_error: {type(exc).__name__}", horizon_s)

    w_ctx = _Ctx(window, cfg)
    h_ctx = _Ctx(h, cfg)
    hw, hh = window.duration_s, h.duration_s

    guard(_WINDOW_KEYS, lambda: res.update(_window_kpis(w_ctx)), hw)
    guard(ERROR_KPIS, lambda: res.update(_error_kpis(w_ctx)), hw)

    def valve() -> None:
        out, vs = valve_kpis(
            window.op,
            window.t,
            window.valid,
            w_ctx.norm,
            window.ts,
            cfg.valve,
            cfg.gate,
            st_in.get("valve"),
            horizon_s=hw,
        )
        res.update(out)
        new_state["valve"] = vs

    guard(VALVE_KPIS, valve, hw)

    def hagg() -> None:
        prev = HagglundState.from_dict(st_in.get("hagglund"))
        tu = cfg.tu or cfg.ti
        r, st = hagglund_update(
            w_ctx.e,
            window.t,
            window.valid,
            w_ctx.norm_e,
            w_ctx.modes,
            window.sp,
            prev,
            ts=window.ts,
            tu=tu,
            holdoff_s=cfg.ti or tu,
            sp_delta=w_ctx.delta_sp,
            cfg=cfg.hagglund,
            horizon_s=hw,
        )
        res["osc_hagglund"] = r
        new_state["hagglund"] = st.to_dict()

    guard(("osc_hagglund",), hagg, hw)
    if "hagglund" not in new_state and isinstance(st_in.get("hagglund"), Mapping):
        new_state["hagglund"] = dict(st_in["hagglund"])  # keep the detector's memory over a failed run

    guard(_OSC_KEYS + _STICTION_KEYS + ("nonlinearity",), lambda: res.update(_horizon_osc(h_ctx)), hh)
    guard(_HARRIS_KEYS + STEP_KPIS, lambda: res.update(_horizon_harris_steps(h_ctx)), hh)

    return {k: res[k].to_dict() for k in KPI_NAMES if k in res}, new_state


class _Ctx:
    """Masks and derived signals of one LoopWindow, computed once."""

    def __init__(self, w: LoopWindow, cfg: LoopConfig) -> None:
        self.w = w
        self.cfg = cfg
        self.norm = normal_mask(w, cfg.normal_modes)
        self.e = error_pct(w.sp, w.pv, cfg.span, cfg.error_norm)
        # Error-based KPIs also need a finite e% (SP normalisation fails at SP = 0, huge values overflow).
        self.norm_e = self.norm & np.isfinite(self.e)
        with np.errstate(over="ignore", invalid="ignore"):
            self.e_raw = w.sp - w.pv
        ml = mode_labels(w.mode)
        self.modes = [m if v else "" for m, v in zip(ml, w.valid.tolist(), strict=True)]
        self.delta_sp = sp_step_threshold(w.sp, w.valid, cfg.span, cfg.step.delta_frac, cfg.step.noise_mult)
        self.steps = sp_step_indices(w.sp, w.valid, self.delta_sp)


def _window_kpis(c: _Ctx) -> dict[str, KpiResult]:
    w, cfg = c.w, c.cfg
    hw = w.duration_s
    out: dict[str, KpiResult] = {}
    n_valid = int(w.valid.sum())
    dq_ext = {"stale_tags": list(w.stale_tags), "n": w.n, "n_valid": n_valid, "n_normal": int(c.norm.sum())}
    if w.n == 0:
        out["data_quality"] = missing(Status.INSUFFICIENT_DATA, 0.0, "empty_window", hw, dq_ext)
    else:
        cov = n_valid / w.n
        out["data_quality"] = KpiResult(100.0 * cov, Status.OK, cov, hw, None, dq_ext)
    out["service_factor"] = service_factor(w.valid, c.norm, cfg.gate, hw)
    out.update(saturation(w.op, w.valid, c.norm, cfg.op_lo, cfg.op_hi, cfg.service, cfg.gate, hw))
    return out


def _error_kpis(c: _Ctx) -> dict[str, KpiResult]:
    w, cfg = c.w, c.cfg
    t0 = float(w.t[c.steps[-1]]) if c.steps.size else (float(w.t[0]) if w.n else None)
    constant = is_constant(c.e_raw[c.norm_e], cfg.span, cfg.gate)
    return error_statistics(
        c.e,
        w.valid,
        c.norm,
        w.ts,
        t=w.t,
        itae_t0=t0,
        constant=constant,
        gate=cfg.gate,
        horizon_s=w.duration_s,
    )


def _horizon_gate(c: _Ctx) -> tuple[Status, str] | None:
    if c.w.n == 0:
        return Status.INSUFFICIENT_DATA, "empty_horizon"
    if not c.w.valid.any():
        return Status.INSUFFICIENT_DATA, "no_valid_samples"
    if not c.norm.any():
        return Status.NOT_IN_NORMAL_MODE, "no_normal_mode_samples"
    if not c.norm_e.any():
        return Status.UNDETERMINED, "error_not_normalisable"
    return None


def _horizon_osc(c: _Ctx) -> dict[str, KpiResult]:
    """ACF regularity, period, amplitude, stiction and bicoherence on the longest normal-mode stretch of H."""
    w, cfg = c.w, c.cfg
    hh = w.duration_s
    out: dict[str, KpiResult] = {}
    skip = _horizon_gate(c)
    a, b = longest_run(c.norm_e)
    cov = (b - a) / w.n if w.n else 0.0
    seg_ext = {"segment_s": (b - a) * w.ts}
    if skip is not None:
        for k in _OSC_KEYS:
            out[k] = missing(skip[0], cov, skip[1], hh, seg_ext)
        out.update(
            stiction_kpis(
                w.op[:0],
                w.pv[:0],
                c.e[:0],
                osc_flag=False,
                period_s=math.nan,
                ts=w.ts,
                h=math.nan,
                self_regulating=True,
                cfg=cfg.stiction,
                coverage=cov,
                horizon_s=hh,
                skip_reason=skip,
            )
        )
        out["nonlinearity"] = nonlinearity_kpi(
            c.e[:0], cfg.stiction, coverage=cov, horizon_s=hh, skip_reason=skip
        )
        return out

    e = c.e[a:b]
    if is_constant(c.e_raw[a:b], cfg.span, cfg.gate) and e.size >= cfg.acf.min_samples:
        acf_status: tuple[Status, str] | None = (Status.CONSTANT_SIGNAL, "constant_error")
        acf = None
    else:
        acf = acf_regularity(e, w.ts, cfg.acf)
        acf_status = None if acf.status is Status.OK else (acf.status, acf.reason or "")
    if acf is None or acf_status is not None:
        st, why = acf_status if acf_status is not None else (Status.UNDETERMINED, "")
        ext = dict(seg_ext)
        if acf is not None:
            ext.update(estimated_period_s=acf.estimated_period_s, r=acf.r)
        for k in _OSC_KEYS:
            out[k] = missing(st, cov, why, hh, ext)
        out.update(
            stiction_kpis(
                w.op[:0],
                w.pv[:0],
                e[:0],
                osc_flag=False,
                period_s=math.nan,
                ts=w.ts,
                h=math.nan,
                self_regulating=True,
                cfg=cfg.stiction,
                coverage=cov,
                horizon_s=hh,
                skip_reason=(st, why),
            )
        )
    else:
        ext = dict(
            seg_ext,
            flag=acf.flag,
            period_s=acf.period_s,
            r=acf.r,
            acf_at_period=acf.acf_at_period,
            n_period_samples=acf.n_period_samples,
            amplitude_pct=acf.amplitude_pct,
        )
        out["osc_flag"] = KpiResult(1.0 if acf.flag else 0.0, Status.OK, cov, hh, None, ext)
        if acf.flag:
            out["osc_period"] = KpiResult(acf.period_s, Status.OK, cov, hh, None, ext)
            out["osc_amplitude"] = KpiResult(acf.amplitude_pct, Status.OK, cov, hh, None, ext)
        else:
            out["osc_period"] = missing(Status.NOT_APPLICABLE, cov, "no_oscillation", hh, ext)
            out["osc_amplitude"] = missing(Status.NOT_APPLICABLE, cov, "no_oscillation", hh, ext)
        if math.isfinite(acf.r):
            out["osc_regularity"] = KpiResult(acf.r, Status.OK, cov, hh, None, ext)
        else:
            out["osc_regularity"] = missing(Status.UNDETERMINED, cov, "too_few_acf_zero_crossings", hh, ext)
        hcfg = cfg.hagglund
        sig = hcfg.noise_sigma_pct if hcfg.noise_sigma_pct is not None else noise_sigma(e)
        out.update(
            stiction_kpis(
                w.op[a:b],
                w.pv[a:b],
                e,
                osc_flag=acf.flag,
                period_s=acf.period_s,
                ts=w.ts,
                h=hysteresis(sig, hcfg.h_sigma_mult, hcfg.h_min_pct),
                self_regulating=cfg.loop_type == "self_regulating",
                cfg=cfg.stiction,
                coverage=cov,
                horizon_s=hh,
            )
        )
    out["nonlinearity"] = nonlinearity_kpi(e, cfg.stiction, coverage=cov, horizon_s=hh)
    return out


def _horizon_harris_steps(c: _Ctx) -> dict[str, KpiResult]:
    w, cfg = c.w, c.cfg
    hh = w.duration_s
    out: dict[str, KpiResult] = {}
    step_ok = c.norm & np.isin(np.array(c.modes, dtype=object), [m.upper() for m in cfg.step.step_modes])
    responses = find_step_responses(
        w.t,
        w.pv,
        w.sp,
        w.valid,
        step_ok,
        ts=w.ts,
        delta_sp=c.delta_sp,
        ti=cfg.ti,
        theta=cfg.dead_time,
        cfg=cfg.step,
    )
    skip = _horizon_gate(c)
    step_cov = float(c.norm.mean()) if w.n else 0.0
    if skip is not None:
        out.update({k: missing(skip[0], step_cov, skip[1], hh) for k in STEP_KPIS})
    else:
        out.update(step_kpis(responses, coverage=step_cov, horizon_s=hh))

    # Harris needs constant SP: split normal-mode runs at every SP step and use the longest piece.
    steady = c.norm_e.copy()
    steady[c.steps] = False
    a, b = longest_run(steady)
    cov = (b - a) / w.n if w.n else 0.0
    if skip is not None:
        r = missing(skip[0], cov, skip[1], hh)
        out["harris"], out["cpi"] = r, r
        return out
    theta, source = cfg.dead_time, "config"
    if theta is None and cfg.harris.estimate_dead_time_from_steps:
        est = [r.apparent_dead_time_s for r in responses if math.isfinite(r.apparent_dead_time_s)]
        if est:
            theta, source = float(np.median(est)), "sp_step"
    out["harris"], out["cpi"] = harris_kpi(
        c.e[a:b],
        w.ts,
        theta,
        cfg.harris,
        constant=is_constant(c.e_raw[a:b], cfg.span, cfg.gate),
        dead_time_source=source,
        coverage=cov,
        horizon_s=hh,
    )
    return out

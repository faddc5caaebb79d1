"""Harris minimum-variance index (docs/loop-kpis.md §4).

For mean-removed y_t = ψ(q)a_t and a loop delay of b samples, minimum-variance control leaves
sigma²_mv = sigma²_a·Σ_{i<b} ψ_i² (Harris 1989, Can. J. Chem. Eng. 67:856). The index is
η = sigma²_mv/MSE with MSE = var(e) + mean(e)², so an offset is penalised as in Desborough & Harris
(1992, CJChE 70:1186); η ∈ [0, 1], 1 = MV-optimal (Huang & Shah convention) and CPI = 1 - η.

Three estimators of sigma²_mv:

* ``"ar"`` — AR(n) by least squares, ψ the impulse response of 1/Â(q);
* ``"dh"`` — Desborough & Harris: regress y_t on y_{t-b} … y_{t-b-n+1}; residual variance = sigma²_mv;
* ``"fcor"`` — FCOR (Huang, Shah & Kwok 1997, Automatica 33:1175): prewhiten with the AR model, then
  η = Σ_{i<b} rho²_{yâ}(i).

When the dead time is unknown the η(b) curve for b = 1…b_max is published (Thornhill, Oettinger &
Fedenczuk 1999, JPC 9:109).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .common import FloatArray, KpiResult, Status, missing

Method = Literal["ar", "dh", "fcor"]


@dataclass(frozen=True)
class HarrisConfig:
    order: int = 20  # AR order n (10-30 is the usual range)
    min_samples: int = 1000  # contiguous normal-mode samples at constant SP
    method: Method = "ar"
    b_max: int = 30  # η(b) curve length when the dead time is unknown
    eta_ok: float = 0.5  # η ≥ eta_ok: ok; eta_poor ≤ η < eta_ok: review; below: poor
    eta_poor: float = 0.3
    assumed_dead_time_s: float | None = None  # used (flagged deadtime_assumed) when θ is unknown
    estimate_dead_time_from_steps: bool = True


def delay_samples(dead_time_s: float, ts: float) -> int:
    """b = floor(θ/Ts) + 1."""
    return math.floor(dead_time_s / ts + 1e-9) + 1


def _lagged(y: FloatArray, first_lag: int, n_lags: int) -> tuple[FloatArray, FloatArray]:
    """Regression rows: targets y_t and regressors y_{t-first_lag} … y_{t-first_lag-n_lags+1}."""
    start = first_lag + n_lags - 1
    rows = y.size - start
    x = np.empty((rows, n_lags))
    for j in range(n_lags):
        lag = first_lag + j
        x[:, j] = y[start - lag : y.size - lag]
    return y[start:], x


def fit_ar(y: FloatArray, order: int) -> tuple[FloatArray, float, FloatArray]:
    """Least-squares AR(order): returns (a_1..a_n, sigma²_a, residuals) with y_t = Σ a_i y_{t-i} + â_t.

    sigma²_a = RSS/(rows - n), the unbiased residual variance.
    """
    target, x = _lagged(y, 1, order)
    coef, *_ = np.linalg.lstsq(x, target, rcond=None)
    resid = target - x @ coef
    dof = max(1, target.size - order)
    return np.asarray(coef, dtype=float), float(resid @ resid) / dof, np.asarray(resid, dtype=float)


def impulse_response(a: FloatArray, m: int) -> FloatArray:
    """First m coefficients of ψ(q) = 1/(1 - Σ a_i q^{-i})."""
    psi = np.zeros(m)
    if m == 0:
        return psi
    psi[0] = 1.0
    for j in range(1, m):
        k = min(j, a.size)
        psi[j] = float(np.dot(a[:k], psi[j - 1 :: -1][:k]))
    return psi


@dataclass(frozen=True)
class HarrisEstimate:
    eta: float  # clipped to [0, 1]
    eta_raw: float
    sigma2_mv: float
    mse: float
    b: int
    method: str


def harris_index(e: FloatArray, b: int, order: int = 20, method: Method = "ar") -> HarrisEstimate:
    """η for delay b on one stretch of error (any units). Raises ValueError if e is too short for the fit."""
    e = np.asarray(e, dtype=float)
    if e.size < order + b + 10 or b < 1:
        raise ValueError("too few samples for the AR fit")
    mse = float(np.mean(e * e))  # var(e) (ddof 0) + mean(e)²
    y = e - e.mean()
    if method == "dh":
        target, x = _lagged(y, b, order)
        coef, *_ = np.linalg.lstsq(x, target, rcond=None)
        resid = target - x @ coef
        s2 = float(resid @ resid) / max(1, target.size - order)
    else:
        a, s2a, resid = fit_ar(y, order)
        if method == "fcor":
            # rho_{yâ}(i) = corr(y_t, â_{t-i}) on the aligned part; η_var = Σ rho², rescaled from var to MSE.
            yy = y[order:]
            num = np.array([np.dot(yy[i:], resid[: resid.size - i]) for i in range(b)])
            rho = num / (yy.size * np.std(yy) * np.std(resid))
            # In-sample residuals understate sigma²_a by (rows - n)/rows; undo it as the AR estimate does.
            dof_fix = resid.size / max(1, resid.size - order)
            s2 = float(np.sum(rho**2)) * float(np.var(y)) * dof_fix
        else:
            s2 = s2a * float(np.sum(impulse_response(a, b) ** 2))
    raw = s2 / mse if mse > 0 else math.nan
    return HarrisEstimate(float(np.clip(raw, 0.0, 1.0)), raw, s2, mse, b, method)


def eta_curve(e: FloatArray, b_max: int, order: int = 20) -> FloatArray:
    """η(b) for b = 1…b_max from one AR fit."""
    e = np.asarray(e, dtype=float)
    mse = float(np.mean(e * e))
    a, s2a, _ = fit_ar(e - e.mean(), order)
    cum = np.cumsum(impulse_response(a, b_max) ** 2) * s2a
    return np.asarray(np.clip(cum / mse, 0.0, 1.0), dtype=float) if mse > 0 else np.full(b_max, math.nan)


def rating(eta: float, cfg: HarrisConfig) -> str:
    if not math.isfinite(eta):
        return "unknown"
    return "ok" if eta >= cfg.eta_ok else ("review" if eta >= cfg.eta_poor else "poor")


def harris_kpi(
    e_pct: FloatArray,
    ts: float,
    dead_time_s: float | None,
    cfg: HarrisConfig | None = None,
    *,
    constant: bool = False,
    dead_time_source: str = "config",
    coverage: float = 1.0,
    horizon_s: float = math.nan,
) -> tuple[KpiResult, KpiResult]:
    """(η, CPI) results for one steady stretch of e%.

    ``dead_time_s`` None falls back to ``cfg.assumed_dead_time_s``; with neither, the status is
    undetermined and only the η(b) curve is published. Any dead time not from the configuration sets
    ``deadtime_assumed``.
    """
    cfg = cfg or HarrisConfig()
    e = np.asarray(e_pct, dtype=float)
    n = e.size
    base: dict[str, Any] = {"n": n, "order": cfg.order, "method": cfg.method}
    if n < max(cfg.min_samples, cfg.order + cfg.b_max + 10):
        r = missing(
            Status.INSUFFICIENT_DATA, coverage, f"fewer_than_{cfg.min_samples}_steady_samples", horizon_s
        )
        return r, r
    if constant or not np.isfinite(e).all():
        r = missing(Status.CONSTANT_SIGNAL, coverage, "constant_error", horizon_s, base)
        return r, r
    source = dead_time_source
    if dead_time_s is None and cfg.assumed_dead_time_s is not None:
        dead_time_s, source = cfg.assumed_dead_time_s, "assumed"
    curve = eta_curve(e, cfg.b_max, cfg.order)
    extras = dict(base, eta_curve=[float(v) for v in curve])
    if dead_time_s is None:
        r = missing(
            Status.UNDETERMINED, coverage, "dead_time_unknown", horizon_s, dict(extras, deadtime_assumed=True)
        )
        return r, r
    b = delay_samples(dead_time_s, ts)
    est = harris_index(e, b, cfg.order, cfg.method)
    extras.update(
        b=b,
        dead_time_s=dead_time_s,
        deadtime_assumed=source != "config",
        dead_time_source=source,
        eta_raw=est.eta_raw,
        sigma2_mv=est.sigma2_mv,
        mse=est.mse,
        rating=rating(est.eta, cfg),
    )
    return (
        KpiResult(est.eta, Status.OK, coverage, horizon_s, None, extras),
        KpiResult(1.0 - est.eta, Status.OK, coverage, horizon_s, None, dict(extras)),
    )

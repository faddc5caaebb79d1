"""Control-error statistics over normal-mode samples (docs/loop-kpis.md §2).

mean, std (ddof 1), IAE, ISE/RMSE and ITAE of e% = 100·(SP - PV)/span. Each is time-normalised so it
reads in % of span and does not grow with the window length. Manual periods are skipped, never bridged.
"""

from __future__ import annotations

import math

import numpy as np

from .common import DEFAULT_GATE, BoolArray, FloatArray, GateConfig, KpiResult, Status, gate_normal, missing

ERROR_KPIS = ("err_mean", "err_std", "iae", "ise", "rmse", "itae")


def error_statistics(
    e_pct: FloatArray,
    valid: BoolArray,
    norm: BoolArray,
    ts: float,
    *,
    t: FloatArray | None = None,
    itae_t0: float | None = None,
    constant: bool = False,
    gate: GateConfig = DEFAULT_GATE,
    horizon_s: float = math.nan,
) -> dict[str, KpiResult]:
    """Error statistics over ``norm`` samples.

    ITAE_n = (2/T²)·Σ τ_k|e%_k|·Ts over the normal-mode samples at or after ``itae_t0`` (the last SP step,
    else the window start), with τ_k the normal-mode time elapsed since t0 at the middle of sample k; the
    midpoint makes a constant |e%| = c give exactly c, and measuring τ in normal-mode time keeps manual
    periods out of the weighting. With ``constant`` the status is constant_signal but the values are kept
    (spec §0: means and IAE are still computed).
    """
    n, n_valid, n_norm = valid.size, int(valid.sum()), int(norm.sum())
    status, cov, reason = gate_normal(n, n_valid, n_norm, gate)
    if status is not None:
        return {k: missing(status, cov, reason, horizon_s) for k in ERROR_KPIS}

    e = e_pct[norm]
    e = e[np.isfinite(e)]
    if e.size == 0:  # only possible with SP normalisation at SP = 0
        return {k: missing(Status.UNDETERMINED, cov, "error_not_normalisable", horizon_s) for k in ERROR_KPIS}
    st = Status.CONSTANT_SIGNAL if constant else Status.OK
    why = "constant_error" if constant else None
    n_n = e.size
    mean = float(np.mean(e))
    std = float(np.std(e, ddof=1)) if n_n > 1 else math.nan
    iae = float(np.mean(np.abs(e)))
    ise = float(np.mean(e * e))
    ext = {"n_normal": n_n, "t_normal_s": n_n * ts}

    out = {
        "err_mean": KpiResult(mean, st, cov, horizon_s, why, ext),
        "err_std": KpiResult(std, st if n_n > 1 else Status.INSUFFICIENT_DATA, cov, horizon_s, why, ext),
        "iae": KpiResult(iae, st, cov, horizon_s, why, ext),
        "ise": KpiResult(ise, st, cov, horizon_s, why, ext),
        "rmse": KpiResult(math.sqrt(ise), st, cov, horizon_s, why, ext),
    }

    sel = norm.copy()
    if t is not None and itae_t0 is not None:
        sel &= t >= itae_t0
    ea = np.abs(e_pct[sel])
    ea = ea[np.isfinite(ea)]
    if ea.size == 0:
        out["itae"] = missing(Status.INSUFFICIENT_DATA, cov, "no_normal_samples_since_t0", horizon_s)
    else:
        tau = (np.arange(ea.size) + 0.5) * ts
        tn = ea.size * ts
        itae = float(2.0 / tn**2 * np.sum(tau * ea) * ts)
        extras = dict(ext, t0=itae_t0, t_since_t0_s=tn)
        out["itae"] = KpiResult(itae, st, cov, horizon_s, why, extras)
    return out

"""Valve stiction tests for an oscillating, self-regulating loop (docs/loop-kpis.md §5).

* 5a cross-correlation OP→PV (Horch 1999, CEP 7:1221): an odd CCF points to stiction, an even one to
  tuning or an external cause; quantified by the phase Δφ = π(τ_r + τ_l)/(τ_r - τ_l) of the nearest zero
  crossings (Horch 2000 PhD thesis; Jelali & Huang 2010).
* 5b area ratio of the error half-cycles (Singhal & Salsbury 2005, JPC 15:371-382): R = median A1/A2
  with A1 the area before the peak and A2 after it; R > 1 for stiction, ≈ 1 for sinusoids.
* Verdict: stiction only if both say so; conflicting answers give undetermined.
* 5c bicoherence NGI/NLI (Choudhury, Shah & Thornhill 2004, Automatica 40:1719), a supplementary
  nonlinearity flag only: symmetric limit cycles have no quadratic phase coupling (false negatives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import FloatArray, KpiResult, Status, missing
from .oscillation import half_cycles, zero_crossings

STICTION = "stiction"
NONE = "none"
UNDETERMINED = "undetermined"


@dataclass(frozen=True)
class StictionConfig:
    ccf_lag_periods: float = 1.5  # |τ| ≤ this·T̂p
    dphi_stiction: float = 2.0 * math.pi / 3.0  # |Δφ| ≥ this → stiction
    dphi_none: float = math.pi / 3.0  # |Δφ| ≤ this → no stiction
    area_stiction: float = 1.2  # R ≥ this → stiction (the paper's R > 1 plus a noise margin)
    area_none: float = 1.1  # R ≤ this → no stiction
    min_half_cycles: int = 6
    bicoherence: bool = True
    bic_segment: int = 128  # M
    bic_min_samples: int = 4096
    ngi_threshold: float = 0.001
    nli_threshold: float = 0.01
    bic_trim: float = 0.1  # fraction trimmed at each end for the robust mean/sigma of NLI


# ------------------------------------------------------------------------------------------- 5a


@dataclass(frozen=True)
class CcfResult:
    status: Status
    reason: str | None
    dphi: float  # rad
    verdict: str
    tau_l_s: float
    tau_r_s: float


def cross_correlation(u: FloatArray, y: FloatArray, max_lag: int) -> tuple[FloatArray, FloatArray]:
    """r_uy(τ) = Σ(u_k - ū)(y_{k+τ} - ȳ)/(N sigma_u sigma_y) for τ = -max_lag…max_lag; returns (lags, r)."""
    n = u.size
    uc, yc = u - u.mean(), y - y.mean()
    den = n * float(np.std(uc)) * float(np.std(yc))
    max_lag = min(max_lag, n - 1)
    lags = np.arange(-max_lag, max_lag + 1)
    if den <= 0:
        return lags.astype(float), np.zeros(lags.size)
    nfft = 1 << int(2 * n - 1).bit_length()
    full = np.fft.irfft(np.conj(np.fft.rfft(uc, nfft)) * np.fft.rfft(yc, nfft), nfft)
    r = np.concatenate([full[nfft - max_lag :], full[: max_lag + 1]]) / den
    return lags.astype(float), np.asarray(r, dtype=float)


def ccf_stiction(
    op: FloatArray, pv: FloatArray, period_samples: float, ts: float, cfg: StictionConfig | None = None
) -> CcfResult:
    """Horch's phase test on OP (u) and PV (y)."""
    cfg = cfg or StictionConfig()
    if not (math.isfinite(period_samples) and period_samples > 0) or op.size < 8:
        return CcfResult(Status.INSUFFICIENT_DATA, "no_period", math.nan, UNDETERMINED, math.nan, math.nan)
    if np.std(op) <= 0 or np.std(pv) <= 0:
        return CcfResult(
            Status.CONSTANT_SIGNAL, "constant_op_or_pv", math.nan, UNDETERMINED, math.nan, math.nan
        )
    max_lag = math.ceil(cfg.ccf_lag_periods * period_samples)
    lags, r = cross_correlation(op, pv, max_lag)
    z = zero_crossings(r, offset=float(lags[0]))
    right = z[z > 0]
    left = z[z <= 0]
    if right.size == 0 or left.size == 0:
        return CcfResult(
            Status.UNDETERMINED, "ccf_zero_crossing_not_found", math.nan, UNDETERMINED, math.nan, math.nan
        )
    tau_r, tau_l = float(right.min()), float(left.max())
    dphi = math.pi * (tau_r + tau_l) / (tau_r - tau_l)
    a = abs(dphi)
    verdict = STICTION if a >= cfg.dphi_stiction else (NONE if a <= cfg.dphi_none else UNDETERMINED)
    return CcfResult(Status.OK, None, dphi, verdict, tau_l * ts, tau_r * ts)


# ------------------------------------------------------------------------------------------- 5b


@dataclass(frozen=True)
class AreaResult:
    status: Status
    reason: str | None
    ratio: float
    verdict: str
    n_half_cycles: int


def area_ratio(e_pct: FloatArray, h: float, cfg: StictionConfig | None = None) -> AreaResult:
    """R = median over half-cycles of A1/A2, A1 = Σ|e| from the half-cycle start to the peak, A2 = from
    the peak to its end (the peak sample in both)."""
    cfg = cfg or StictionConfig()
    ratios = []
    a = np.abs(np.asarray(e_pct, dtype=float))
    for lo, hi in half_cycles(np.asarray(e_pct, dtype=float), h):
        seg = a[lo:hi]
        p = int(np.argmax(seg))
        a1, a2 = float(seg[: p + 1].sum()), float(seg[p:].sum())
        if a2 > 0:
            ratios.append(a1 / a2)
    if len(ratios) < cfg.min_half_cycles:
        return AreaResult(
            Status.INSUFFICIENT_DATA,
            f"fewer_than_{cfg.min_half_cycles}_half_cycles",
            math.nan,
            UNDETERMINED,
            len(ratios),
        )
    r = float(np.median(ratios))
    verdict = STICTION if r >= cfg.area_stiction else (NONE if r <= cfg.area_none else UNDETERMINED)
    return AreaResult(Status.OK, None, r, verdict, len(ratios))


def combine(ccf_verdict: str, area_verdict: str) -> str:
    """Stiction only when both tests say so; none when neither says stiction and one says none."""
    if ccf_verdict == STICTION and area_verdict == STICTION:
        return STICTION
    if STICTION not in (ccf_verdict, area_verdict) and NONE in (ccf_verdict, area_verdict):
        return NONE
    return UNDETERMINED


# ------------------------------------------------------------------------------------------- 5c


@dataclass(frozen=True)
class BicoherenceResult:
    status: Status
    reason: str | None
    ngi: float
    nli: float
    nonlinear: bool
    segments: int
    bic2_crit: float


def bicoherence(x: FloatArray, cfg: StictionConfig | None = None) -> BicoherenceResult:
    """Squared bicoherence over the principal domain; NGI = mean(bic²) - bic²_crit and
    NLI = |bic²_max - (robust mean + 2·robust sigma)|, nonlinear when NGI > 0.001 and NLI > 0.01.

    Segments of M samples, 50 % overlap, Hann window; bic²_crit = 5.99/(2K) (χ²₂ at alpha = 0.05).
    """
    cfg = cfg or StictionConfig()
    x = np.asarray(x, dtype=float)
    m = cfg.bic_segment
    if x.size < max(cfg.bic_min_samples, 2 * m) or not np.isfinite(x).all():
        return BicoherenceResult(
            Status.INSUFFICIENT_DATA,
            f"fewer_than_{cfg.bic_min_samples}_samples",
            math.nan,
            math.nan,
            False,
            0,
            math.nan,
        )
    if np.std(x) <= 0:
        return BicoherenceResult(
            Status.CONSTANT_SIGNAL, "constant_signal", math.nan, math.nan, False, 0, math.nan
        )
    hop = m // 2
    k = (x.size - m) // hop + 1
    idx = np.arange(m)[None, :] + hop * np.arange(k)[:, None]
    seg = x[idx]
    seg = seg - seg.mean(axis=1, keepdims=True)
    spec = np.fft.fft(seg * np.hanning(m)[None, :], axis=1)
    half = m // 2
    f1, f2 = np.meshgrid(np.arange(1, half), np.arange(1, half), indexing="ij")
    keep = (f2 <= f1) & (f1 + f2 < half)  # principal domain, DC and Nyquist excluded
    i1, i2 = f1[keep], f2[keep]
    x1, x2, x3 = spec[:, i1], spec[:, i2], spec[:, i1 + i2]
    num = np.abs(np.mean(x1 * x2 * np.conj(x3), axis=0)) ** 2
    den = np.mean(np.abs(x1 * x2) ** 2, axis=0) * np.mean(np.abs(x3) ** 2, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        bic2 = np.where(den > 0, num / den, 0.0)
    crit = 5.99 / (2.0 * k)
    ngi = float(np.mean(bic2)) - crit
    srt = np.sort(bic2)
    cut = int(cfg.bic_trim * srt.size)
    core = srt[cut : srt.size - cut] if srt.size - 2 * cut >= 2 else srt
    nli = abs(float(srt[-1]) - (float(np.mean(core)) + 2.0 * float(np.std(core))))
    nonlinear = ngi > cfg.ngi_threshold and nli > cfg.nli_threshold
    return BicoherenceResult(Status.OK, None, ngi, nli, nonlinear, int(k), crit)


# ------------------------------------------------------------------------------------------ KPIs


def stiction_kpis(
    op: FloatArray,
    pv: FloatArray,
    e_pct: FloatArray,
    *,
    osc_flag: bool,
    period_s: float,
    ts: float,
    h: float,
    self_regulating: bool,
    cfg: StictionConfig | None = None,
    coverage: float = 1.0,
    horizon_s: float = math.nan,
    skip_reason: tuple[Status, str] | None = None,
) -> dict[str, KpiResult]:
    """stiction (1 = stiction, 0 = none), stiction_ccf (Δφ, rad), stiction_area (R), nonlinearity (NGI)."""
    cfg = cfg or StictionConfig()
    keys = ("stiction", "stiction_ccf", "stiction_area")
    out: dict[str, KpiResult] = {}
    if skip_reason is not None:
        st, why = skip_reason
        out.update({k: missing(st, coverage, why, horizon_s) for k in keys})
    elif not self_regulating:
        out.update({k: missing(Status.NOT_APPLICABLE, coverage, "integrating_loop", horizon_s) for k in keys})
    elif not osc_flag:
        out.update({k: missing(Status.NOT_APPLICABLE, coverage, "no_oscillation", horizon_s) for k in keys})
    else:
        c = ccf_stiction(op, pv, period_s / ts, ts, cfg)
        a = area_ratio(e_pct, h, cfg)
        c_ext: dict[str, Any] = {
            "verdict": c.verdict,
            "abs_dphi_over_pi": abs(c.dphi) / math.pi if math.isfinite(c.dphi) else math.nan,
            "tau_l_s": c.tau_l_s,
            "tau_r_s": c.tau_r_s,
        }
        a_ext: dict[str, Any] = {"verdict": a.verdict, "n_half_cycles": a.n_half_cycles, "h": h}
        out["stiction_ccf"] = (
            KpiResult(c.dphi, Status.OK, coverage, horizon_s, None, c_ext)
            if c.status is Status.OK
            else missing(c.status, coverage, c.reason or "", horizon_s, c_ext)
        )
        out["stiction_area"] = (
            KpiResult(a.ratio, Status.OK, coverage, horizon_s, None, a_ext)
            if a.status is Status.OK
            else missing(a.status, coverage, a.reason or "", horizon_s, a_ext)
        )
        verdict = combine(c.verdict, a.verdict)
        ext = {
            "verdict": verdict,
            "ccf_verdict": c.verdict,
            "area_verdict": a.verdict,
            "abs_dphi_over_pi": c_ext["abs_dphi_over_pi"],
            "area_ratio": a.ratio,
            "period_s": period_s,
        }
        if verdict == UNDETERMINED:
            conflict = STICTION in (c.verdict, a.verdict) and NONE in (c.verdict, a.verdict)
            out["stiction"] = missing(
                Status.UNDETERMINED,
                coverage,
                "tests_conflict" if conflict else "tests_inconclusive",
                horizon_s,
                ext,
            )
        else:
            out["stiction"] = KpiResult(
                1.0 if verdict == STICTION else 0.0, Status.OK, coverage, horizon_s, None, ext
            )
    return out


def nonlinearity_kpi(
    e_pct: FloatArray,
    cfg: StictionConfig | None = None,
    *,
    coverage: float = 1.0,
    horizon_s: float = math.nan,
    skip_reason: tuple[Status, str] | None = None,
) -> KpiResult:
    """Bicoherence NGI as a supplementary nonlinearity indicator (value = NGI, extras.nonlinear)."""
    cfg = cfg or StictionConfig()
    if skip_reason is not None:
        return missing(skip_reason[0], coverage, skip_reason[1], horizon_s)
    if not cfg.bicoherence:
        return missing(Status.NOT_APPLICABLE, coverage, "disabled", horizon_s)
    b = bicoherence(e_pct, cfg)
    ext = {"nli": b.nli, "nonlinear": b.nonlinear, "segments": b.segments, "bic2_crit": b.bic2_crit}
    if b.status is not Status.OK:
        return missing(b.status, coverage, b.reason or "", horizon_s, ext)
    return KpiResult(b.ngi, Status.OK, coverage, horizon_s, None, ext)

"""Oscillation detection (docs/loop-kpis.md §3).

* :func:`hagglund_update` — Hägglund's online load-detection detector (Hägglund 1995, CEP 3:1543-1551;
  implementation notes in Hägglund 2005, CEP 13:1383), stateful across windows through
  :class:`HagglundState`, which round-trips through a plain JSON-able dict.
* :func:`acf_regularity` — regularity of the zero crossings of the error ACF (Thornhill, Huang & Zhang
  2003, JPC 13:91-100) with the spec's extra gates against false alarms on noise.
* :func:`half_cycles` — half-cycle segmentation with noise hysteresis, shared with the area-ratio test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .common import BoolArray, FloatArray, KpiResult, Status, missing, noise_sigma

# ------------------------------------------------------------------------------------ half-cycles


def hysteresis(sigma: float, mult: float = 3.0, floor: float = 0.1) -> float:
    """h = max(mult·sigma_noise, floor) in % of span (spec §3a, §5b)."""
    return max(mult * sigma, floor) if math.isfinite(sigma) else floor


def _fill_signs(e: FloatArray) -> FloatArray:
    """sign(e) with exact zeros taking the previous non-zero sign (a touch of zero is not a crossing)."""
    s = np.sign(e)
    nz = np.flatnonzero(s)
    if nz.size == 0:
        return s
    idx = np.zeros(s.size, dtype=np.int64)
    idx[nz] = nz
    idx = np.maximum.accumulate(idx)
    idx[: nz[0]] = nz[0]
    return s[idx]


def half_cycles(e: FloatArray, h: float) -> list[tuple[int, int]]:
    """[start, stop) of the complete half-cycles of ``e`` whose peak |e| exceeds ``h``.

    Boundaries are the zero crossings of e; segments that never leave the band ±h are noise chatter
    around a crossing and are dropped, as are the first and last (cut) segments.
    """
    if e.size < 3:
        return []
    s = _fill_signs(e)
    if not s.any():
        return []
    cuts = np.flatnonzero(s[1:] != s[:-1]) + 1
    bounds = np.concatenate([[0], cuts, [e.size]])
    out = []
    a = np.abs(e)
    for i in range(1, bounds.size - 2):  # skip the first and last segment: they are cut by the window
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        if a[lo:hi].max() > h:
            out.append((lo, hi))
    return out


# ------------------------------------------------------------------------------------- Hägglund


@dataclass(frozen=True)
class HagglundConfig:
    load_amplitude_pct: float = 1.0  # a: IAE_lim = 2a/ω_u (a half-sine of amplitude a at ω_u)
    tsup_factor: float = 50.0  # T_sup = tsup_factor·Tu, gamma = 1 - Ts/T_sup
    n_lim: float = 10.0  # alarm when the load counter exceeds this
    h_sigma_mult: float = 3.0  # hysteresis h = max(h_sigma_mult·sigma_noise, h_min_pct)
    h_min_pct: float = 0.1
    noise_sigma_pct: float | None = None  # fixed sigma_noise; None estimates it from the data
    max_durations: int = 20  # recent load half-cycle durations kept for the period estimate
    min_loads_for_period: int = 2


@dataclass
class HagglundState:
    """Detector state carried between windows (spec §3a: x, the running IAE, the last sign, …)."""

    x: float = 0.0
    seg_sign: int = 0  # sign of the current raw segment (between zero crossings)
    seg_iae: float = 0.0  # ∫|e|dt of the current segment, %·s
    seg_dur: float = 0.0  # s
    seg_significant: bool = False  # the segment has left the ±h band
    seg_pre: float = 0.0  # chatter time before this segment, attributed to it as a half-cycle
    chatter: float = 0.0  # time spent in sub-h segments since the last significant one, s
    last_sig_sign: int = 0
    holdoff_until: float | None = None
    last_t: float | None = None
    last_sp: float | None = None
    last_mode: str | None = None
    noise_sigma: float | None = None
    durations: list[float] = field(default_factory=list)
    last_iae: float | None = None  # IAE of the last completed significant half-cycle, %·s
    loads_total: int = 0
    version: int = 1

    def reset_segment(self) -> None:
        self.seg_sign, self.seg_iae, self.seg_dur = 0, 0.0, 0.0
        self.seg_significant, self.seg_pre, self.chatter, self.last_sig_sign = False, 0.0, 0.0, 0

    def to_dict(self) -> dict[str, Any]:
        if not all(math.isfinite(getattr(self, f)) for f in _FLOAT_FIELDS):
            return HagglundState().to_dict()  # overflowed on absurd data: start afresh, stay JSON
        d = asdict(self)
        for f in _OPTIONAL_FIELDS:
            if d[f] is not None and not math.isfinite(d[f]):
                d[f] = None
        d["durations"] = [float(v) for v in self.durations]
        return d

    @classmethod
    def from_dict(cls, d: object) -> HagglundState:
        """Rebuild from :meth:`to_dict`; unknown or malformed content gives a fresh state."""
        st = cls()
        if not isinstance(d, Mapping) or d.get("version") != st.version:
            return st
        try:
            for f in _FLOAT_FIELDS:
                setattr(st, f, float(d.get(f, 0.0)))
            for f in ("seg_sign", "last_sig_sign", "loads_total"):
                setattr(st, f, int(d.get(f, 0)))
            st.seg_significant = bool(d.get("seg_significant", False))
            for f in _OPTIONAL_FIELDS:
                v = d.get(f)
                setattr(st, f, None if v is None else float(v))
            lm = d.get("last_mode")
            st.last_mode = None if lm is None else str(lm)
            st.durations = [float(v) for v in d.get("durations", [])]
        except (TypeError, ValueError):
            return cls()
        if not all(math.isfinite(getattr(st, f)) for f in _FLOAT_FIELDS):
            return cls()
        return st


_FLOAT_FIELDS = ("x", "seg_iae", "seg_dur", "seg_pre", "chatter")
_OPTIONAL_FIELDS = ("holdoff_until", "last_t", "last_sp", "noise_sigma", "last_iae")


def hagglund_update(
    e_pct: FloatArray,
    t: FloatArray,
    valid: BoolArray,
    norm: BoolArray,
    modes: Sequence[str],
    sp: FloatArray,
    state: HagglundState | None,
    *,
    ts: float,
    tu: float | None,
    holdoff_s: float | None,
    sp_delta: float,
    cfg: HagglundConfig | None = None,
    hold: float | None = None,
    horizon_s: float = math.nan,
) -> tuple[KpiResult, HagglundState]:
    """Run the detector over one window and return (alarm result, new state).

    A load is a half-cycle of e (between zero crossings) with IAE_i > IAE_lim = 2a/ω_u, ω_u = 2π/Tu
    (Tu ≈ Ti if unknown). Each sample x ← gamma·x + l; alarm when x > n_lim. Half-cycles that never leave
    the noise band ±h are chatter, not loads. State resets on a mode change and after gaps; detection
    is held off for ``holdoff_s`` (Ti) after an SP step so a set-point response is not taken for a load.
    Samples at or before the state's last time are skipped, so re-sending a window is harmless.
    """
    cfg = cfg or HagglundConfig()
    st = HagglundState.from_dict(state.to_dict()) if state is not None else HagglundState()
    n = e_pct.size
    cov = float(norm.sum()) / n if n else 0.0
    if tu is None or not (math.isfinite(tu) and tu > 0):
        return missing(Status.NOT_APPLICABLE, cov, "no_ti_or_tu_configured", horizon_s), st
    hold = 3.0 * ts if hold is None else hold
    omega_u = 2.0 * math.pi / tu
    iae_lim = 2.0 * cfg.load_amplitude_pct / omega_u
    gamma = max(0.0, 1.0 - ts / (cfg.tsup_factor * tu))

    if cfg.noise_sigma_pct is not None:
        st.noise_sigma = cfg.noise_sigma_pct
    else:
        en = e_pct[norm]
        if en.size >= 20:
            sig = noise_sigma(en)
            if math.isfinite(sig):
                st.noise_sigma = sig
    h = hysteresis(
        st.noise_sigma if st.noise_sigma is not None else math.nan, cfg.h_sigma_mult, cfg.h_min_pct
    )

    loads = 0
    processed = 0
    for k in range(n):
        tk = float(t[k])
        if st.last_t is not None:
            if tk <= st.last_t + 1e-9 * ts:
                continue
            gap = tk - st.last_t
            if gap > hold + 1e-9:
                st.reset_segment()
            steps = max(1, round(gap / ts))
            st.x *= gamma ** (steps - 1)
        st.last_t = tk
        processed += 1
        lk = 0
        mk = modes[k] if valid[k] else None
        if mk is not None:
            if st.last_mode is not None and mk != st.last_mode:
                st.x = 0.0
                st.reset_segment()
                st.holdoff_until = None
            st.last_mode = mk
        if not norm[k] or not math.isfinite(float(e_pct[k])):
            st.reset_segment()
            st.x *= gamma
            continue
        spk = float(sp[k])
        if st.last_sp is not None and abs(spk - st.last_sp) >= sp_delta and holdoff_s:
            st.holdoff_until = tk + holdoff_s
        st.last_sp = spk
        if st.holdoff_until is not None and tk < st.holdoff_until:
            st.reset_segment()
            st.x *= gamma
            continue
        ek = float(e_pct[k])
        s = 1 if ek > 0 else (-1 if ek < 0 else 0)
        if s != 0 and s != st.seg_sign:
            if st.seg_sign != 0:
                if st.seg_significant:
                    st.last_iae = st.seg_iae
                    if st.seg_iae > iae_lim:
                        lk = 1
                        st.durations.append(st.seg_dur + st.seg_pre)
                        del st.durations[: -cfg.max_durations]
                    st.last_sig_sign, st.chatter = st.seg_sign, 0.0
                else:
                    st.chatter += st.seg_dur
            # Chatter between two opposite significant half-cycles is where the crossing really was:
            # count it into the new half-cycle so that two half-cycles add up to a full period.
            st.seg_pre = st.chatter if st.last_sig_sign == -s else 0.0
            st.seg_sign, st.seg_iae, st.seg_dur, st.seg_significant = s, 0.0, 0.0, False
        st.seg_iae += abs(ek) * ts
        st.seg_dur += ts
        if abs(ek) > h:
            st.seg_significant = True
        st.x = gamma * st.x + lk
        loads += lk
    st.loads_total += loads

    n_valid, n_norm = int(valid.sum()), int(norm.sum())
    period = (
        2.0 * float(np.median(st.durations)) if len(st.durations) >= cfg.min_loads_for_period else math.nan
    )
    extras = {
        "x": st.x,
        "alarm": st.x > cfg.n_lim,
        "loads": loads,
        "iae_lim": iae_lim,
        "iae_last": st.last_iae,
        "h": h,
        "period_s": period,
        "tu_s": tu,
    }
    if n == 0 or processed == 0:
        return missing(Status.INSUFFICIENT_DATA, cov, "no_new_samples", horizon_s, extras), st
    if n_valid == 0:
        return missing(Status.INSUFFICIENT_DATA, cov, "no_valid_samples", horizon_s, extras), st
    if n_norm == 0:
        return missing(Status.NOT_IN_NORMAL_MODE, cov, "no_normal_mode_samples", horizon_s, extras), st
    return KpiResult(1.0 if st.x > cfg.n_lim else 0.0, Status.OK, cov, horizon_s, None, extras), st


# ------------------------------------------------------------------------------------------ ACF


@dataclass(frozen=True)
class AcfConfig:
    min_samples: int = 256
    min_periods: float = 6.0  # the horizon must hold this many periods
    max_crossings: int = 11  # zero crossings of the ACF used
    min_period_samples: int = 3  # gate: at least this many T_j
    min_period_ts: float = 10.0  # gate: T̂p ≥ min_period_ts·Ts
    min_acf_at_period: float = 0.3  # gate: rho(T̂p) ≥ this
    r_threshold: float = 1.0  # regular when r > this (Thornhill et al. 2003)
    r_cap: float = 1e6  # a noise-free sinusoid gives sigma_Tp = 0; cap r so it stays a finite number


@dataclass(frozen=True)
class AcfResult:
    status: Status
    reason: str | None
    flag: bool
    period_s: float
    r: float
    acf_at_period: float
    n_period_samples: int
    amplitude_pct: float
    n: int
    estimated_period_s: float = math.nan
    crossings_s: tuple[float, ...] = ()


def detrend(x: FloatArray) -> FloatArray:
    """Remove the least-squares straight line."""
    n = x.size
    if n < 2:
        return x - (x.mean() if n else 0.0)
    k = np.arange(n, dtype=float) - (n - 1) / 2.0
    slope = float(np.dot(k, x - x.mean()) / np.dot(k, k))
    return np.asarray(x - x.mean() - slope * k, dtype=float)


def acf(x: FloatArray, max_lag: int) -> FloatArray:
    """Biased ACF rho(0..max_lag) by FFT (x assumed zero-mean)."""
    n = x.size
    nfft = 1 << max(1, int(2 * n - 1).bit_length())
    f = np.fft.rfft(x, nfft)
    r = np.fft.irfft(f * np.conj(f), nfft)[: max_lag + 1]
    if r[0] <= 0:
        return np.zeros(max_lag + 1)
    return np.asarray(r / r[0], dtype=float)


def zero_crossings(rho: FloatArray, offset: float = 0.0) -> FloatArray:
    """Linearly interpolated zero crossings of a sampled curve (positions in samples + offset)."""
    if rho.size < 2:
        return np.zeros(0)
    a, b = rho[:-1], rho[1:]
    idx = np.flatnonzero(((a > 0) & (b <= 0)) | ((a < 0) & (b >= 0)))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = idx + a[idx] / (a[idx] - b[idx])
    return np.asarray(z + offset, dtype=float)


def acf_regularity(e_pct: FloatArray, ts: float, cfg: AcfConfig | None = None) -> AcfResult:
    """Thornhill et al. (2003) regularity test on one contiguous stretch of e%.

    Detrend, biased ACF up to N/2, first ``max_crossings`` zero crossings z_j, period samples
    T_j = z_{j+2} - z_j (full spans, robust to unequal half-cycles), T̂p = mean T_j, r = T̂p/(3sigma_Tp).
    Flag when r > 1 and the spec's gates pass. With fewer than ``min_periods`` periods in the data the
    status is insufficient_data.
    """
    cfg = cfg or AcfConfig()
    x = np.asarray(e_pct, dtype=float)
    n = x.size

    def res(status: Status, reason: str | None, **kw: Any) -> AcfResult:
        base: dict[str, Any] = {
            "flag": False,
            "period_s": math.nan,
            "r": math.nan,
            "acf_at_period": math.nan,
            "n_period_samples": 0,
            "amplitude_pct": math.nan,
            "n": n,
        }
        base.update(kw)
        return AcfResult(status, reason, **base)

    if n < max(cfg.min_samples, 8) or not np.isfinite(x).all():
        return res(Status.INSUFFICIENT_DATA, f"fewer_than_{cfg.min_samples}_samples")
    xd = detrend(x)
    amp = math.sqrt(2.0) * float(np.std(xd, ddof=1))
    if not np.any(xd) or float(np.var(xd)) <= 1e-30 * max(1.0, float(np.mean(x * x))):
        return res(Status.CONSTANT_SIGNAL, "constant_error")
    rho = acf(xd, n // 2)
    z = zero_crossings(rho)[: cfg.max_crossings]
    crossings_s = tuple(float(v) * ts for v in z)
    tj = z[2:] - z[:-2] if z.size >= 3 else np.zeros(0)

    if tj.size < cfg.min_period_samples:
        # Too few crossings within N/2 lags: either no oscillation, or one too slow for this horizon.
        est = 2.0 * float(z[1] - z[0]) if z.size >= 2 else (4.0 * float(z[0]) if z.size == 1 else math.inf)
        if est * cfg.min_periods > n:
            return res(
                Status.INSUFFICIENT_DATA,
                f"fewer_than_{cfg.min_periods:g}_periods_in_horizon",
                estimated_period_s=est * ts,
                crossings_s=crossings_s,
                amplitude_pct=amp,
            )
        return res(Status.OK, None, crossings_s=crossings_s, amplitude_pct=amp, n_period_samples=int(tj.size))

    tp = float(np.mean(tj))
    sd = float(np.std(tj, ddof=1)) if tj.size > 1 else 0.0
    r = min(tp / (3.0 * sd), cfg.r_cap) if sd > 0 else cfg.r_cap
    lag = tp
    if lag <= rho.size - 1:
        i = math.floor(lag)
        frac = lag - i
        rho_tp = float(rho[i] * (1 - frac) + rho[min(i + 1, rho.size - 1)] * frac)
    else:
        rho_tp = math.nan
    # The sufficiency check must not be fooled by noise chatter of rho near a crossing, which shortens
    # T̂p: when the test does not flag, also take twice the longest crossing interval as the period.
    gates = tp >= cfg.min_period_ts and math.isfinite(rho_tp) and rho_tp >= cfg.min_acf_at_period
    flag = bool(gates and r > cfg.r_threshold)
    span_est = tp if flag else max(tp, 2.0 * float(np.max(np.diff(z))))
    if span_est * cfg.min_periods > n:
        return res(
            Status.INSUFFICIENT_DATA,
            f"fewer_than_{cfg.min_periods:g}_periods_in_horizon",
            estimated_period_s=span_est * ts,
            r=r,
            crossings_s=crossings_s,
            amplitude_pct=amp,
            n_period_samples=int(tj.size),
        )
    return res(
        Status.OK,
        None,
        flag=flag,
        period_s=tp * ts,
        r=r,
        acf_at_period=rho_tp,
        n_period_samples=int(tj.size),
        amplitude_pct=amp,
        estimated_period_s=tp * ts,
        crossings_s=crossings_s,
    )

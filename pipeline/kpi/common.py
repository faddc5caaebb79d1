"""Shared pieces of the loop KPIs: results, statuses, the uniform grid, validity masks (docs/loop-kpis.md §0).

Conventions used by every KPI module:

* signals live on a uniform grid of period ``ts``; ``valid`` is true where PV, SP, OP and MODE are all
  good and finite, ``norm`` is ``valid`` and MODE in the loop's normal set;
* the control error is ``e = SP - PV``, reported in % of the PV span (``e%``);
* each KPI returns a :class:`KpiResult` with ``value``, ``status`` and ``coverage`` (a fraction 0..1 of the
  grid samples the KPI could use); ``value`` is NaN whenever the status says it cannot be trusted, except
  where the spec keeps means and IAE for a constant signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

TAGS = ("pv", "sp", "op", "mode")


class Status(StrEnum):
    OK = "ok"
    INSUFFICIENT_DATA = "insufficient_data"
    NOT_IN_NORMAL_MODE = "not_in_normal_mode"
    CONSTANT_SIGNAL = "constant_signal"
    NOT_APPLICABLE = "not_applicable"
    UNDETERMINED = "undetermined"


# ---------------------------------------------------------------------------------------------- JSON


def json_float(x: object) -> float | None:
    """A float for JSON: NaN and infinities become None (strict JSON has neither)."""
    if x is None:
        return None
    try:
        f = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def to_jsonable(obj: object) -> Any:
    """Recursively turn numpy scalars/arrays, tuples, enums and non-finite floats into plain JSON values."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, StrEnum):
        return str(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return json_float(obj)
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    return str(obj)


# -------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class KpiResult:
    """One KPI value with its status and the fraction of samples it rests on.

    ``horizon_s`` is the span of data the KPI looked at (W or H, spec §0: publish H alongside every value);
    ``reason`` says briefly why the status is not ``ok``; ``extras`` carries secondary numbers and flags.
    """

    value: float
    status: Status
    coverage: float
    horizon_s: float = math.nan
    reason: str | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": json_float(self.value),
            "status": str(self.status),
            "coverage": json_float(round(float(self.coverage), 6)),
            "horizon_s": json_float(self.horizon_s),
            "reason": self.reason,
            "extras": to_jsonable(dict(self.extras)),
        }


def missing(
    status: Status,
    coverage: float,
    reason: str,
    horizon_s: float = math.nan,
    extras: Mapping[str, Any] | None = None,
) -> KpiResult:
    """A result without a value."""
    return KpiResult(math.nan, status, coverage, horizon_s, reason, dict(extras or {}))


@dataclass(frozen=True)
class GateConfig:
    """Data-sufficiency defaults shared by the KPIs (spec §0, §2)."""

    min_coverage: float = 0.8  # valid fraction of the window below which a KPI is insufficient_data
    min_normal_fraction: float = 0.5  # normal-mode fraction below which error statistics are withheld
    constant_rel: float = 1e-6  # var(e) < (constant_rel * span)^2 -> constant_signal


DEFAULT_GATE = GateConfig()


def gate_valid(n_total: int, n_valid: int, gate: GateConfig) -> tuple[Status | None, float, str]:
    """Coverage gate for KPIs over all valid samples: returns (failing status or None, coverage, reason)."""
    cov = n_valid / n_total if n_total else 0.0
    if n_total == 0:
        return Status.INSUFFICIENT_DATA, 0.0, "empty_window"
    if n_valid == 0:
        return Status.INSUFFICIENT_DATA, 0.0, "no_valid_samples"
    if cov < gate.min_coverage:
        return Status.INSUFFICIENT_DATA, cov, f"valid_coverage_below_{gate.min_coverage:g}"
    return None, cov, ""


def gate_normal(
    n_total: int, n_valid: int, n_norm: int, gate: GateConfig
) -> tuple[Status | None, float, str]:
    """Gate for normal-mode KPIs: valid coverage, then any normal mode at all, then the normal fraction."""
    status, _cov, reason = gate_valid(n_total, n_valid, gate)
    cov = n_norm / n_total if n_total else 0.0
    if status is not None:
        return status, cov, reason
    if n_norm == 0:
        return Status.NOT_IN_NORMAL_MODE, 0.0, "no_normal_mode_samples"
    if cov < gate.min_normal_fraction:
        return Status.INSUFFICIENT_DATA, cov, f"normal_mode_fraction_below_{gate.min_normal_fraction:g}"
    return None, cov, ""


# ----------------------------------------------------------------------------------------------- grid


def _mode_present(mode: npt.NDArray[Any]) -> BoolArray:
    if mode.dtype.kind in "fc":
        return np.asarray(np.isfinite(mode), dtype=bool)
    if mode.dtype.kind in "iub":
        return np.ones(mode.shape, dtype=bool)
    out = np.empty(mode.shape, dtype=bool)
    for i, m in enumerate(mode.tolist()):
        out[i] = not (m is None or m == "" or (isinstance(m, float) and not math.isfinite(m)))
    return out


@dataclass(frozen=True, eq=False)
class LoopWindow:
    """Aligned samples of one loop on a uniform grid (spec §0).

    ``mode`` holds mode names (e.g. "AUTO", "MAN", "CAS") or integer codes; ``valid`` is the quality mask
    (it is and-ed with finiteness of PV/SP/OP and presence of MODE on construction). Arrays of unequal
    length are a programming error and raise ValueError; any data content is accepted.
    """

    t: FloatArray
    pv: FloatArray
    sp: FloatArray
    op: FloatArray
    mode: npt.NDArray[Any]
    valid: BoolArray
    ts: float
    stale_tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        t = np.asarray(self.t, dtype=float).reshape(-1)
        pv = np.asarray(self.pv, dtype=float).reshape(-1)
        sp = np.asarray(self.sp, dtype=float).reshape(-1)
        op = np.asarray(self.op, dtype=float).reshape(-1)
        mode = np.asarray(self.mode).reshape(-1)
        if mode.dtype.kind in "US":
            mode = mode.astype(object)
        valid = np.asarray(self.valid, dtype=bool).reshape(-1)
        n = t.size
        if any(a.size != n for a in (pv, sp, op, mode, valid)):
            raise ValueError("LoopWindow arrays must all have the same length")
        if not (math.isfinite(self.ts) and self.ts > 0):
            raise ValueError("LoopWindow.ts must be a positive number of seconds")
        valid = valid & np.isfinite(pv) & np.isfinite(sp) & np.isfinite(op) & np.isfinite(t)
        valid &= _mode_present(mode)
        for name, arr in (("t", t), ("pv", pv), ("sp", sp), ("op", op), ("mode", mode), ("valid", valid)):
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "ts", float(self.ts))

    @property
    def n(self) -> int:
        return int(self.t.size)

    @property
    def duration_s(self) -> float:
        return self.n * self.ts

    @classmethod
    def empty(cls, ts: float) -> LoopWindow:
        z = np.zeros(0)
        return cls(z, z, z, z, np.zeros(0, dtype=object), np.zeros(0, dtype=bool), ts)

    @classmethod
    def from_arrays(
        cls,
        pv: npt.ArrayLike,
        sp: npt.ArrayLike,
        op: npt.ArrayLike,
        mode: npt.ArrayLike | str = "AUTO",
        *,
        ts: float = 1.0,
        t0: float = 0.0,
        valid: npt.ArrayLike | None = None,
    ) -> LoopWindow:
        """Convenience constructor; scalars broadcast to the length of ``pv``."""
        pv_a = np.asarray(pv, dtype=float).reshape(-1)
        n = pv_a.size
        sp_a = np.broadcast_to(np.asarray(sp, dtype=float), (n,)).copy()
        op_a = np.broadcast_to(np.asarray(op, dtype=float), (n,)).copy()
        if isinstance(mode, str):
            mode_a: npt.NDArray[Any] = np.full(n, mode, dtype=object)
        else:
            mode_a = np.asarray(mode)
            if mode_a.ndim == 0:
                mode_a = np.full(n, mode_a.item(), dtype=object)
        valid_a = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        t = t0 + ts * np.arange(n, dtype=float)
        return cls(t, pv_a, sp_a, op_a, mode_a, valid_a, ts)

    def slice(self, start: int, stop: int) -> LoopWindow:
        s = slice(start, stop)
        return LoopWindow(
            self.t[s],
            self.pv[s],
            self.sp[s],
            self.op[s],
            self.mode[s],
            self.valid[s],
            self.ts,
            self.stale_tags,
        )

    def tail_seconds(self, seconds: float) -> LoopWindow:
        """The last ``seconds`` of the window (for trimming a ring buffer H)."""
        if self.n == 0:
            return self
        keep = self.t > self.t[-1] - seconds + 1e-9 * self.ts
        start = int(np.argmax(keep)) if keep.any() else self.n
        return self.slice(start, self.n)

    def concat(self, other: LoopWindow) -> LoopWindow:
        """Append ``other`` (same ts), dropping its samples at or before this window's last time."""
        if self.n == 0:
            return other
        keep = other.t > self.t[-1] + 1e-9 * self.ts
        mode = np.concatenate([self.mode.astype(object), other.mode[keep].astype(object)])
        return LoopWindow(
            np.concatenate([self.t, other.t[keep]]),
            np.concatenate([self.pv, other.pv[keep]]),
            np.concatenate([self.sp, other.sp[keep]]),
            np.concatenate([self.op, other.op[keep]]),
            mode,
            np.concatenate([self.valid, other.valid[keep]]),
            self.ts,
            tuple(sorted(set(self.stale_tags) | set(other.stale_tags))),
        )


def normal_mask(window: LoopWindow, normal_modes: Iterable[str | int]) -> BoolArray:
    """norm_k: valid and MODE in the normal set. Names compare case-insensitively, codes exactly."""
    modes = list(normal_modes)
    mode = window.mode
    if mode.size == 0:
        return np.zeros(0, dtype=bool)
    if mode.dtype.kind in "iuf":
        codes = [float(m) for m in modes if isinstance(m, int | float) and not isinstance(m, bool)]
        inset = np.isin(mode.astype(float), codes)
    else:
        names = {str(m).strip().upper() for m in modes}
        as_str = np.array([str(m).strip().upper() for m in mode.tolist()], dtype=object)
        uniq, inv = np.unique(as_str, return_inverse=True)
        inset = np.array([u in names for u in uniq.tolist()], dtype=bool)[inv]
    return np.asarray(window.valid & inset, dtype=bool)


def mode_labels(mode: npt.NDArray[Any]) -> list[str]:
    """Mode values as normalised strings (for change detection)."""
    return [str(m).strip().upper() for m in mode.tolist()]


def error_pct(sp: FloatArray, pv: FloatArray, span: float, normalise: str = "span") -> FloatArray:
    """e% = 100·(SP - PV)/span (spec §0). ``normalise="sp"`` divides by |SP| instead (unsafe near SP = 0)."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow gives inf, masked out by the callers
        e = sp - pv
    if normalise == "sp":
        with np.errstate(divide="ignore", invalid="ignore"):
            out = 100.0 * e / np.abs(sp)
        return np.where(np.isfinite(out), out, np.nan)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(100.0 * e / span, dtype=float)


def is_constant(e: FloatArray, span: float, gate: GateConfig) -> bool:
    """var(e) < (constant_rel·span)² on the engineering-unit error (spec §0)."""
    if e.size < 2:
        return True
    return bool(np.var(e) < (gate.constant_rel * span) ** 2)


def runs(mask: BoolArray) -> list[tuple[int, int]]:
    """[start, stop) index pairs of the runs of True in ``mask``."""
    if mask.size == 0:
        return []
    m = np.concatenate([[False], mask.astype(bool), [False]])
    d = np.flatnonzero(np.diff(m.astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(d[0::2], d[1::2], strict=True)]


def longest_run(mask: BoolArray) -> tuple[int, int]:
    """The longest run of True (the latest one on ties); (0, 0) if there is none."""
    best = (0, 0)
    for a, b in runs(mask):
        if b - a >= best[1] - best[0]:
            best = (a, b)
    return best


def robust_sigma(x: FloatArray) -> float:
    """Normal-consistent MAD scale."""
    if x.size == 0:
        return math.nan
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def noise_sigma(x: FloatArray) -> float:
    """White-noise sigma from the MAD of second differences (var(Δ²w) = 6·sigma²), blind to slow signal."""
    x = x[np.isfinite(x)]
    if x.size < 5:
        return math.nan
    return robust_sigma(np.diff(x, n=2)) / math.sqrt(6.0)


def sp_step_threshold(sp: FloatArray, valid: BoolArray, span: float, frac: float, noise_mult: float) -> float:
    """δsp = max(frac·span, noise_mult·sigma_SP) (spec §7); sigma_SP from the MAD of SP increments."""
    d = np.diff(sp)
    ok = valid[1:] & valid[:-1] & np.isfinite(d) if sp.size > 1 else np.zeros(0, dtype=bool)
    sig = robust_sigma(d[ok]) / math.sqrt(2.0) if ok.any() else 0.0
    return max(frac * span, noise_mult * (sig if math.isfinite(sig) else 0.0))


def sp_step_indices(sp: FloatArray, valid: BoolArray, delta: float) -> IntArray:
    """Indices k where |SP_k - SP_{k-1}| ≥ δsp between two valid samples."""
    if sp.size < 2:
        return np.zeros(0, dtype=np.int64)
    d = np.abs(np.diff(sp))
    ok = valid[1:] & valid[:-1] & np.isfinite(d) & (d >= delta)
    return np.asarray(np.flatnonzero(ok) + 1, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- align

Sample = tuple[float, Any, Any]


def quality_is_good(q: object) -> bool:
    """Default quality test: "good" (any case), True, None (no quality given) or an OPC UA Good code."""
    if q is None:
        return True
    if isinstance(q, bool | np.bool_):
        return bool(q)
    if isinstance(q, int | np.integer):
        # OPC UA StatusCode: the top two bits are the severity, 00 = Good.
        return (int(q) & 0xC0000000) == 0
    if isinstance(q, str):
        return q.strip().lower() == "good"
    return False


def _hold_lookup(tt: FloatArray, grid: FloatArray, hold: float) -> tuple[IntArray, BoolArray]:
    idx = np.searchsorted(tt, grid, side="right").astype(np.int64) - 1
    has = idx >= 0
    age = np.where(has, grid - tt[np.clip(idx, 0, None)] if tt.size else np.inf, np.inf)
    fresh = has & (age <= hold + 1e-9)
    return idx, np.asarray(fresh, dtype=bool)


def align(
    samples: Mapping[str, Iterable[Sample]],
    t0: float,
    t1: float,
    ts: float,
    hold: float | None = None,
    *,
    is_good: Callable[[object], bool] = quality_is_good,
    stale_factor: float = 3.0,
) -> LoopWindow:
    """Resample irregular ``(t, value, quality)`` samples of tags pv, sp, op, mode onto the grid
    t0, t0+ts, … < t1 with last-value hold of at most ``hold`` (default 3·ts, spec §0).

    A grid point takes the latest sample at or before it; it is invalid when that sample is older than
    ``hold``, has bad quality, or is not a finite number (MODE: missing). Samples may arrive unsorted; pass
    the last sample before t0 too so the hold covers the window start. A missing tag makes every point
    invalid. PV and OP whose values change less often than every ``stale_factor``·ts are listed in
    ``stale_tags`` (historian compression suspicion, spec §0).
    """
    if not (math.isfinite(ts) and ts > 0):
        raise ValueError("ts must be a positive number of seconds")
    hold = 3.0 * ts if hold is None else float(hold)
    n = max(0, math.floor((t1 - t0) / ts + 1e-9)) if math.isfinite(t1 - t0) else 0
    grid = t0 + ts * np.arange(n, dtype=float)
    valid = np.ones(n, dtype=bool)
    cols: dict[str, npt.NDArray[Any]] = {}
    stale: list[str] = []
    for tag in TAGS:
        rows = [r for r in samples.get(tag, ()) if _finite_time(r)]
        rows.sort(key=lambda r: float(r[0]))  # stable: the later of equal timestamps wins below
        tt = np.array([float(r[0]) for r in rows], dtype=float)
        good = np.array([bool(is_good(r[2])) for r in rows], dtype=bool)
        if tag == "mode":
            vals: npt.NDArray[Any] = np.array([r[1] for r in rows] + [None], dtype=object)[:-1]
            present = _mode_present(vals) if vals.size else np.zeros(0, dtype=bool)
            good &= present
        else:
            vals = np.array([_to_float(r[1]) for r in rows], dtype=float)
            good &= np.isfinite(vals)
        idx, fresh = _hold_lookup(tt, grid, hold)
        ok = fresh & (good[np.clip(idx, 0, None)] if tt.size else np.zeros(n, dtype=bool))
        valid &= ok
        if tag == "mode":
            col = np.full(n, None, dtype=object)
            if tt.size:
                col[ok] = vals[idx[ok]]
        else:
            col = np.full(n, np.nan)
            if tt.size:
                col[ok] = vals[idx[ok]]
            if tag in ("pv", "op") and n >= 10 and _is_stale(tt, vals, t0, t1, ts * stale_factor):
                stale.append(tag)
        cols[tag] = col
    return LoopWindow(grid, cols["pv"], cols["sp"], cols["op"], cols["mode"], valid, ts, tuple(stale))


def _finite_time(r: Sample) -> bool:
    try:
        return math.isfinite(float(r[0]))
    except (TypeError, ValueError, IndexError):
        return False


def _to_float(v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _is_stale(tt: FloatArray, vals: FloatArray, t0: float, t1: float, max_interval: float) -> bool:
    inside = (tt >= t0) & (tt < t1)
    v = vals[inside]
    if v.size == 0:
        return False
    changes = int(np.count_nonzero(np.diff(v) != 0))
    return (t1 - t0) / max(changes, 1) > max_interval

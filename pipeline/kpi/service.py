"""Service factor and OP saturation (docs/loop-kpis.md §1).

Service factor = time in normal (design) mode over valid time (Desborough & Miller 2002, AIChE Symp. Ser.
98; Paulonis & Cox 2003, JPC 13:155). Saturation = share of valid time with OP within δs of a limit; a
normal-mode-only value is reported too because in MAN a limit is the operator's choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
)


@dataclass(frozen=True)
class ServiceConfig:
    sat_delta_pct: float = 0.5  # δs in % of the OP range: OP ≥ OP_hi - δs counts as saturated high


def service_factor(
    valid: BoolArray, norm: BoolArray, gate: GateConfig = DEFAULT_GATE, horizon_s: float = math.nan
) -> KpiResult:
    """SF = 100·Σnorm/Σvalid (%)."""
    n, n_valid, n_norm = valid.size, int(valid.sum()), int(norm.sum())
    status, cov, reason = gate_valid(n, n_valid, gate)
    if status is not None:
        return missing(status, cov, reason, horizon_s)
    return KpiResult(100.0 * n_norm / n_valid, Status.OK, cov, horizon_s, extras={"n_valid": n_valid})


def saturation(
    op: FloatArray,
    valid: BoolArray,
    norm: BoolArray,
    op_lo: float = 0.0,
    op_hi: float = 100.0,
    cfg: ServiceConfig | None = None,
    gate: GateConfig = DEFAULT_GATE,
    horizon_s: float = math.nan,
) -> dict[str, KpiResult]:
    """Sat_hi / Sat_lo in % of valid samples, plus the same over normal-mode samples only."""
    cfg = cfg or ServiceConfig()
    delta = cfg.sat_delta_pct / 100.0 * (op_hi - op_lo)
    with np.errstate(invalid="ignore"):
        hi = valid & (op >= op_hi - delta)
        lo = valid & (op <= op_lo + delta)
    n, n_valid, n_norm = valid.size, int(valid.sum()), int(norm.sum())
    out: dict[str, KpiResult] = {}
    extras = {"delta": delta, "op_lo": op_lo, "op_hi": op_hi}

    status, cov, reason = gate_valid(n, n_valid, gate)
    for key, m in (("sat_hi", hi), ("sat_lo", lo)):
        if status is not None:
            out[key] = missing(status, cov, reason, horizon_s, extras)
        else:
            out[key] = KpiResult(100.0 * int(m.sum()) / n_valid, Status.OK, cov, horizon_s, extras=extras)

    status_n, cov_n, reason_n = gate_normal(n, n_valid, n_norm, gate)
    for key, m in (("sat_hi_normal", hi & norm), ("sat_lo_normal", lo & norm)):
        if status_n is not None:
            out[key] = missing(status_n, cov_n, reason_n, horizon_s, extras)
        else:
            out[key] = KpiResult(100.0 * int(m.sum()) / n_norm, Status.OK, cov_n, horizon_s, extras=extras)
    return out

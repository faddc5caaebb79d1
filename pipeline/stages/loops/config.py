"""Configuration of control loops (the topology's ``loops`` section), validated with path and fix."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from pipeline.core.durations import DurationMs
from pipeline.core.topology import Model

LOOP_TAGS = ("pv", "sp", "op", "mode")
# Samples a loop's analysis horizon may hold: its state record (float32 arrays, base64) stays under ~300 kB.
MAX_HORIZON_SAMPLES = 16_384
DEFAULT_HORIZON_SAMPLES = 4_096  # enough for every KPI, bicoherence included (docs/loop-kpis.md §0)
THRESHOLD_GROUPS = ("gate", "service", "hagglund", "acf", "harris", "stiction", "valve", "step")


def fmt_ms(ms: int) -> str:
    """A duration in the units a topology uses: 1h, 15m, 90s, 250ms."""
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms / 1000:g}s" if ms >= 1000 else f"{ms}ms"


def _series_id(v: str) -> str:
    if v != v.strip() or not re.fullmatch(r"[^/]+/[^/]+/.+", v):
        raise ValueError("expected a series id site/device/point, e.g. plant1/tic101/pv")
    return v


SeriesId = Annotated[
    str,
    AfterValidator(_series_id),
    WithJsonSchema(
        {"type": "string", "pattern": "^[^/]+/[^/]+/.+$", "description": "series id site/device/point"}
    ),
]


def _expected(hint: Any, v: Any) -> str | None:
    """What a KPI parameter of type ``hint`` needs, or None when ``v`` fits."""
    import math
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if v is None and type(None) in args:
            return None
        wants = [_expected(a, v) for a in args if a is not type(None)]
        return (
            None
            if None in wants
            else " or ".join(w for w in wants if w) + (" or null" if type(None) in args else "")
        )
    if origin is Literal:
        return None if v in args else "one of " + ", ".join(map(str, args))
    if hint is bool:
        return None if isinstance(v, bool) else "true or false"
    if hint is int:
        return None if isinstance(v, int) and not isinstance(v, bool) else "a whole number"
    if hint is float:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        return None if ok else "a number"
    if hint is str:
        return None if isinstance(v, str) else "a string"
    if origin in (frozenset, set, list, tuple):
        return None if isinstance(v, list) and all(isinstance(x, str | int) for x in v) else "a list"
    return None


def _threshold_group(group: str, params: dict[str, Any]) -> None:
    """Check one group of KPI parameters against its configuration class in pipeline.kpi."""
    import dataclasses
    import typing

    from pipeline.kpi import LoopConfig  # numpy: imported only for topologies with loops

    cls = typing.get_type_hints(LoopConfig)[group]
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    problems = []
    for k, v in params.items():
        if k not in hints:
            problems.append(f"unknown parameter {k!r}; allowed: {', '.join(names)}")
            continue
        want = _expected(hints[k], v)
        if want:
            problems.append(f"{k}: expected {want} (found {v!r})")
    if not problems:
        try:
            LoopConfig.from_mapping({group: params})
        except (TypeError, ValueError) as e:
            problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))


class LoopThresholds(Model):
    """KPI parameters passed as they are to ``pipeline.kpi.LoopConfig`` (listed in pipeline/kpi/README.md)."""

    gate: dict[str, Any] = Field(
        default_factory=dict, description="min_coverage, min_normal_fraction, constant_rel"
    )
    service: dict[str, Any] = Field(default_factory=dict, description="sat_delta_pct")
    hagglund: dict[str, Any] = Field(
        default_factory=dict, description="load_amplitude_pct, tsup_factor, n_lim, …"
    )
    acf: dict[str, Any] = Field(default_factory=dict, description="min_samples, min_periods, r_threshold, …")
    harris: dict[str, Any] = Field(
        default_factory=dict, description="order, min_samples, eta_ok, eta_poor, …"
    )
    stiction: dict[str, Any] = Field(default_factory=dict, description="dphi_stiction, area_stiction, …")
    valve: dict[str, Any] = Field(default_factory=dict, description="deadband_pct, init_samples")
    step: dict[str, Any] = Field(default_factory=dict, description="delta_frac, band, step_modes, …")

    @field_validator(*THRESHOLD_GROUPS)
    @classmethod
    def _group(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if v:
            _threshold_group(str(info.field_name), v)
        return v


class LoopHold(Model):
    """Longest hold of a tag's last value on the loop's grid (default 3·ts)."""

    pv: DurationMs | None = None
    sp: DurationMs | None = None
    op: DurationMs | None = None
    mode: DurationMs | None = None

    @field_validator("pv", "sp", "op", "mode")
    @classmethod
    def _range(cls, v: int | None) -> int | None:
        if v is not None and not 0 < v <= 86_400_000:
            raise ValueError("must be between 1ms and 24h")
        return v

    def items(self) -> dict[str, int]:
        return {t: v for t in LOOP_TAGS if (v := getattr(self, t)) is not None}


class Loop(Model):
    """One PI(D) control loop whose KPIs are computed per event-time window (docs/loop-kpis.md)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="loop id, the key of loops.kpi and kpi_results")
    pv: SeriesId
    sp: SeriesId
    op: SeriesId
    mode: SeriesId | None = Field(
        None,
        description="controller mode series (numeric codes, see mode_codes); "
        "without it the loop counts as always in normal mode",
    )
    mode_codes: dict[str, int] = Field(
        default_factory=lambda: {"MAN": 0, "AUTO": 1, "CAS": 2},
        description="mode name -> the number the MODE series carries",
    )
    normal_modes: list[str] = Field(
        default_factory=lambda: ["AUTO", "CAS"],
        min_length=1,
        description="modes in which the loop is controlling as designed",
    )
    pv_lo: float = Field(allow_inf_nan=False, description="PV range low end (engineering units)")
    pv_hi: float = Field(
        allow_inf_nan=False, description="PV range high end; errors are in % of pv_hi - pv_lo"
    )
    op_lo: float = Field(0.0, allow_inf_nan=False, description="OP low limit")
    op_hi: float = Field(100.0, allow_inf_nan=False, validate_default=True, description="OP high limit")
    loop_type: Literal["self_regulating", "integrating"] = "self_regulating"
    ti: DurationMs = Field(description="integral time of the controller")
    tu: DurationMs | None = Field(None, description="ultimate period if known (else Tu = Ti is assumed)")
    dead_time: DurationMs | None = Field(None, description="process dead time (optional; Harris index)")
    ts: DurationMs = Field(description="sample period of the loop's grid")
    window: DurationMs = Field(
        "15m", validate_default=True, description="KPI reporting window (tumbling, event time)"
    )
    horizon: DurationMs | None = Field(
        None,
        description="analysis horizon for the statistical KPIs "
        "(default: the longer of window and 4096 samples)",
    )
    grace: DurationMs = Field(
        10_000, description="how far behind the loop's newest sample a sample may arrive"
    )
    idle_timeout: DurationMs = Field(
        "60s",
        validate_default=True,
        description="wall-clock quiet time after which the loop's open windows "
        "are closed with what they have",
    )
    hold: LoopHold = Field(
        LoopHold(),
        description="how long a tag's last value may be held on the grid, where "
        "longer than the default 3·ts: SP and MODE are often reported on change only",
    )
    error_norm: Literal["span", "sp"] = "span"
    thresholds: LoopThresholds = LoopThresholds()

    @field_validator("mode_codes")
    @classmethod
    def _codes(cls, v: dict[str, int]) -> dict[str, int]:
        if not v:
            raise ValueError("needs at least one mode, e.g. {MAN: 0, AUTO: 1}")
        seen: dict[int, str] = {}
        for name, code in v.items():
            if code in seen:
                raise ValueError(
                    f"modes {seen[code]} and {name} have the same code {code}; give each its own"
                )
            seen[code] = name
        return v

    @field_validator("normal_modes")
    @classmethod
    def _normal(cls, v: list[str], info: ValidationInfo) -> list[str]:
        codes = info.data.get("mode_codes")
        if codes is not None:
            for m in v:
                if m not in codes:
                    raise ValueError(
                        f"normal mode {m!r} is not in mode_codes ({', '.join(codes)}); "
                        "add it there or fix the name"
                    )
        return v

    @field_validator("pv_hi")
    @classmethod
    def _span(cls, v: float, info: ValidationInfo) -> float:
        lo = info.data.get("pv_lo")
        if lo is not None and not v > lo:
            raise ValueError(f"must be greater than pv_lo ({lo:g}): the PV span is pv_hi - pv_lo")
        return v

    @field_validator("op_hi")
    @classmethod
    def _op_span(cls, v: float, info: ValidationInfo) -> float:
        lo = info.data.get("op_lo")
        if lo is not None and not v > lo:
            raise ValueError(f"must be greater than op_lo ({lo:g})")
        return v

    @field_validator("ti", "tu")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and not 0 < v <= 86_400_000:
            raise ValueError("must be between 1ms and 24h")
        return v

    @field_validator("dead_time")
    @classmethod
    def _dead(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= 86_400_000:
            raise ValueError("must be between 0s and 24h")
        return v

    @field_validator("ts")
    @classmethod
    def _ts(cls, v: int) -> int:
        if not 10 <= v <= 3_600_000:
            raise ValueError("must be between 10ms and 1h")
        return v

    @field_validator("window")
    @classmethod
    def _window(cls, v: int, info: ValidationInfo) -> int:
        ts = info.data.get("ts")
        if not 1000 <= v <= 86_400_000:
            raise ValueError("must be between 1s and 24h")
        if ts is not None:
            if v % ts:
                raise ValueError(f"must be a whole number of samples: a multiple of ts ({fmt_ms(ts)})")
            if v < 10 * ts:
                raise ValueError(f"holds {v // ts} samples; make it at least 10·ts ({fmt_ms(10 * ts)})")
            if v > MAX_HORIZON_SAMPLES * ts:
                raise ValueError(
                    f"holds {v // ts} samples, more than the {MAX_HORIZON_SAMPLES} a loop's state "
                    f"keeps; shorten it or lengthen ts"
                )
        return v

    @field_validator("horizon")
    @classmethod
    def _horizon(cls, v: int | None, info: ValidationInfo) -> int | None:
        ts, window = info.data.get("ts"), info.data.get("window")
        if v is None:
            return v
        if window is not None and v < window:
            raise ValueError(f"must be at least the window ({fmt_ms(window)})")
        if ts is not None and v // ts > MAX_HORIZON_SAMPLES:
            raise ValueError(
                f"holds {v // ts} samples, more than the {MAX_HORIZON_SAMPLES} a loop's state keeps; "
                f"make it at most {fmt_ms(MAX_HORIZON_SAMPLES * ts)} or lengthen ts"
            )
        return v

    @field_validator("grace")
    @classmethod
    def _grace(cls, v: int) -> int:
        if not 0 <= v <= 3_600_000:
            raise ValueError("must be between 0s and 1h")
        return v

    @field_validator("idle_timeout")
    @classmethod
    def _idle(cls, v: int, info: ValidationInfo) -> int:
        ts = info.data.get("ts")
        if not 1_000 <= v <= 86_400_000:
            raise ValueError("must be between 1s and 24h")
        if ts is not None and v <= 2 * ts:
            raise ValueError(
                f"must be longer than two samples (2·ts = {fmt_ms(2 * ts)}), or windows of a live "
                "loop would close between its samples"
            )
        return v

    @field_validator("hold")
    @classmethod
    def _hold(cls, v: LoopHold, info: ValidationInfo) -> LoopHold:
        ts = info.data.get("ts")
        for tag, ms in v.items().items():
            if ts is not None and ms < ts:
                raise ValueError(
                    f"{tag}: {fmt_ms(ms)} is shorter than one sample (ts = {fmt_ms(ts)}); the default "
                    "is 3·ts, set only longer holds"
                )
        return v

    @model_validator(mode="after")
    def _distinct(self) -> Loop:
        tags = [(t, getattr(self, t)) for t in LOOP_TAGS if getattr(self, t) is not None]
        for i, (a, sa) in enumerate(tags):
            for b, sb in tags[i + 1 :]:
                if sa == sb:
                    raise ValueError(f"{a} and {b} are the same series {sa!r}; each tag needs its own series")
        return self

    @property
    def horizon_ms(self) -> int:
        """The analysis horizon: as configured, else the longer of the window and 4096 samples."""
        if self.horizon is not None:
            return self.horizon
        return max(self.window, min(DEFAULT_HORIZON_SAMPLES * self.ts, MAX_HORIZON_SAMPLES * self.ts))

    def series(self) -> dict[str, str]:
        """tag -> series id, for the tags the loop has."""
        return {t: s for t in LOOP_TAGS if (s := getattr(self, t)) is not None}

    def kpi_config(self) -> Any:
        """The loop's ``pipeline.kpi.LoopConfig`` (imported here: it needs numpy)."""
        from pipeline.kpi import LoopConfig

        data: dict[str, Any] = {
            "pv_lo": self.pv_lo,
            "pv_hi": self.pv_hi,
            "op_lo": self.op_lo,
            "op_hi": self.op_hi,
            "normal_modes": list(self.normal_modes),
            "loop_type": self.loop_type,
            "ti": self.ti / 1000,
            "tu": None if self.tu is None else self.tu / 1000,
            "dead_time": None if self.dead_time is None else self.dead_time / 1000,
            "ts": self.ts / 1000,
            "error_norm": self.error_norm,
        }
        for g in THRESHOLD_GROUPS:
            params = getattr(self.thresholds, g)
            if params:
                data[g] = params
        return LoopConfig.from_mapping(data)

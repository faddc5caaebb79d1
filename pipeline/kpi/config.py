"""Per-loop configuration: loop facts plus every tunable default of the KPIs (docs/loop-kpis.md §0)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .common import GateConfig
from .harris import HarrisConfig
from .oscillation import AcfConfig, HagglundConfig
from .service import ServiceConfig
from .step import StepConfig
from .stiction import StictionConfig
from .valve import ValveConfig

LoopType = Literal["self_regulating", "integrating"]


@dataclass(frozen=True)
class LoopConfig:
    """What the KPIs need to know about one loop.

    ``ti`` (s) is the integral time of the PI(D); ``tu`` (s) the ultimate period if known (Hägglund falls
    back to Tu ≈ Ti); ``dead_time`` (s) the process dead time θ, optional (Harris then uses an estimate
    from SP steps or ``harris.assumed_dead_time_s`` and flags deadtime_assumed).
    """

    pv_lo: float = 0.0
    pv_hi: float = 100.0
    op_lo: float = 0.0
    op_hi: float = 100.0
    normal_modes: frozenset[str | int] = frozenset({"AUTO", "CAS"})
    loop_type: LoopType = "self_regulating"
    ti: float | None = None
    tu: float | None = None
    dead_time: float | None = None
    ts: float = 1.0  # nominal sample period; the window's own ts is used for computation
    error_norm: Literal["span", "sp"] = "span"
    gate: GateConfig = field(default_factory=GateConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    hagglund: HagglundConfig = field(default_factory=HagglundConfig)
    acf: AcfConfig = field(default_factory=AcfConfig)
    harris: HarrisConfig = field(default_factory=HarrisConfig)
    stiction: StictionConfig = field(default_factory=StictionConfig)
    valve: ValveConfig = field(default_factory=ValveConfig)
    step: StepConfig = field(default_factory=StepConfig)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.pv_hi - self.pv_lo) and self.pv_hi > self.pv_lo):
            raise ValueError("pv_hi must be greater than pv_lo")
        if not (math.isfinite(self.op_hi - self.op_lo) and self.op_hi > self.op_lo):
            raise ValueError("op_hi must be greater than op_lo")
        if self.loop_type not in ("self_regulating", "integrating"):
            raise ValueError("loop_type must be 'self_regulating' or 'integrating'")
        object.__setattr__(self, "normal_modes", frozenset(self.normal_modes))

    @property
    def span(self) -> float:
        return self.pv_hi - self.pv_lo

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> LoopConfig:
        """Build from plain data (e.g. YAML): nested mappings for the sub-configurations, lists for sets."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            sub = _SUBCONFIGS.get(f.name)
            if sub is not None and isinstance(v, Mapping):
                v = _build(sub, v)
            elif f.name == "normal_modes":
                v = frozenset(v)
            kwargs[f.name] = v
        return cls(**kwargs)


def _build(cls: type[Any], d: Mapping[str, Any]) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in d.items():
        if k not in names:
            raise ValueError(f"unknown {cls.__name__} parameter {k!r}")
        kw[k] = frozenset(v) if isinstance(v, list | tuple | set) and k.endswith("modes") else v
    return cls(**kw)


_SUBCONFIGS: dict[str, type[Any]] = {
    "gate": GateConfig,
    "service": ServiceConfig,
    "hagglund": HagglundConfig,
    "acf": AcfConfig,
    "harris": HarrisConfig,
    "stiction": StictionConfig,
    "valve": ValveConfig,
    "step": StepConfig,
}

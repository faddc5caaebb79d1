"""Topology files (YAML, format v1): loading, ``${VAR}`` expansion, environment overrides, validation.

Validation is done by pydantic models when the file is loaded, and every problem is reported with its
YAML path, the value found and what is allowed, all at once rather than one per run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from connectors.bacnet.config import BacnetSource
from connectors.opcua.config import OpcUaSource
from pipeline.durations import DurationMs

TEMPLATE_FIELDS = ("site", "device", "point")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class TopologyError(Exception):
    """A topology that cannot be used; ``problems`` holds one line per mistake, each naming its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Broker(_Model):
    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    partitions: int = Field(4, ge=1, le=1024, description="partitions of telemetry.raw (and its state)")
    replication: int = Field(1, ge=1, le=16)
    # Size, not time: record timestamps are event times, and time retention would delete a backfill at once.
    raw_retention_bytes: int = Field(
        8 << 30, ge=-1, description="bytes kept per partition of telemetry.raw and loops.samples (-1: all)"
    )
    agg_retention_bytes: int = Field(
        1 << 30, ge=-1, description="bytes kept per partition of telemetry.agg.1m and loops.kpi (-1: all)"
    )


class TopicMapping(_Model):
    filter: str = Field(description="MQTT topic filter, e.g. plant/+/+/+ or heatpump/#")
    template: str = Field(description="topic levels to site/device/point, e.g. plant/{site}/{device}/{point}")
    site: str | None = Field(None, description="fixed site where the topic does not carry it")
    device: str | None = Field(None, description="fixed device where the topic does not carry it")
    point: str | None = Field(None, description="fixed point where the topic does not carry it")
    unit: str | None = None

    @field_validator("template")
    @classmethod
    def _known_fields(cls, v: str) -> str:
        for name in re.findall(r"\{([^}]*)\}", v):
            if name not in TEMPLATE_FIELDS:
                raise ValueError(
                    f"unknown field {{{name}}}; allowed: " + ", ".join(f"{{{f}}}" for f in TEMPLATE_FIELDS)
                )
        return v

    @model_validator(mode="after")
    def _complete(self) -> TopicMapping:
        named = set(re.findall(r"\{([^}]*)\}", self.template))
        for f in ("site", "device"):
            if f not in named and getattr(self, f) is None:
                raise ValueError(
                    f"the template does not name {{{f}}}: add it to the template or set a fixed '{f}:'"
                )
        if "point" in named and self.point is not None:
            raise ValueError("'point' is set both in the template and as a fixed value; keep one")
        return self

    @property
    def names_point(self) -> bool:
        return "{point}" in self.template or self.point is not None


class BatchSettings(_Model):
    max_readings: int = Field(500, ge=1, le=100_000)
    max_delay: DurationMs = Field(200, description="flush a device's batch after at most this long")

    @field_validator("max_delay")
    @classmethod
    def _bounded(cls, v: int) -> int:
        if not 1 <= v <= 200:
            raise ValueError("max_delay must be between 1ms and 200ms")
        return v


class MqttSource(_Model):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["mqtt"]
    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:port")
    client_id: str | None = Field(None, description="persistent-session client id (default plantstream-<id>)")
    qos: Literal[0, 1] = 1
    topics: list[TopicMapping] = Field(min_length=1)
    batch: BatchSettings = BatchSettings()
    max_inflight: int = Field(10_000, ge=1, description="unacknowledged MQTT messages at most")
    username: str | None = None
    password: str | None = Field(None, repr=False)

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, v: str) -> str:
        if not re.match(r"^mqtts?://[^/:]+(:\d+)?/?$", v):
            raise ValueError("expected mqtt://host:port")
        return v


Source = Annotated[MqttSource | OpcUaSource | BacnetSource, Field(discriminator="type")]
# Source configs other than MQTT, by type: their own models, in their connector's folder.
SOURCE_MODELS: dict[str, type[BaseModel]] = {"opcua": OpcUaSource, "bacnet": BacnetSource}


class Aggregates(_Model):
    window: Literal["1m"] = "1m"
    grace: DurationMs = Field(
        10_000, description="how far behind the highest event time a reading may arrive"
    )
    idle_timeout: DurationMs = Field(
        30_000, description="wall-clock quiet time after which a partition's windows close"
    )
    latest: bool = Field(True, description="keep the compacted telemetry.latest topic")
    checkpoint_interval: DurationMs = Field(
        "2s",
        validate_default=True,
        description="how often the worker makes its aggregation state durable and acknowledges its input; "
        "after a crash at most this much input is read again. telemetry.latest is published at this pace",
    )

    @field_validator("checkpoint_interval")
    @classmethod
    def _checkpoint(cls, v: int) -> int:
        if not 100 <= v <= 60_000:
            raise ValueError("checkpoint_interval must be between 100ms and 60s")
        return v

    @field_validator("grace")
    @classmethod
    def _grace(cls, v: int) -> int:
        if not 0 <= v <= 3_600_000:
            raise ValueError("grace must be between 0s and 1h")
        return v

    @field_validator("idle_timeout")
    @classmethod
    def _idle(cls, v: int) -> int:
        if not 1_000 <= v <= 86_400_000:
            raise ValueError("idle_timeout must be between 1s and 24h")
        return v


SINK_TOPICS = ("agg_1m", "readings", "kpi_results")


class PostgresSink(_Model):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["postgres"]
    dsn: str = Field("postgresql://plantstream:plantstream@127.0.0.1:55432/plantstream", repr=False)
    schema_name: str = Field("public", alias="schema", pattern=r"^[a-z_][a-z0-9_]*$")
    topics: list[Literal["agg_1m", "readings", "kpi_results"]] = Field(
        default_factory=lambda: ["agg_1m"],  # type: ignore[arg-type]
        min_length=1,
    )
    batch_size: int = Field(2000, ge=1, le=100_000)
    batch_delay: DurationMs = Field(500)
    retention: DurationMs | None = Field(None, description="drop data older than this (default: keep)")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: str) -> str:
        if not v.startswith(("postgresql://", "postgres://")) and "=" not in v:
            raise ValueError("expected postgresql://user:password@host:port/database or key=value pairs")
        return v


Sink = Annotated[PostgresSink, Field(discriminator="type")]


# -- control loops (loop KPIs, KPI_SPEC.md) --------------------------------------------------------

LOOP_TAGS = ("pv", "sp", "op", "mode")
LOOP_SCENARIOS = (
    "well_tuned",
    "aggressive",
    "sticky_valve",
    "saturated",
    "mostly_manual",
    "external_disturbance",
)
# Samples a loop's analysis horizon may hold: its state record (float32 arrays, base64) stays under ~300 kB.
MAX_HORIZON_SAMPLES = 16_384
DEFAULT_HORIZON_SAMPLES = 4_096  # enough for every KPI, bicoherence included (KPI_SPEC §0)
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


class LoopThresholds(_Model):
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


class LoopHold(_Model):
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


class Loop(_Model):
    """One PI(D) control loop whose KPIs are computed per event-time window (KPI_SPEC.md)."""

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


class SimLoop(_Model):
    loop: str = Field(description="id of a loop in the loops section; its series are published")
    scenario: Literal[
        "well_tuned", "aggressive", "sticky_valve", "saturated", "mostly_manual", "external_disturbance"
    ] = Field(description="named loop simulation (connectors/sim/loops.py)")
    seed: int = Field(0, ge=0)
    offset: DurationMs = Field(0, description="simulated time skipped before publishing starts")


def _check_loops(topo: Topology) -> None:
    """Cross-checks of the loops section and of the loop simulations; the message names the path."""
    ids = [lp.id for lp in topo.loops]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"loops: loop ids must be unique; repeated: {', '.join(dup)}")
    sim = topo.simulate
    if sim is None or not sim.loops:
        return
    by_id = {lp.id: lp for lp in topo.loops}
    source = next(s for s in topo.sources if s.id == sim.source)
    if source.type != "mqtt":
        raise ValueError(
            f"simulate.source: loop simulations publish over MQTT; {source.id!r} is a {source.type} source"
        )
    from connectors.sim.loop_publisher import check_simulated_loop

    for j, sl in enumerate(sim.loops):
        lp = by_id.get(sl.loop)
        if lp is None:
            raise ValueError(
                f"simulate.loops[{j}].loop: {sl.loop!r} is not a loop id; known: "
                f"{', '.join(ids) or 'none (add a loops section)'}"
            )
        problem = check_simulated_loop(lp, sl, source)
        if problem:
            raise ValueError(f"simulate.loops[{j}]: {problem}")


class SimSignal(_Model):
    kind: Literal["energy_site", "ahu"]
    site: str = "site1"
    devices: int = Field(1, ge=1, le=10_000)


class Simulation(_Model):
    source: str = Field(description="id of the MQTT source whose topics the simulator publishes to")
    rate: float = Field(1.0, gt=0, le=10_000, description="samples per second per device")
    scenarios: list[SimSignal] = Field(default_factory=lambda: [SimSignal(kind="energy_site")])
    loops: list[SimLoop] = Field(
        default_factory=list,
        description="simulated control loops, published as "
        "their loops' PV/SP/OP/MODE series with explicit timestamps",
    )
    speed: float = Field(
        1.0,
        gt=0,
        le=1000,
        description="event-time pacing of the loop simulations: 1 "
        "is real time, 20 makes a simulated minute last 3 s (timestamps run ahead of time)",
    )


class Topology(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: Literal[1] = 1
    prefix: str = Field("", pattern=r"^([A-Za-z0-9_-]+\.)?$", description="topic prefix such as 'acme.'")
    broker: Broker = Broker()
    sources: list[Source] = Field(default_factory=list)
    aggregates: Aggregates = Aggregates()
    sinks: list[Sink] = Field(default_factory=list)
    simulate: Simulation | None = None
    loops: list[Loop] = Field(default_factory=list, description="control loops whose KPIs go to loops.kpi")

    @model_validator(mode="after")
    def _cross(self) -> Topology:
        ids = [s.id for s in self.sources]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"source ids must be unique; repeated: {', '.join(sorted(dup))}")
        if self.simulate is not None and self.simulate.source not in ids:
            raise ValueError(
                f"simulate.source {self.simulate.source!r} is not a source id; "
                f"known: {', '.join(ids) or 'none'}"
            )
        _check_loops(self)
        return self

    # -- topic names -------------------------------------------------------------------------------
    def topic(self, base: str) -> str:
        return f"{self.prefix}{base}"

    @property
    def raw_topic(self) -> str:
        return self.topic("telemetry.raw")

    @property
    def dlq_topic(self) -> str:
        return self.topic("telemetry.dlq")

    @property
    def agg_topic(self) -> str:
        return self.topic("telemetry.agg.1m")

    @property
    def latest_topic(self) -> str:
        return self.topic("telemetry.latest")

    @property
    def commands_topic(self) -> str:
        return self.topic("commands.bacnet")

    @property
    def results_topic(self) -> str:
        return self.topic("commands.results")

    @property
    def loop_samples_topic(self) -> str:
        return self.topic("loops.samples")

    @property
    def loop_kpi_topic(self) -> str:
        return self.topic("loops.kpi")

    def source(self, source_id: str) -> Any:  # one of the Source union's models
        for s in self.sources:
            if s.id == source_id:
                return s
        raise KeyError(f"no source {source_id!r}; known: {', '.join(s.id for s in self.sources)}")


# -- loading ---------------------------------------------------------------------------------------

ENV_OVERRIDES = {
    "PLANTSTREAM_KAFKA": ("broker", "bootstrap"),
    "PLANTSTREAM_PG_DSN": ("sinks", "postgres", "dsn"),
    "PLANTSTREAM_MQTT_URL": ("sources", "mqtt", "url"),
    "PLANTSTREAM_TOPIC_PREFIX": ("prefix",),
}


def expand_env(obj: Any, env: dict[str, str], path: str = "") -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string of the parsed YAML."""
    if isinstance(obj, dict):
        return {k: expand_env(v, env, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expand_env(v, env, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, str) and "$" in obj:
        missing: list[str] = []

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            missing.append(name)
            return m.group(0)

        out = _VAR.sub(sub, obj)
        if missing:
            raise TopologyError(
                path,
                [
                    f"{path}: environment variable {missing[0]} is not set "
                    f"(set it, or write ${{{missing[0]}:-default}})"
                ],
            )
        return out
    return obj


def apply_env_overrides(data: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    if env.get("PLANTSTREAM_KAFKA"):
        data.setdefault("broker", {})
        if isinstance(data["broker"], dict):
            data["broker"]["bootstrap"] = env["PLANTSTREAM_KAFKA"]
    if "PLANTSTREAM_TOPIC_PREFIX" in env:
        data["prefix"] = env["PLANTSTREAM_TOPIC_PREFIX"]
    for key, kind, field_name in (
        ("PLANTSTREAM_PG_DSN", "postgres", "dsn"),
        ("PLANTSTREAM_MQTT_URL", "mqtt", "url"),
    ):
        if env.get(key):
            section = "sinks" if kind == "postgres" else "sources"
            for item in data.get(section) or []:
                if isinstance(item, dict) and item.get("type") == kind:
                    item[field_name] = env[key]
    return data


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("mqtt", "postgres", *SOURCE_MODELS) and out.endswith("]"):
            continue  # the discriminator tag pydantic adds to the path; the index already names the item
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _message(err: dict[str, Any], model_fields: dict[str, list[str]]) -> str:
    kind = err["type"]
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "extra_forbidden":
        parent = _loc(tuple(err["loc"][:-1]))
        allowed = model_fields.get(parent)
        msg = "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    elif kind == "missing":
        msg = "required but missing"
    elif kind == "union_tag_invalid":
        ctx = err.get("ctx") or {}
        msg = f"unknown type {ctx.get('tag')!r}; allowed: {ctx.get('expected_tags')}".replace("'", "")
    elif kind == "union_tag_not_found":
        msg = "'type' is missing"
    return msg


def _fields_by_path(data: Any) -> dict[str, list[str]]:
    """Allowed keys at each YAML path, for 'unknown key' errors."""
    out: dict[str, list[str]] = {"(top level)": _names(Topology)}
    simple: dict[str, type[BaseModel]] = {"broker": Broker, "aggregates": Aggregates, "simulate": Simulation}
    for k, m in simple.items():
        out[k] = _names(m)
    if isinstance(data, dict):
        for i, s in enumerate(data.get("sources") or []):
            if isinstance(s, dict) and s.get("type") in SOURCE_MODELS:
                _nested_names(SOURCE_MODELS[s["type"]], s, f"sources[{i}]", out)
                continue
            out[f"sources[{i}]"] = _names(MqttSource)
            out[f"sources[{i}].batch"] = _names(BatchSettings)
            if isinstance(s, dict):
                for j, _ in enumerate(s.get("topics") or []):
                    out[f"sources[{i}].topics[{j}]"] = _names(TopicMapping)
        for i, _ in enumerate(data.get("sinks") or []):
            out[f"sinks[{i}]"] = _names(PostgresSink)
        for i, lp in enumerate(data.get("loops") or []):
            _nested_names(Loop, lp, f"loops[{i}]", out)
        if isinstance(data.get("simulate"), dict):
            _nested_names(Simulation, data["simulate"], "simulate", out)
    return out


def _names(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model in an annotation such as ``Security``, ``Deadband | None`` or ``list[NodeMapping]``."""
    if (
        isinstance(annotation, type)
        and not hasattr(annotation, "__origin__")
        and issubclass(annotation, BaseModel)
    ):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _nested_names(model: type[BaseModel], data: Any, path: str, out: dict[str, list[str]]) -> None:
    """Allowed keys of ``model`` at ``path`` and of the models nested in it, following the data."""
    out[path] = _names(model)
    if not isinstance(data, dict):
        return
    for name, f in model.model_fields.items():
        key = f.alias or name
        sub = _model_in(f.annotation)
        value = data.get(key)
        if sub is None or value is None:
            continue
        if isinstance(value, list):
            for j, item in enumerate(value):
                _nested_names(sub, item, f"{path}.{key}[{j}]", out)
        else:
            _nested_names(sub, value, f"{path}.{key}", out)


def validate_data(data: Any, source: str = "<topology>") -> Topology:
    if not isinstance(data, dict):
        raise TopologyError(source, [f"(top level): expected a mapping of keys, found {type(data).__name__}"])
    try:
        return Topology.model_validate(data)
    except ValidationError as e:
        fields = _fields_by_path(data)
        problems = []
        for err in e.errors():
            path = _loc(tuple(err["loc"]))
            msg = _message(dict(err), fields)
            found = err.get("input")
            if err["type"].startswith("union_tag"):
                path += ".type"
                found = None
            quiet = err["type"] == "missing" or found is None or isinstance(found, dict | list)
            shown = "" if quiet else f" (found {found!r})"
            problems.append(f"{path}: {msg}{shown}")
        raise TopologyError(source, problems) from None


def load(path: str | Path, env: dict[str, str] | None = None) -> Topology:
    """Read, expand, override and validate a topology file. Raises :class:`TopologyError`."""
    p = Path(path)
    env = dict(os.environ) if env is None else env
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise TopologyError(str(p), [f"cannot read the file: {e.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise TopologyError(str(p), [f"{where}not valid YAML: {getattr(e, 'problem', e)}"]) from None
    try:
        data = expand_env(data, env)
    except TopologyError as e:
        raise TopologyError(str(p), e.problems) from None
    if isinstance(data, dict):
        data = apply_env_overrides(data, env)
    return validate_data(data, str(p))


def _duration_defaults(node: Any) -> None:
    """Durations are milliseconds inside but a bare number in YAML means seconds: show defaults as text."""
    if isinstance(node, dict):
        if isinstance(node.get("default"), int) and "(ms|s|m|h)" in str(node.get("anyOf", "")):
            node["default"] = f"{node['default']}ms"
        for v in node.values():
            _duration_defaults(v)
    elif isinstance(node, list):
        for v in node:
            _duration_defaults(v)


def json_schema() -> dict[str, Any]:
    schema = Topology.model_json_schema(by_alias=True)
    _duration_defaults(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "plantstream topology v1"
    return schema


def iter_problems(path: str | Path) -> Iterator[str]:
    try:
        load(path)
    except TopologyError as e:
        yield from e.problems


if __name__ == "__main__":
    import json
    import sys

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")

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
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from connectors.bacnet.config import BacnetSource
from connectors.opcua.config import OpcUaSource

TEMPLATE_FIELDS = ("site", "device", "point")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, None: 1000}


class TopologyError(Exception):
    """A topology that cannot be used; ``problems`` holds one line per mistake, each naming its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


def parse_duration_ms(v: Any) -> int:
    """``250ms``, ``10s``, ``1m``, ``2h`` or a bare number of seconds → milliseconds."""
    if isinstance(v, bool):
        raise ValueError("expected a duration such as 500ms, 10s, 1m or a number of seconds")
    if isinstance(v, int | float):
        return int(round(v * 1000))
    if isinstance(v, str):
        m = _DURATION.match(v)
        if m:
            return int(round(float(m.group(1)) * _UNIT_MS[m.group(2)]))
    raise ValueError("expected a duration such as 500ms, 10s, 1m or a number of seconds")


DurationMs = Annotated[
    int,
    BeforeValidator(parse_duration_ms),
    WithJsonSchema({"anyOf": [{"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"},
                              {"type": "number", "minimum": 0}],
                    "description": "a duration: 500ms, 10s, 1m, 2h, or a number of seconds"}),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Broker(_Model):
    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    partitions: int = Field(4, ge=1, le=1024, description="partitions of telemetry.raw (and its state)")
    replication: int = Field(1, ge=1, le=16)
    raw_retention: DurationMs = Field(7 * 24 * 3_600_000, description="retention of telemetry.raw")


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
    grace: DurationMs = Field(10_000, description="how far behind the highest event time a reading may arrive")
    idle_timeout: DurationMs = Field(30_000, description="wall-clock quiet time after which a partition's windows close")
    latest: bool = Field(True, description="keep the compacted telemetry.latest topic")

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


SINK_TOPICS = ("agg_1m", "readings")


class PostgresSink(_Model):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["postgres"]
    dsn: str = Field("postgresql://plantstream:plantstream@127.0.0.1:55432/plantstream", repr=False)
    schema_name: str = Field("public", alias="schema", pattern=r"^[a-z_][a-z0-9_]*$")
    topics: list[Literal["agg_1m", "readings"]] = Field(default_factory=lambda: ["agg_1m"], min_length=1)  # type: ignore[arg-type]
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


class SimSignal(_Model):
    kind: Literal["energy_site", "ahu"]
    site: str = "site1"
    devices: int = Field(1, ge=1, le=10_000)


class Simulation(_Model):
    source: str = Field(description="id of the MQTT source whose topics the simulator publishes to")
    rate: float = Field(1.0, gt=0, le=10_000, description="samples per second per device")
    scenarios: list[SimSignal] = Field(default_factory=lambda: [SimSignal(kind="energy_site")])


class Topology(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: Literal[1] = 1
    prefix: str = Field("", pattern=r"^([A-Za-z0-9_-]+\.)?$", description="topic prefix such as 'acme.'")
    broker: Broker = Broker()
    sources: list[Source] = Field(default_factory=list)
    aggregates: Aggregates = Aggregates()
    sinks: list[Sink] = Field(default_factory=list)
    simulate: Simulation | None = None

    @model_validator(mode="after")
    def _cross(self) -> Topology:
        ids = [s.id for s in self.sources]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"source ids must be unique; repeated: {', '.join(sorted(dup))}")
        if self.simulate is not None and self.simulate.source not in ids:
            raise ValueError(
                f"simulate.source {self.simulate.source!r} is not a source id; known: {', '.join(ids) or 'none'}"
            )
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
            raise TopologyError(path, [f"{path}: environment variable {missing[0]} is not set "
                                       f"(set it, or write ${{{missing[0]}:-default}})"])
        return out
    return obj


def apply_env_overrides(data: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    if env.get("PLANTSTREAM_KAFKA"):
        data.setdefault("broker", {})
        if isinstance(data["broker"], dict):
            data["broker"]["bootstrap"] = env["PLANTSTREAM_KAFKA"]
    if "PLANTSTREAM_TOPIC_PREFIX" in env:
        data["prefix"] = env["PLANTSTREAM_TOPIC_PREFIX"]
    for key, kind, field_name in (("PLANTSTREAM_PG_DSN", "postgres", "dsn"), ("PLANTSTREAM_MQTT_URL", "mqtt", "url")):
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
        msg = msg[len("Value error, "):]
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
    return out


def _names(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model in an annotation such as ``Security``, ``Deadband | None`` or ``list[NodeMapping]``."""
    if (isinstance(annotation, type) and not hasattr(annotation, "__origin__")
            and issubclass(annotation, BaseModel)):
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

"""Topology files (YAML, format v1): loading, ``${VAR}`` expansion, environment overrides, validation.

Validation is done by pydantic models when the file is loaded, and every problem is reported with its
YAML path, the value found and what is allowed, all at once rather than one per run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Union

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    create_model,
    model_validator,
)

from connectors import registry
from connectors.bacnet.config import BacnetSource, check_write_networks
from connectors.mqtt.config import BatchSettings, MqttSource, TopicMapping
from connectors.opcua.config import OpcUaSource
from connectors.sim.config import SimLoop, SimSignal, Simulation
from connectors.timescale.config import PostgresSink
from pipeline.core.secrets import redact_text
from pipeline.core.topology import (
    SECRET_FIELDS,
    Aggregates,
    Broker,
    BrokerSecurity,
    SinkBase,
    TopologyBase,
    TopologyError,
    literal_secrets,
)
from pipeline.stages.alerts.config import AlertRule, Alerts
from pipeline.stages.loops.config import Loop

__all__ = [
    "Aggregates",
    "AlertRule",
    "Alerts",
    "BacnetSource",
    "BatchSettings",
    "Broker",
    "Loop",
    "MqttSource",
    "OpcUaSource",
    "PostgresSink",
    "SimLoop",
    "SimSignal",
    "Simulation",
    "TopicMapping",
    "Topology",
    "TopologyError",
    "load",
    "validate_data",
]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _union(models: list[type[BaseModel]]) -> Any:
    """The configuration models of a registry as one union, told apart by their ``type``."""
    if len(models) == 1:
        return Annotated[models[0], Field(discriminator="type")]
    return Annotated[Union[tuple(models)], Field(discriminator="type")]  # noqa: UP007


if TYPE_CHECKING:  # what the registries hold, as far as a type checker can know
    Source = MqttSource | OpcUaSource | BacnetSource
    Sink = SinkBase
else:
    Source = _union(registry.source_configs())
    Sink = _union(registry.sink_configs())


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


class Topology(TopologyBase):
    """A whole topology file: the base settings plus sources, sinks, loops and simulations."""

    sources: list[Source] = Field(default_factory=list)
    sinks: list[Sink] = Field(default_factory=list)
    simulate: Simulation | None = None
    loops: list[Loop] = Field(default_factory=list, description="control loops whose KPIs go to loops.kpi")
    alerts: Alerts = Field(default_factory=Alerts, description="alert rules; transitions go to alerts.events")

    @model_validator(mode="after")
    def _cross(self) -> Topology:
        ids = [s.id for s in self.sources]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"source ids must be unique; repeated: {', '.join(sorted(dup))}")
        sink_ids = [s.id for s in self.sinks]
        dup = {i for i in sink_ids if sink_ids.count(i) > 1}
        if dup:
            raise ValueError(f"sink ids must be unique; repeated: {', '.join(sorted(dup))}")
        if self.simulate is not None and self.simulate.source not in ids:
            raise ValueError(
                f"simulate.source {self.simulate.source!r} is not a source id; "
                f"known: {', '.join(ids) or 'none'}"
            )
        _check_loops(self)
        problem = check_write_networks(self.sources)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def has_commands(self) -> bool:
        """BACnet sources make the command topics and the ``write_commands`` audit table."""
        return any(isinstance(s, BacnetSource) for s in self.sources)

    def sink_tables(self, sink: SinkBase, writer_tables: frozenset[str]) -> list[str]:
        """The tables a sink writes: its ``topics``, plus the command audit where BACnet writes exist and the
        alarm journal and current alarms where alert rules exist (in the databases that can hold them)."""
        tables = list(dict.fromkeys(sink.topics))
        extra = ["write_commands"] if self.has_commands else []
        extra += ["alarm_events", "alarms"] if self.alerts.rules else []
        tables += [t for t in extra if t in writer_tables and t not in tables]
        return tables

    def source(self, source_id: str) -> Any:  # one of the Source union's models
        for s in self.sources:
            if s.id == source_id:
                return s
        raise KeyError(f"no source {source_id!r}; known: {', '.join(s.id for s in self.sources)}")


_STATIC_KEY = (tuple(registry.SOURCES.items()), tuple(registry.SINKS.items()))
_MODELS: dict[tuple[Any, ...], type[Topology]] = {}


def topology_model() -> type[Topology]:
    """:class:`Topology`, or a subclass whose unions hold what was registered since it was defined."""
    key = (tuple(registry.SOURCES.items()), tuple(registry.SINKS.items()))
    if key == _STATIC_KEY:
        return Topology
    if key not in _MODELS:
        sources: Any = list[_union(registry.source_configs())]  # type: ignore[misc]
        sinks: Any = list[_union(registry.sink_configs())]  # type: ignore[misc]
        _MODELS[key] = create_model(
            "Topology",
            __base__=Topology,
            sources=(sources, Field(default_factory=list)),
            sinks=(sinks, Field(default_factory=list)),
        )
    return _MODELS[key]


# -- loading ---------------------------------------------------------------------------------------

ENV_OVERRIDES = {
    "PLANTSTREAM_KAFKA": ("broker", "bootstrap"),
    "PLANTSTREAM_PG_DSN": ("sinks", "postgres", "dsn"),
    "PLANTSTREAM_INFLUX_URL": ("sinks", "influx", "url"),  # the sinks on the 1.x API
    "PLANTSTREAM_INFLUX2_URL": ("sinks", "influx", "url"),  # the sinks on the 2.x API
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
        ("PLANTSTREAM_INFLUX_URL", "influx", "url"),
    ):
        if env.get(key):
            section = "sinks" if kind in ("postgres", "influx") else "sources"
            for item in data.get(section) or []:
                if isinstance(item, dict) and item.get("type") == kind and item.get("api", "v1") == "v1":
                    item[field_name] = env[key]
    if env.get("PLANTSTREAM_INFLUX2_URL"):
        for item in data.get("sinks") or []:
            if isinstance(item, dict) and item.get("type") == "influx" and item.get("api") == "v2":
                item["url"] = env["PLANTSTREAM_INFLUX2_URL"]
    return data


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in (*registry.SOURCES, *registry.SINKS) and out.endswith("]"):
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
    out: dict[str, list[str]] = {"(top level)": _names(topology_model())}
    simple: dict[str, type[BaseModel]] = {
        "broker": Broker,
        "broker.security": BrokerSecurity,
        "aggregates": Aggregates,
        "simulate": Simulation,
    }
    for k, m in simple.items():
        out[k] = _names(m)
    if isinstance(data, dict):
        for section, known in (("sources", registry.SOURCES), ("sinks", registry.SINKS)):
            for i, item in enumerate(data.get(section) or []):
                if isinstance(item, dict) and item.get("type") in known:
                    model = (registry.source_config if section == "sources" else registry.sink_config)(
                        item["type"]
                    )
                    _nested_names(model, item, f"{section}[{i}]", out)
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
        return topology_model().model_validate(data)
    except ValidationError as e:
        fields = _fields_by_path(data)
        problems = []
        # In the order of the file's top-level sections, so the list reads like the file.
        order = {k: i for i, k in enumerate(data)}
        errors = sorted(
            e.errors(), key=lambda err: order.get(err["loc"][0] if err["loc"] else "", len(order))
        )
        for err in errors:
            path = _loc(tuple(err["loc"]))
            msg = _message(dict(err), fields)
            found = err.get("input")
            if err["type"].startswith("union_tag"):
                path += ".type"
                found = None
            quiet = err["type"] == "missing" or found is None or isinstance(found, dict | list)
            # Never echo a secret; connection strings are shown without their passwords.
            quiet = quiet or any(part in SECRET_FIELDS for part in err["loc"])
            if isinstance(found, str):
                found = redact_text(found)
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
    secrets = literal_secrets(data)
    if secrets:
        raise TopologyError(str(p), secrets)
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
        if isinstance(node.get("default"), int) and "(ms|s|m|h|d)" in str(node.get("anyOf", "")):
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

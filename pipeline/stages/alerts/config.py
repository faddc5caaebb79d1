"""Alert rules (the topology's ``alerts`` section), validated with path and fix.

A rule watches one input (raw readings, 1-minute aggregates or loop KPIs) of the series (or loops) its
``match`` pattern selects; each matching series is one alarm instance ``<rule id>/<series>``. Kinds:

* ``threshold``: the value against one or more ``levels`` (each ``above``, ``below`` or ``outside`` a limit,
  in rising severity), with a ``deadband`` for the return;
* ``rate``: the change of the value within ``span``, against the levels;
* ``deviation``: the value minus a constant (``reference``) or minus the latest value of another point of the
  same device (``reference_point``), against the levels;
* ``quality``: the quality not ``good`` (or ``bad`` only, ``qualities``) for ``span``;
* ``stale``: no reading for ``span`` (event time while the device's partition flows, the wall clock for a
  device that went silent).

``on_delay``/``off_delay`` (event time) hold a raise and a return until the condition has lasted that long.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.core.durations import DurationMs
from pipeline.core.topology import Model

SEVERITIES = ("low", "medium", "high", "critical")
AGG_FIELDS = ("mean", "min", "max", "first", "last", "sum", "stddev", "count", "good_count")


class Level(Model):
    severity: Literal["low", "medium", "high", "critical"]
    above: float | None = None
    below: float | None = None
    outside: float | None = Field(None, ge=0, description="|value| above this")

    @model_validator(mode="after")
    def _one(self) -> Level:
        given = [k for k in ("above", "below", "outside") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a level needs exactly one of above, below, outside (e.g. {severity: high, above: 80})"
            )
        return self

    @property
    def limit(self) -> float:
        v = self.above if self.above is not None else self.below if self.below is not None else self.outside
        assert v is not None
        return v

    def holds(self, value: float, deadband: float = 0.0) -> bool:
        """Whether ``value`` is beyond the limit; ``deadband`` > 0 moves the limit back (to stay active)."""
        if self.above is not None:
            return value > self.above - deadband
        if self.below is not None:
            return value < self.below + deadband
        assert self.outside is not None
        return abs(value) > self.outside - deadband


class Chatter(Model):
    activations: int = Field(5, ge=2, description="raises within `within` that make an instance chattering")
    within: DurationMs = Field(600_000, description="event time")


class AlertRule(Model):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    input: Literal["readings", "agg_1m", "kpi"] = "readings"
    match: str = Field(
        description="glob on the series id site/device/point (input kpi: the loop id), e.g. hq/ahu*/supply_t"
    )
    field: str = Field("value", description="agg_1m: a statistic (mean, max, ...); kpi: a KPI name")
    kind: Literal["threshold", "rate", "deviation", "quality", "stale"] = "threshold"
    levels: list[Level] = Field(default_factory=list)
    deadband: float = Field(0.0, ge=0)
    on_delay: DurationMs = 0
    off_delay: DurationMs = 0
    span: DurationMs | None = Field(None, description="rate, quality, stale: the time span")
    reference: float | None = Field(None, description="deviation: from this constant")
    reference_point: str | None = Field(None, description="deviation: from this point of the same device")
    qualities: list[Literal["bad", "uncertain"]] = Field(default_factory=lambda: ["bad", "uncertain"])  # type: ignore[arg-type]
    severity: Literal["low", "medium", "high", "critical"] = Field("high", description="quality, stale")
    message: str = Field(
        "{rule}: {series} {value} {unit} ({severity}, limit {limit})",
        description="placeholders: rule, series, value, limit, unit, severity, duration, state",
    )
    labels: dict[str, str] = Field(default_factory=dict)
    chatter: Chatter | None = Field(default_factory=Chatter)
    realarm: DurationMs | None = Field(None, description="notify again while active this long")

    @model_validator(mode="after")
    def _consistent(self) -> AlertRule:
        k = self.kind
        if k in ("threshold", "rate", "deviation") and not self.levels:
            raise ValueError(f"kind {k} needs levels, e.g. levels: [{{severity: high, above: 80}}]")
        if k in ("quality", "stale") and self.levels:
            raise ValueError(f"kind {k} takes no levels; set severity (and span)")
        if k in ("rate", "quality", "stale") and not self.span:
            raise ValueError(f"kind {k} needs span, e.g. span: 5m")
        if k == "deviation" and (self.reference is None) == (self.reference_point is None):
            raise ValueError("kind deviation needs exactly one of reference (a constant) or reference_point")
        if k in ("quality", "stale") and self.input != "readings":
            raise ValueError(f"kind {k} watches raw readings: input must be readings")
        if self.input == "agg_1m" and self.field not in AGG_FIELDS:
            raise ValueError(
                f"field {self.field!r} is not an aggregate field; one of {', '.join(AGG_FIELDS)}"
            )
        if self.input == "readings" and self.field != "value":
            raise ValueError("input readings has one field, value")
        ranks = [SEVERITIES.index(lv.severity) for lv in self.levels]
        if ranks != sorted(set(ranks)):
            raise ValueError(
                "levels must be in rising severity, one per severity (low, medium, high, critical)"
            )
        if self.input == "kpi" and self.match.count("/"):
            raise ValueError("input kpi matches loop ids (no '/'), e.g. match: 'FIC*'")
        if self.input != "kpi" and (self.match.count("/") != 2 or "" in self.match.split("/")):
            raise ValueError("match is a pattern site/device/point, e.g. match: hq/ahu*/supply_temp")
        try:
            re.compile(fnmatch.translate(self.match))
        except re.error as e:
            raise ValueError(f"match is not a valid pattern: {e}") from None
        return self

    def matches(self, source: str) -> bool:
        return fnmatch.fnmatchcase(source, self.match)


class Filter(Model):
    severities: list[Literal["low", "medium", "high", "critical"]] | None = Field(
        None, description="only these severities (clears and commands: where the rule has one of them)"
    )
    sources: list[str] | None = Field(None, description="globs on the source series or loop, e.g. hq/*/*")
    rules: list[str] | None = Field(None, description="globs on the rule id")
    labels: dict[str, str] = Field(default_factory=dict, description="labels the rule must carry")

    def accepts(self, ev: dict[str, object], rule: AlertRule | None) -> bool:
        if self.severities is not None:
            sev = ev.get("severity")
            if sev is None:  # a clear or a command: wanted where the rule can reach a wanted severity
                can = [lv.severity for lv in rule.levels] or [rule.severity] if rule is not None else []
                if not any(x in self.severities for x in can):
                    return False
            elif sev not in self.severities:
                return False
        src, rid = str(ev.get("source", "")), str(ev.get("rule", ""))
        if self.sources is not None and not any(fnmatch.fnmatchcase(src, g) for g in self.sources):
            return False
        if self.rules is not None and not any(fnmatch.fnmatchcase(rid, g) for g in self.rules):
            return False
        labels = ev.get("labels") or {}
        return all(isinstance(labels, dict) and labels.get(k) == v for k, v in self.labels.items())


class WebhookSubscriber(Model):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://", description="POST target; the event is the JSON body")
    headers: dict[str, str] = Field(default_factory=dict, description="e.g. Authorization")
    filter: Filter = Field(default_factory=Filter)
    timeout: DurationMs = 10_000
    max_backoff: DurationMs = Field(30_000, description="retries back off up to this")


class MqttSubscriber(Model):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["mqtt"]
    url: str = Field(pattern=r"^mqtts?://", description="mqtt://host:port")
    topic: str = Field(
        "plantstream/alarms/{instance}", description="template: {instance}, {rule}, {source}, {state}"
    )
    retain: bool = Field(True, description="the broker keeps each instance's current state")
    qos: Literal[0, 1, 2] = 1
    username: str | None = None
    password: str | None = Field(None, repr=False)
    filter: Filter = Field(default_factory=Filter)


class Alerts(Model):
    rules: list[AlertRule] = Field(default_factory=list)
    subscribers: list[Annotated[WebhookSubscriber | MqttSubscriber, Field(discriminator="type")]] = Field(
        default_factory=list,
        description="webhook: every notified transition, in order, once; mqtt: each instance's current state",
    )

    @model_validator(mode="after")
    def _unique(self) -> Alerts:
        seen: set[str] = set()
        for r in self.rules:
            if r.id in seen:
                raise ValueError(f"rule ids must be unique; repeated: {r.id}")
            seen.add(r.id)
        subs = [s.id for s in self.subscribers]
        if len(set(subs)) != len(subs):
            raise ValueError("subscriber ids must be unique")
        if self.subscribers and not self.rules:
            raise ValueError("subscribers without rules get nothing: add alerts.rules")
        return self


_WILD = re.compile(r"[*?\[]")


class RuleIndex:
    """The rules whose ``match`` selects a source, found without trying every rule (thousands of rules, one
    per series, are the common case). Patterns with a literal site and device are filed under ``site/device``
    (and the point, where it is literal too); the rest are tried one by one. Rules come back in topology
    order."""

    def __init__(self, rules: Iterable[AlertRule]) -> None:
        self.devices: dict[
            str, tuple[dict[str, list[tuple[int, AlertRule]]], list[tuple[int, AlertRule]]]
        ] = {}
        self.loops: dict[str, list[tuple[int, AlertRule]]] = {}
        self.wild: list[tuple[int, AlertRule]] = []
        self.any = False
        for i, r in enumerate(rules):
            self.any = True
            parts = r.match.split("/")
            if len(parts) == 3 and not _WILD.search(parts[0]) and not _WILD.search(parts[1]):
                points, others = self.devices.setdefault(f"{parts[0]}/{parts[1]}", ({}, []))
                if _WILD.search(parts[2]):
                    others.append((i, r))
                else:
                    points.setdefault(parts[2], []).append((i, r))
            elif len(parts) == 1 and not _WILD.search(r.match):
                self.loops.setdefault(r.match, []).append((i, r))
            else:
                self.wild.append((i, r))

    def matching(self, source: str) -> list[AlertRule]:
        parts = source.split("/")
        found: list[tuple[int, AlertRule]] = []
        if len(parts) == 3:
            points, others = self.devices.get(f"{parts[0]}/{parts[1]}", ({}, []))
            found += points.get(parts[2], [])
            found += [x for x in others if x[1].matches(source)]
        else:
            found += self.loops.get(source, [])
        found += [x for x in self.wild if x[1].matches(source)]
        return [r for _, r in sorted(found, key=lambda x: x[0])]

    def for_device(self, site: str, device: str) -> list[AlertRule]:
        """The rules of series ``site/device/*`` (some may not match a given point)."""
        points, others = self.devices.get(f"{site}/{device}", ({}, []))
        found = [x for xs in points.values() for x in xs] + others
        for i, r in self.wild:
            ps, pd = [*r.match.split("/"), "", ""][:2]
            if fnmatch.fnmatchcase(site, ps) and fnmatch.fnmatchcase(device, pd):
                found.append((i, r))
        return [r for _, r in sorted(found, key=lambda x: x[0])]

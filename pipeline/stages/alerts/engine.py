"""The alarm state machine: conditions in event time and the ISA-18.2 lifecycle, pure (no I/O, no clock).

One :class:`Instance` per (rule, source series or loop). Its *condition* is the severity level the input
calls for (``None``: inactive), after the deadband and the on/off delays; its *alarm state* follows ISA-18.2:

    normal ──raise──> unack ──ack──> acked ──clear──> normal
                        │                │
                        └─clear─> rtn_unack ──ack──> normal      (a raise from rtn_unack: unack again)

An escalation of an acknowledged alarm makes it ``unack`` again; shelving (timed), suppression by design and
out of service are flags beside the state: transitions go on being recorded but are not notified. An instance
that raises ``chatter.activations`` times within ``chatter.within`` is chattering: its raises and clears are
recorded without notification until it has been quiet for ``within`` (then one ``settle`` event, stamped
at that moment, says where it stands: on the next sample, or on the device's clock passing it). Every call
returns the events it caused, each with a stable id ``<instance>#<seq>``: the same input in the same order
gives the same events, which is what makes replays and restarts exactly-once for readers that key on the id.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.stages.alerts.config import SEVERITIES, AlertRule

Event = dict[str, Any]


def rank(level: str | None) -> int:
    return -1 if level is None else SEVERITIES.index(level)


@dataclass
class Instance:
    rule: str
    source: str
    seq: int = 0
    level: str | None = None  # the condition's severity after delays; None: inactive
    pending: str | None = None  # the level the input calls for while a delay runs ("" = inactive)
    pending_since: int | None = None
    state: str = "normal"  # normal | unack | acked | rtn_unack
    shelved_until: int | None = None  # wall ms
    suppressed: bool = False
    out_of_service: bool = False
    chattering: bool = False
    activations: list[int] = field(default_factory=list)
    last_ts: int | None = None  # event time of the newest sample
    last_value: float | None = None
    last_notified: int | None = None  # event time of the last notified raise/realarm
    history: list[tuple[int, float]] = field(default_factory=list)  # rate: samples within the span
    unit: str | None = None
    commands: list[str] = field(default_factory=list)  # ids of the last commands applied (idempotence)

    @property
    def key(self) -> str:
        return f"{self.rule}/{self.source}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Instance:
        d = dict(d)
        d["history"] = [tuple(x) for x in d.get("history", [])]
        return cls(**d)


KEEP_COMMAND_IDS = 32


class Engine:
    """The rules and their instances; the stage feeds it samples, silences, commands and the wall clock."""

    def __init__(self, rules: list[AlertRule]) -> None:
        self.rules = {r.id: r for r in rules}
        self.instances: dict[str, Instance] = {}
        self.shelved: set[str] = set()  # keys of shelved instances (expiry looks at these only)

    def adopt(self, inst: Instance) -> None:
        """Take an instance restored from the state topic."""
        self.instances[inst.key] = inst
        if inst.shelved_until is not None:
            self.shelved.add(inst.key)

    def forget(self, key: str) -> None:
        self.instances.pop(key, None)
        self.shelved.discard(key)

    # -- instances ----------------------------------------------------------------------------------
    def instance(self, rule: AlertRule, source: str) -> Instance:
        key = f"{rule.id}/{source}"
        inst = self.instances.get(key)
        if inst is None:
            inst = self.instances[key] = Instance(rule.id, source)
        return inst

    # -- input --------------------------------------------------------------------------------------
    def sample(
        self,
        rule: AlertRule,
        source: str,
        ts: int,
        value: float | None,
        quality: str = "good",
        unit: str | None = None,
        reference: float | None = None,
    ) -> list[Event]:
        """One input sample of ``source`` for ``rule`` at event time ``ts``. Samples older than the newest one
        seen are ignored (a condition cannot change in the past); ``value`` None (a KPI without a value)
        leaves a threshold condition as it is."""
        inst = self.instance(rule, source)
        if inst.last_ts is not None and ts <= inst.last_ts:
            return []
        inst.last_ts = ts
        if unit:
            inst.unit = unit
        out: list[Event] = []
        if value is not None and math.isfinite(value):
            inst.last_value = value
        self._settle(rule, inst, ts, out)
        raw = self._raw(rule, inst, ts, value, quality, reference)
        if raw is not False and not isinstance(raw, bool):
            self._condition(rule, inst, ts, raw, out)
        self._realarm(rule, inst, ts, out)
        return out

    def silence(self, rule: AlertRule, source: str, ts: int) -> list[Event]:
        """A stale rule: ``source`` sent nothing up to event time ``ts`` (the stage decides when to ask)."""
        inst = self.instances.get(f"{rule.id}/{source}")
        if inst is None or inst.last_ts is None or rule.span is None or ts - inst.last_ts < rule.span:
            return []
        if inst.level is not None:
            return []
        out: list[Event] = []
        self._change(rule, inst, inst.last_ts + rule.span, rule.severity, out)
        return out

    def _raw(
        self,
        rule: AlertRule,
        inst: Instance,
        ts: int,
        value: float | None,
        quality: str,
        reference: float | None,
    ) -> str | bool | None:
        """The level the sample calls for (None: inactive); False: the sample says nothing about it."""
        if rule.kind == "stale":
            return None  # data flows
        if rule.kind == "quality":
            return rule.severity if quality in rule.qualities else None
        if value is None or not math.isfinite(value):
            return False
        if rule.input == "readings" and quality != "good":
            return False  # a bad reading's value is not a process value
        x = value
        if rule.kind == "rate":
            assert rule.span is not None
            inst.history = [(t, v) for t, v in inst.history if t >= ts - rule.span] + [(ts, value)]
            x = value - inst.history[0][1]
        elif rule.kind == "deviation":
            ref = rule.reference if rule.reference is not None else reference
            if ref is None:
                return False
            x = value - ref
        current = rank(inst.level)
        level: str | None = None
        for lv in rule.levels:
            # Levels at or below the active one stay until the value is back past limit - deadband.
            if lv.holds(x, rule.deadband if rank(lv.severity) <= current else 0.0):
                level = lv.severity
        return level

    def _condition(self, rule: AlertRule, inst: Instance, ts: int, raw: str | None, out: list[Event]) -> None:
        if raw == inst.level:
            inst.pending, inst.pending_since = None, None
            return
        up = rank(raw) > rank(inst.level)
        delay = max(rule.on_delay, rule.span or 0) if rule.kind == "quality" and up else 0
        delay = max(delay, rule.on_delay if up else rule.off_delay)
        direction = "up" if up else "down"
        if inst.pending != direction:
            inst.pending, inst.pending_since = direction, ts
        assert inst.pending_since is not None
        if ts - inst.pending_since >= delay:
            inst.pending, inst.pending_since = None, None
            self._change(rule, inst, ts, raw, out)

    # -- transitions --------------------------------------------------------------------------------
    def _change(self, rule: AlertRule, inst: Instance, ts: int, level: str | None, out: list[Event]) -> None:
        before = inst.level
        inst.level = level
        if before is None and level is not None:
            inst.state = "unack"
            inst.activations = [t for t in inst.activations if t > ts - self._within(rule)] + [ts]
            out.append(self._event(rule, inst, ts, "raise"))
            inst.last_notified = ts
            chatter = rule.chatter
            if chatter is not None and not inst.chattering and len(inst.activations) >= chatter.activations:
                inst.chattering = True
                out.append(self._event(rule, inst, ts, "chatter", notify=True))
        elif before is not None and level is None:
            inst.state = {"unack": "rtn_unack", "acked": "normal"}.get(inst.state, inst.state)
            out.append(self._event(rule, inst, ts, "clear"))
        elif rank(level) > rank(before):
            if inst.state == "acked":
                inst.state = "unack"
            out.append(self._event(rule, inst, ts, "escalate"))
            inst.last_notified = ts
        else:
            out.append(self._event(rule, inst, ts, "deescalate"))

    def _within(self, rule: AlertRule) -> int:
        return rule.chatter.within if rule.chatter is not None else 0

    def _settle(self, rule: AlertRule, inst: Instance, ts: int, out: list[Event]) -> None:
        if inst.chattering and inst.activations:
            # Settled the moment it has been quiet for the chatter period, whatever time told us so.
            at = inst.activations[-1] + self._within(rule)
            if ts >= at:
                inst.chattering = False
                out.append(self._event(rule, inst, at, "settle", notify=True, valueless=True))

    def clock(self, key: str, ts: int) -> list[Event]:
        """The clock of an instance's input (its device's newest event time) reached ``ts``: a chattering
        instance quiet for its chatter period settles, though no sample of its own came."""
        inst = self.instances.get(key)
        rule = self.rules.get(inst.rule) if inst is not None else None
        if inst is None or rule is None:
            return []
        out: list[Event] = []
        self._settle(rule, inst, ts, out)
        return out

    def _realarm(self, rule: AlertRule, inst: Instance, ts: int, out: list[Event]) -> None:
        if (
            rule.realarm
            and inst.state in ("unack", "acked")
            and inst.last_notified is not None
            and ts - inst.last_notified >= rule.realarm
        ):
            inst.last_notified = ts
            out.append(self._event(rule, inst, ts, "realarm"))

    # -- operator commands ----------------------------------------------------------------------------
    def command(self, cmd: dict[str, Any], clock: int | None = None) -> list[Event]:
        """An AlertCommand ``{id, instance, action, by, at, comment?, duration_ms?}``; the same id twice
        changes nothing the second time. Unknown instances and rules are ignored (the stage dead-letters)."""
        inst = self.instances.get(cmd["instance"])
        if inst is None or inst.rule not in self.rules:
            return []
        if cmd["id"] in inst.commands:
            return []
        inst.commands = ([*inst.commands, cmd["id"]])[-KEEP_COMMAND_IDS:]
        rule = self.rules[inst.rule]
        action, at = cmd["action"], int(cmd["at"])
        ts = self._now(inst, clock, at)
        if action == "ack":
            inst.state = {"unack": "acked", "rtn_unack": "normal"}.get(inst.state, inst.state)
        elif action == "shelve":
            inst.shelved_until = at + int(cmd["duration_ms"])
            self.shelved.add(inst.key)
        elif action == "unshelve":
            inst.shelved_until = None
            self.shelved.discard(inst.key)
        elif action in ("suppress", "release"):
            inst.suppressed = action == "suppress"
        elif action in ("disable", "enable"):
            inst.out_of_service = action == "disable"
        else:
            raise ValueError(f"unknown action {action!r}")
        return [
            self._event(rule, inst, ts, action, by=cmd.get("by"), comment=cmd.get("comment"), command=cmd)
        ]

    def expire_shelves(
        self, wall_ms: int, clocks: Callable[[Instance], int | None] | None = None
    ) -> list[Event]:
        """Shelves whose time is up end by themselves (wall clock: operators shelve in wall time)."""
        out: list[Event] = []
        for key in sorted(self.shelved):
            inst = self.instances.get(key)
            if inst is None or inst.shelved_until is None:
                self.shelved.discard(key)
                continue
            if wall_ms >= inst.shelved_until and inst.rule in self.rules:
                inst.shelved_until = None
                self.shelved.discard(key)
                ts = self._now(inst, clocks(inst) if clocks else None, wall_ms)
                out.append(self._event(self.rules[inst.rule], inst, ts, "unshelve", by="expiry"))
        return out

    @staticmethod
    def _now(inst: Instance, clock: int | None, otherwise: int) -> int:
        """The event time of a command's event: the instance's input clock (its device's newest reading,
        which may be newer than the instance's last sample: quiet readings are not routed to it)."""
        known = [t for t in (inst.last_ts, clock) if t is not None]
        return max(known) if known else otherwise

    # -- events -------------------------------------------------------------------------------------
    def _event(
        self,
        rule: AlertRule,
        inst: Instance,
        ts: int,
        transition: str,
        *,
        notify: bool | None = None,
        by: str | None = None,
        comment: str | None = None,
        command: dict[str, Any] | None = None,
        valueless: bool = False,
    ) -> Event:
        inst.seq += 1
        level = inst.level
        limit = next((lv.limit for lv in rule.levels if lv.severity == level), None)
        quiet = inst.shelved_until is not None or inst.suppressed or inst.out_of_service
        if notify is None:
            notify = not quiet and not (
                inst.chattering and transition in ("raise", "clear", "escalate", "deescalate")
            )
        # A settle is about notifications, not a value: it carries none (it may come on a clock tick).
        value = None if valueless else inst.last_value
        fields = {
            "rule": rule.id,
            "series": inst.source,
            "value": "" if value is None else f"{value:g}",
            "limit": "" if limit is None else f"{limit:g}",
            "unit": inst.unit or "",
            "severity": level or "none",
            "state": inst.state,
            "duration": "" if rule.span is None else f"{rule.span / 1000:g}s",
        }
        try:
            message = rule.message.format(**fields)
        except (KeyError, IndexError, ValueError):
            message = rule.message
        ev: Event = {
            "id": f"{inst.key}#{inst.seq}",
            "instance": inst.key,
            "rule": rule.id,
            "source": inst.source,
            "seq": inst.seq,
            "ts": ts,
            "transition": transition,
            "state": inst.state,
            "active": level is not None,
            "severity": level,
            "value": value,
            "limit": limit,
            "unit": inst.unit,
            "message": message,
            "labels": dict(rule.labels),
            "shelved_until": inst.shelved_until,
            "suppressed": inst.suppressed,
            "out_of_service": inst.out_of_service,
            "chattering": inst.chattering,
            "notify": notify,
        }
        if by is not None:
            ev["by"] = by
        if comment is not None:
            ev["comment"] = comment
        if command is not None:
            ev["command"] = command["id"]
            ev["at"] = int(command["at"])
        return ev

"""The alerts stage: ``alerts.samples`` → the alarm engine → ``alerts.events`` and ``alerts.state``.

Everything about one alarm instance arrives on one partition, in order
(:mod:`pipeline.stages.alerts.routing`).
The instances live in memory; at each checkpoint the runtime delivers the events, then the changed instances
go to the compacted state topic ``<app-id>-alerts-state`` (one record per instance), then the input is
committed. After a crash the input since the last commit is read again: samples at or before an instance's
newest event time change nothing, commands are recognised by their id, and the events the replay makes again
carry the same ids (``<instance>#<seq>``) as the first time, so a reader keyed on the id sees each transition
once. The wall clock decides two things only: a stale rule fires for a series silent for its span while its
partition is drained, and shelves expire.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import Message

from pipeline.core import codec
from pipeline.core.kafka import client_config, read_all
from pipeline.core.records import HEARTBEAT_KEY
from pipeline.core.topology import TopologyBase
from pipeline.stages.alerts.config import AlertRule, RuleIndex
from pipeline.stages.alerts.engine import Engine, Event, Instance
from pipeline.stages.runtime import Step
from pipeline.stages.state import PartitionedStore

log = logging.getLogger("plantstream.alerts")

ACTIONS = ("ack", "shelve", "unshelve", "suppress", "release", "disable", "enable")


class AlertStep(Step):
    def __init__(self, topo: TopologyBase, rules: list[AlertRule], app_id: str, counters: Any) -> None:
        self.topo, self.counters = topo, counters
        self.rules = rules
        self.engine = Engine(rules)
        self.store = PartitionedStore()
        self.state_topic = f"{app_id}-alerts-state"  # the worker creates it
        self.owner: dict[str, int] = {}  # instance -> input partition
        self.dirty: dict[int, set[str]] = {}
        self.arrived: dict[str, float] = {}  # stale instances: monotonic time of their last sample
        # Event-time clocks of the inputs (``r/site/device``, ``a/site/device``, ``k/loop``), and the
        # instances whose timers run on one (stale rules; chattering alarms, until they settle).
        self.clocks: dict[str, int] = {}
        self.timed: dict[str, set[str]] = {}
        self.refs: dict[int, dict[str, float]] = {}  # partition -> newest reference values not yet durable
        self.events = 0
        self._matching: dict[tuple[str, str], list[AlertRule]] = {}  # (input, source) -> its rules
        self.index = {k: RuleIndex(r for r in rules if r.input == k) for k in ("readings", "agg_1m", "kpi")}
        self.ref_points = {r.reference_point for r in rules if r.reference_point}
        self.stale = {r.id: r for r in rules if r.kind == "stale" and r.span}

    # -- state ----------------------------------------------------------------------------------------
    def assigned(self, partitions: list[int]) -> None:
        now = time.monotonic()
        for p in partitions:
            records = read_all(client_config(self.topo.broker), self.state_topic, p)
            self.store.load(p, ((m.key, m.value) for m in records))
            n = 0
            for key in [k for k in self.store if k.startswith("i/")]:
                if self.store[key].get("_p", p) != p or key[2:] in self.owner:
                    continue
                inst = Instance.from_dict({k: v for k, v in self.store[key].items() if k != "_p"})
                self.engine.adopt(inst)
                self.owner[inst.key] = p
                self.arrived[inst.key] = now
                self._time(inst)
                n += 1
            log.info("alerts: partition %d: %d alarm instance(s) restored", p, n)

    def revoked(self, partitions: list[int]) -> None:
        for p in partitions:
            self.store.drop(p)
            self.dirty.pop(p, None)
            self.refs.pop(p, None)
            for key in [k for k, q in self.owner.items() if q == p]:
                del self.owner[key]
                inst = self.engine.instances.get(key)
                if inst is not None:
                    self.timed.get(self._clock_of(inst), set()).discard(key)
                self.engine.forget(key)
                self.arrived.pop(key, None)

    def durable(self, partitions: list[int]) -> None:
        outbox = self.stage.outbox
        for p in partitions:
            self.store.partition = p
            for key, value in sorted(self.refs.pop(p, {}).items()):
                self.store[key] = value  # the newest only: not one write per reading
            for key in sorted(self.dirty.pop(p, ())):
                inst = self.engine.instances.get(key)
                if inst is not None:
                    self.store[f"i/{key}"] = {**inst.to_dict(), "_p": p}
            for k, v in self.store.take_log(p):
                outbox.produce(self.state_topic, k, v, None, p)

    # -- the work -------------------------------------------------------------------------------------
    def process(self, msgs: list[Message]) -> None:
        for m in msgs:
            if m.key() == HEARTBEAT_KEY or m.value() is None:
                continue
            p = m.partition()
            try:
                body = codec.loads(m.value())
                events = self._handle(p, body)
            except (codec.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                self.counters.rejected += 1
                self.stage.outbox.dead_letter(
                    self.topo.dlq_topic,
                    "alerts",
                    f"invalid: alert input ({e!r})",
                    m.value(),
                    topic=self.topo.alert_samples_topic,
                    partition=p,
                    offset=m.offset(),
                )
                continue
            self._emit(p, events)

    def _rules_for(self, kind: str, source: str) -> list[AlertRule]:
        """The rules of input ``kind`` that watch ``source`` (matched once per source: thousands of rules
        cost a dict lookup per sample)."""
        key = (kind, source)
        found = self._matching.get(key)
        if found is None:
            found = self._matching[key] = self.index[kind].matching(source)
        return found

    def _handle(self, p: int, body: dict[str, Any]) -> list[Event]:
        k = body["k"]
        out: list[Event] = []
        now = time.monotonic()
        if k == "r":
            site, device = body["site"], body["device"]
            latest: dict[str, float] = {}  # this device's newest values, for deviation references
            clock = int(body.get("t") or 0)
            for point, ts, value, quality, unit in body["s"]:
                series = f"{site}/{device}/{point}"
                clock = max(clock, ts)
                if quality == "good":
                    latest[point] = value
                for r in self._rules_for("readings", series):
                    ref = latest.get(r.reference_point) if r.reference_point else None
                    if r.reference_point and ref is None:
                        ref = self._reference(p, r, site, device)
                    out += self._sample(p, r, series, ts, value, quality, unit, ref, now)
                if point in self.ref_points and quality == "good":
                    self.refs.setdefault(p, {})[f"v/{site}/{device}/{point}"] = value
            out += self._advance(f"r/{site}/{device}", clock)
        elif k == "a":
            clock = 0
            for a in body["a"]:
                clock = max(clock, a["window_start"])
                for r in self._rules_for("agg_1m", a["series"]):
                    v = a.get(r.field)
                    out += self._sample(
                        p, r, a["series"], a["window_start"], v, "good", a.get("unit"), None, now
                    )
            out += self._advance(f"a/{body['site']}/{body['device']}", clock)
        elif k == "k":
            rec = body["r"]
            for r in self._rules_for("kpi", rec["loop"]):
                if r.field in rec["kpis"]:
                    res = rec["kpis"][r.field]
                    v = res["value"] if res["status"] == "ok" else None
                    out += self._sample(p, r, rec["loop"], rec["window_start"], v, "good", None, None, now)
            out += self._advance(f"k/{rec['loop']}", rec["window_start"])
        elif k == "c":
            cmd = body["c"]
            if cmd.get("action") not in ACTIONS:
                raise ValueError(f"unknown action {cmd.get('action')!r}; one of {', '.join(ACTIONS)}")
            if cmd["instance"] not in self.engine.instances:
                raise KeyError(f"no alarm instance {cmd['instance']!r} (yet)")
            inst = self.engine.instances[cmd["instance"]]
            out += self.engine.command(cmd, self.clocks.get(self._clock_of(inst)))
            self._touch(p, cmd["instance"])
        else:
            raise ValueError(f"unknown kind {k!r}")
        return out

    def _reference(self, p: int, r: AlertRule, site: str, device: str) -> float | None:
        key = f"v/{site}/{device}/{r.reference_point}"
        v = self.refs.get(p, {}).get(key, self.store.get(key))
        return float(v) if v is not None else None

    # -- timers in event time -------------------------------------------------------------------------
    def _clock_of(self, inst: Instance) -> str:
        """The clock an instance's timers run on: its device's readings or aggregates, or its loop's KPIs."""
        rule = self.engine.rules.get(inst.rule)
        if rule is None or rule.input == "kpi":
            return f"k/{inst.source}"
        site, device = inst.source.split("/")[:2]
        return f"{'r' if rule.input == 'readings' else 'a'}/{site}/{device}"

    def _time(self, inst: Instance) -> None:
        """Keep ``timed`` right for one instance: on its clock while chattering or under a stale rule."""
        ck = self._clock_of(inst)
        if inst.chattering or inst.rule in self.stale:
            self.timed.setdefault(ck, set()).add(inst.key)
        elif ck in self.timed:
            self.timed[ck].discard(inst.key)

    def _advance(self, ck: str, clock: int) -> list[Event]:
        """An input's clock moved: chattering alarms quiet for their period settle; series silent for a
        stale rule's span (while their device goes on sending) raise it."""
        if clock <= self.clocks.get(ck, 0):
            return []
        self.clocks[ck] = clock
        keys = self.timed.get(ck)
        if not keys:
            return []
        out: list[Event] = []
        for key in sorted(keys):
            inst = self.engine.instances.get(key)
            if inst is None:
                continue
            out += self.engine.clock(key, clock)
            r = self.stale.get(inst.rule)
            if r is None or r.span is None or inst.level is not None or inst.last_ts is None:
                continue
            if clock - inst.last_ts >= r.span:
                out += self.engine.silence(r, inst.source, clock)
        return out

    def _sample(
        self,
        p: int,
        r: AlertRule,
        source: str,
        ts: int,
        value: Any,
        quality: str,
        unit: str | None,
        ref: float | None,
        now: float,
    ) -> list[Event]:
        v = None if value is None or isinstance(value, bool) else float(value)
        events = self.engine.sample(r, source, int(ts), v, quality, unit, ref)
        key = f"{r.id}/{source}"
        self._touch(p, key)
        if r.kind == "stale":
            self.arrived[key] = now
            if not events:
                self._time(self.engine.instances[key])  # events do it otherwise (_emit)
        return events

    def _touch(self, p: int, key: str) -> None:
        self.owner[key] = p
        self.dirty.setdefault(p, set()).add(key)

    def tick(self, now: float) -> None:
        stage = self.stage
        if self.stale and not stage.blind:  # no input reaching the worker is not the devices' silence
            drained = {p for p in stage.owned if not stage.behind(p)}
            for key in sorted({k for keys in self.timed.values() for k in keys}):
                inst = self.engine.instances.get(key)
                r = self.stale.get(inst.rule) if inst is not None else None
                p = self.owner.get(key)
                if inst is None or r is None or r.span is None or p not in drained or inst.level is not None:
                    continue
                quiet_ms = (now - max(self.arrived.get(key, now), stage.broker_back_at)) * 1000
                if inst.last_ts is not None and quiet_ms >= r.span:
                    # A silent device, its partition drained: the wall clock stands in for event time.
                    self._emit(p, self.engine.silence(r, inst.source, inst.last_ts + int(quiet_ms)))
        clocks = self.clocks
        for ev in self.engine.expire_shelves(
            int(time.time() * 1000), lambda inst: clocks.get(self._clock_of(inst))
        ):
            q = self.owner.get(ev["instance"])
            if q is not None:
                self._emit(q, [ev])

    def _emit(self, p: int, events: list[Event]) -> None:
        outbox = self.stage.outbox
        for ev in events:
            body = codec.dumps(ev)
            k = ev["instance"].encode()
            outbox.produce(self.topo.alerts_events_topic, k, body, ev["ts"])
            outbox.produce(self.topo.alerts_state_topic, k, body, ev["ts"])
            self._touch(p, ev["instance"])
            self.events += 1
            inst = self.engine.instances.get(ev["instance"])
            if inst is not None:
                self._time(inst)


def check_command(cmd: Any) -> dict[str, Any]:
    """An AlertCommand in its exact shape (schemas/alert-command.json), or ValueError saying what is wrong."""
    if not isinstance(cmd, dict):
        raise ValueError("an alert command is a JSON object")
    for k in ("id", "instance", "action", "by"):
        if not isinstance(cmd.get(k), str) or not cmd[k]:
            raise ValueError(f"{k} must be a non-empty string")
    if cmd["action"] not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
    if isinstance(cmd.get("at"), bool) or not isinstance(cmd.get("at"), int):
        raise ValueError("at must be epoch milliseconds")
    if cmd["action"] == "shelve":
        d = cmd.get("duration_ms")
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            raise ValueError("shelve needs duration_ms > 0")
    if cmd.get("comment") is not None and not isinstance(cmd["comment"], str):
        raise ValueError("comment must be a string")
    if cmd["instance"].count("/") not in (1, 3):
        raise ValueError("instance is rule/site/device/point or rule/loop")
    return cmd


class CommandRouting(Step):
    """``alerts.commands`` → ``alerts.samples``, under the key of the instance's samples (same partition)."""

    def __init__(self, topo: TopologyBase, counters: Any) -> None:
        self.topo, self.counters = topo, counters

    def process(self, msgs: list[Message]) -> None:
        from pipeline.stages.alerts.routing import command_key

        for m in msgs:
            if m.key() == HEARTBEAT_KEY or m.value() is None:
                continue
            try:
                cmd = check_command(codec.loads(m.value()))
            except (codec.JSONDecodeError, ValueError) as e:
                self.counters.rejected += 1
                self.stage.outbox.dead_letter(
                    self.topo.dlq_topic,
                    "alerts.commands",
                    f"invalid: alert command ({e})",
                    m.value(),
                    topic=self.topo.alerts_commands_topic,
                    partition=m.partition(),
                    offset=m.offset(),
                )
                continue
            body = codec.dumps({"k": "c", "c": cmd})
            self.stage.outbox.produce(
                self.topo.alert_samples_topic, command_key(cmd["instance"]), body, cmd["at"]
            )

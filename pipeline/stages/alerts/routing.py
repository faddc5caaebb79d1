"""What goes to the alerts stage: samples of the series that have rules, picked where they pass anyway.

The aggregation stage hands every ReadingBatch and every closed aggregate to :class:`AlertRouting`, the loops
stage every KPI record; the routing sends the samples some rule watches to ``alerts.samples`` (keyed by
``site/device``, or the loop id), together with the operator commands (``alerts.commands``, routed by
:class:`CommandRouting`), so that one stage, on one partition, sees everything about an alarm instance in
order. A device no rule names costs one dict lookup per batch.

Message shapes on ``alerts.samples`` (JSON): ``{"k": "r", "site", "device", "s": [[point, ts, value,
quality, unit], ...]}`` for readings, ``{"k": "a", "site", "device", "a": [aggregate, ...]}`` for aggregates,
``{"k": "k", "loop", "r": LoopKpi}`` for KPIs, ``{"k": "c", "c": AlertCommand}`` for commands.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

from pipeline.core import codec
from pipeline.stages.alerts.config import AlertRule

Produce = Callable[..., None]


class AlertRouting:
    def __init__(self, topic: str, rules: Iterable[AlertRule]) -> None:
        self.topic = topic
        rules = list(rules)
        self.reading_rules = [r for r in rules if r.input == "readings"]
        self.agg_rules = [r for r in rules if r.input == "agg_1m"]
        self.kpi_rules = [r for r in rules if r.input == "kpi"]
        self.refs = {r.reference_point for r in self.reading_rules if r.reference_point}
        self._devices: dict[tuple[str, str], list[AlertRule] | None] = {}
        self._points: dict[tuple[str, str, str], Watch | None] = {}
        self._aggs: dict[str, bool] = {}
        self.routed = 0

    def _device(self, site: str, device: str) -> list[AlertRule] | None:
        """The reading rules whose site and device patterns match (None: no rule here)."""
        found = []
        for r in self.reading_rules:
            ps, pd, _ = r.match.split("/", 2)
            if fnmatch.fnmatchcase(site, ps) and fnmatch.fnmatchcase(device, pd):
                found.append(r)
        return found or None

    def _watch(self, site: str, device: str, point: str, rules: list[AlertRule]) -> Watch | None:
        key = (site, device, point)
        if key not in self._points:
            series = f"{site}/{device}/{point}"
            mine = [r for r in rules if r.matches(series)]
            self._points[key] = (
                Watch(mine, reference=point in self.refs) if mine or point in self.refs else None
            )
        return self._points[key]

    def readings(self, produce: Produce, batch: dict[str, Any], until: int | None = None) -> None:
        site, device = batch["site"], batch["device"]
        dev = (site, device)
        if dev not in self._devices:
            self._devices[dev] = self._device(site, device)
        rules = self._devices[dev]
        if rules is None and not self.refs:
            return
        samples = []
        for r in batch["readings"]:
            ts = r["ts"]
            if until is not None and ts > until:
                continue
            w = self._watch(site, device, r["point"], rules or [])
            if w is not None and w.wants(ts, r["value"], r["quality"]):
                samples.append([r["point"], ts, r["value"], r["quality"], r.get("unit")])
        if samples:
            body = {"k": "r", "site": site, "device": device, "s": samples}
            produce(self.topic, f"{site}/{device}".encode(), codec.dumps(body), max(s[1] for s in samples))
            self.routed += len(samples)

    def aggregates(self, produce: Produce, aggs: list[dict[str, Any]]) -> None:
        if not self.agg_rules:
            return
        by_dev: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for a in aggs:
            hit = self._aggs.get(a["series"])
            if hit is None:
                hit = self._aggs[a["series"]] = any(r.matches(a["series"]) for r in self.agg_rules)
            if hit:
                by_dev.setdefault((a["site"], a["device"]), []).append(a)
        for (site, device), items in by_dev.items():
            body = {"k": "a", "site": site, "device": device, "a": items}
            ts = max(a["window_start"] for a in items)
            produce(self.topic, f"{site}/{device}".encode(), codec.dumps(body), ts)
            self.routed += len(items)

    def kpis(self, produce: Produce, rec: dict[str, Any]) -> None:
        if any(r.matches(rec["loop"]) for r in self.kpi_rules):
            body = {"k": "k", "loop": rec["loop"], "r": rec}
            produce(self.topic, rec["loop"].encode(), codec.dumps(body), rec["window_start"])
            self.routed += 1


class Watch:
    """Which readings of one series the alerts stage needs.

    Every reading, where a rule of the series is not a plain threshold (rate, deviation, quality and stale
    rules look at every sample) or the series is a deviation reference. For threshold rules only, a reading
    well inside every limit, after others like it for longer than the rules' delays, changes nothing but the
    instance's newest value: those stay behind. Routed are the readings beyond the loosest limit (the limit
    less the deadband), every reading for ``hold`` ms after one of them (a return's off-delay, a pending raise
    being reset), and the first reading after that; where the series has crossed its limits often enough to
    be chattering, the hold is the chatter period (so that it settles at the same reading). The transitions
    are exactly those of every reading (a property test says so). After a start the series is held open.
    """

    __slots__ = (
        "after",
        "chat",
        "episodes",
        "everything",
        "hold",
        "levels",
        "n_chat",
        "tail",
        "until",
        "within",
    )

    def __init__(self, rules: list[AlertRule], reference: bool = False) -> None:
        self.everything = reference or any(r.kind != "threshold" for r in rules)
        self.levels = [(lv, r.deadband) for r in rules for lv in r.levels]
        self.hold = max((max(r.on_delay, r.off_delay) for r in rules), default=0)
        chatter = [r.chatter for r in rules if r.chatter is not None]
        self.n_chat = min((c.activations for c in chatter), default=0)
        # Raises are counted from their episode's start, up to an on-delay earlier.
        self.within = max((c.within for c in chatter), default=0) + max(
            (r.on_delay for r in rules), default=0
        )
        self.episodes: list[int] = []  # starts of beyond stretches within `within`
        self.chat = False  # crossings enough to be chattering: hold for the chatter period
        self.until: int | None = None  # route every reading up to this event time
        self.after = False  # the last good reading was beyond
        self.tail = False  # readings were routed for the hold: route the first one after it too

    def wants(self, ts: int, value: float, quality: str) -> bool:
        if self.everything:
            return True
        if self.until is None:
            # Unknown since the start: the engine may be mid-transition or chattering.
            self.until = ts + max(self.hold, self.within)
            self.after = self.chat = True
        if quality != "good":
            # Not a process value: it starts or ends nothing, but the engine sees it where it might settle.
            return self.after or ts <= self.until or self.tail  # the tail waits for a good one
        if any(lv.holds(value, db) for lv, db in self.levels):
            if not self.after and self.n_chat:
                self.episodes = [t for t in self.episodes if t > ts - self.within] + [ts]
                self.chat = self.chat or len(self.episodes) >= self.n_chat
            self.after = True
            self.until = max(self.until, ts + (max(self.hold, self.within) if self.chat else self.hold))
            return True
        if self.after:
            # The first reading back inside: a return's off-delay (or a reset raise) starts here.
            self.after = False
            self.tail = True
            self.until = max(self.until, ts + self.hold)
            return True
        if ts <= self.until:
            self.tail = True
            return True
        self.chat = False  # past the chatter period too: a chattering instance has settled by now
        if self.tail:
            self.tail = False  # the first reading past the hold: where a delay that just ran out completes
            return True
        return False


def command_key(instance: str) -> bytes:
    """The key an instance's samples travel under: ``site/device`` of ``rule/site/device/point``, or the loop
    id of ``rule/loop``."""
    parts = instance.split("/")
    if len(parts) >= 4:
        return f"{parts[1]}/{parts[2]}".encode()
    return parts[-1].encode()

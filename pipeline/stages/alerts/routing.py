"""What goes to the alerts stage: samples of the series that have rules, picked where they pass anyway.

The aggregation stage hands every ReadingBatch and every closed aggregate to :class:`AlertRouting`, the loops
stage every KPI record; the routing sends the samples some rule watches to ``alerts.samples`` (keyed by
``site/device``, or the loop id), together with the operator commands (``alerts.commands``, routed by
:class:`CommandRouting`), so that one stage, on one partition, sees everything about an alarm instance in
order. A device no rule names costs one dict lookup per batch.

Message shapes on ``alerts.samples`` (JSON): ``{"k": "r", "site", "device", "t": clock, "s": [[point, ts,
value, quality, unit], ...]}`` for readings (``t``: the device's newest event time; ``s`` may be empty),
``{"k": "a", "site", "device", "a": [aggregate, ...]}`` for aggregates, ``{"k": "k", "loop", "r": LoopKpi}``
for KPIs, ``{"k": "c", "c": AlertCommand}`` for commands.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from pipeline.core import codec
from pipeline.core.records import Scan
from pipeline.stages.alerts.config import AlertRule, RuleIndex

Produce = Callable[..., None]

TICK_MS = 1000  # how often, in event time, a device's clock goes to the alerts stage alone


class AlertRouting:
    def __init__(self, topic: str, rules: Iterable[AlertRule], tick_ms: int = TICK_MS) -> None:
        self.topic = topic
        self.tick_ms = tick_ms
        rules = list(rules)
        self.reading_rules = RuleIndex(r for r in rules if r.input == "readings")
        self.agg_rules = RuleIndex(r for r in rules if r.input == "agg_1m")
        self.kpi_rules = RuleIndex(r for r in rules if r.input == "kpi")
        self.refs = {r.reference_point for r in rules if r.input == "readings" and r.reference_point}
        self._devices: dict[tuple[str, str], _Device | None] = {}
        self._aggs: dict[str, bool] = {}
        self.routed = 0
        self.ticks = 0

    def _device(self, site: str, device: str) -> _Device | None:
        """The reading rules whose site and device patterns match (None: no rule and no reference here)."""
        found = self.reading_rules.for_device(site, device)
        return _Device(site, device, self.reading_rules, found, self.refs) if found or self.refs else None

    def _lookup(self, site: str, device: str) -> _Device | None:
        d = self._devices.get((site, device), _MISSING)
        if d is _MISSING:
            d = self._devices[(site, device)] = self._device(site, device)
        assert d is None or isinstance(d, _Device)
        return d

    def _quiet(
        self, produce: Produce, d: _Device, values: list[float], times: list[int], until: int | None
    ) -> bool:
        """A whole batch inside the device's band, after every watch came to rest: nothing to route, and no
        watch would change (the common case, at the cost of a few C-level passes, not a loop)."""
        if not (d.quiet and values and d.lo <= min(values) and max(values) <= d.hi):
            return False
        last = max(times)
        if min(times) <= d.rest or (until is not None and last > until):
            return False
        if last > d.clock:
            d.clock = last
        self._tick(produce, d, [])
        return True

    def scan(self, produce: Produce, scan: Scan, until: int | None = None) -> None:
        """:meth:`readings` for a batch in columns: the quiet case straight from its columns."""
        d = self._lookup(scan.site, scan.device)
        if d is not None and not self._quiet(produce, d, scan.values, scan.ts, until):
            self.readings(produce, scan.batch(), until)  # type: ignore[arg-type]

    def readings(self, produce: Produce, batch: dict[str, Any], until: int | None = None) -> None:
        d = self._lookup(batch["site"], batch["device"])
        if d is None:
            return
        rs = batch["readings"]
        if d.quiet and rs and self._quiet(produce, d, [r["value"] for r in rs], [r["ts"] for r in rs], until):
            return
        samples = []
        watches = d.watches
        clock = d.clock
        for r in rs:
            ts = r["ts"]
            if until is not None and ts > until:
                continue
            if ts > clock:
                clock = ts
            point = r["point"]
            w = watches.get(point, _MISSING)
            if w is _MISSING:
                w = d.watch(point)
            if w is None:
                continue
            v = r["value"]
            # The common case inline: a good reading inside the band of a series at rest.
            if ts > w.rest and w.lo <= v <= w.hi and r["quality"] == "good":
                continue
            if w.wants(ts, v, r["quality"]):
                samples.append([point, ts, r["value"], r["quality"], r.get("unit")])
        d.clock = clock
        d.rest = max((w.rest for w in watches.values() if w is not None), default=-math.inf)
        self._tick(produce, d, samples)

    def _tick(self, produce: Produce, d: _Device, samples: list[list[Any]]) -> None:
        """The device's clock travels with its samples, and alone (a tick) once per tick_ms of event time
        where nothing else is routed: chattering alarms settle and stale rules fire by it."""
        clock = d.clock
        if samples or (d.rules and clock >= d.ticked + self.tick_ms):
            d.ticked = clock
            body = {"k": "r", "site": d.site, "device": d.device, "t": clock, "s": samples}
            produce(self.topic, d.key, codec.dumps(body), clock)
            self.routed += len(samples)
            self.ticks += not samples

    def aggregates(self, produce: Produce, aggs: list[dict[str, Any]]) -> None:
        if not self.agg_rules.any:
            return
        by_dev: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for a in aggs:
            hit = self._aggs.get(a["series"])
            if hit is None:
                hit = self._aggs[a["series"]] = bool(self.agg_rules.matching(a["series"]))
            if hit:
                by_dev.setdefault((a["site"], a["device"]), []).append(a)
        for (site, device), items in by_dev.items():
            body = {"k": "a", "site": site, "device": device, "a": items}
            ts = max(a["window_start"] for a in items)
            produce(self.topic, f"{site}/{device}".encode(), codec.dumps(body), ts)
            self.routed += len(items)

    def kpis(self, produce: Produce, rec: dict[str, Any]) -> None:
        if self.kpi_rules.any and self.kpi_rules.matching(rec["loop"]):
            body = {"k": "k", "loop": rec["loop"], "r": rec}
            produce(self.topic, rec["loop"].encode(), codec.dumps(body), rec["window_start"])
            self.routed += 1


_MISSING: Any = object()


class _Device:
    """One device's rules, the watches of its points (made on first sight), and its event-time clock."""

    __slots__ = (
        "clock",
        "device",
        "hi",
        "index",
        "key",
        "lo",
        "quiet",
        "refs",
        "rest",
        "rules",
        "site",
        "ticked",
        "watches",
    )

    def __init__(
        self, site: str, device: str, index: RuleIndex, rules: list[AlertRule], refs: set[str]
    ) -> None:
        self.site, self.device, self.index, self.rules, self.refs = site, device, index, rules, refs
        self.key = f"{site}/{device}".encode()
        self.watches: dict[str, Watch | None] = {}
        self.clock = 0  # the newest event time among its readings
        self.ticked = 0  # the clock last sent
        # The batch-level shortcut: threshold rules only, and the band inside every rule of the device.
        self.quiet = not refs and all(r.kind == "threshold" for r in rules)
        band = Watch(rules)
        self.lo, self.hi = band.lo, band.hi
        self.rest: float = math.inf  # every watch at rest after this event time (inf: not known yet)

    def watch(self, point: str) -> Watch | None:
        series = f"{self.site}/{self.device}/{point}"
        mine = self.index.matching(series) if self.rules else []
        ref = point in self.refs
        w = self.watches[point] = Watch(mine, reference=ref) if mine or ref else None
        return w


class Watch:
    """Which readings of one series the alerts stage needs.

    Every reading, where a rule of the series is not a plain threshold (rate, deviation, quality and stale
    rules look at every sample) or the series is a deviation reference. For threshold rules only, a reading
    well inside every limit, after others like it for longer than the rules' delays, changes nothing but the
    instance's newest value: those stay behind. Routed are the readings beyond the loosest limit (the limit
    less the deadband), every reading for ``hold`` ms after one of them (a return's off-delay, a pending raise
    being reset), and the first reading after that. The engine's timers that run without readings (a
    chattering alarm settling, a stale series) run on the device clock the routing sends beside. After a
    start the watch knows nothing of the alarm, so it routes as if the last reading had been beyond. The
    transitions are exactly those of every reading (a property test says so).
    """

    __slots__ = ("after", "everything", "hi", "hold", "lo", "rest", "tail", "until")

    def __init__(self, rules: list[AlertRule], reference: bool = False) -> None:
        self.everything = reference or any(r.kind != "threshold" for r in rules)
        # The quiet band: inside every limit less its deadband, where a value calls for no level.
        self.lo, self.hi = -math.inf, math.inf
        for r in rules:
            for lv in r.levels:
                if lv.above is not None:
                    self.hi = min(self.hi, lv.above - r.deadband)
                elif lv.below is not None:
                    self.lo = max(self.lo, lv.below + r.deadband)
                elif lv.outside is not None:
                    self.hi = min(self.hi, lv.outside - r.deadband)
                    self.lo = max(self.lo, -(lv.outside - r.deadband))
        self.hold = max((max(r.on_delay, r.off_delay) for r in rules), default=0)
        self.until: int | None = None  # route every reading up to this event time
        self.after = False  # the last good reading was beyond
        self.tail = False  # readings were routed for the hold: route the first one after it too
        self.rest: float = math.inf  # at rest after this event time: good readings in the band stay behind

    def wants(self, ts: int, value: float, quality: str) -> bool:
        routed = self._wants(ts, value, quality)
        if not (self.everything or self.after or self.tail) and self.until is not None:
            self.rest = self.until
        else:
            self.rest = math.inf
        return routed

    def _wants(self, ts: int, value: float, quality: str) -> bool:
        if self.everything:
            return True
        if self.until is None:
            # Unknown since the start: the engine may be mid-transition.
            self.until = ts + self.hold
            self.after = True
        if quality != "good":
            # Not a process value: it starts or ends nothing, but the engine sees it where a delay may end.
            return self.after or ts <= self.until or self.tail  # the tail waits for a good one
        if not self.lo <= value <= self.hi:  # beyond a limit (or not a number)
            self.after = True
            self.until = max(self.until, ts + self.hold)
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

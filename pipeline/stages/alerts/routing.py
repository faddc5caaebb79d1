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
        self._devices: dict[tuple[str, str], tuple[list[str], list[str]] | None] = {}
        self._points: dict[tuple[str, str, str], bool] = {}
        self._aggs: dict[str, bool] = {}
        self.routed = 0

    def _device(self, site: str, device: str, rules: list[AlertRule]) -> list[str] | None:
        """The point patterns of the rules whose site and device patterns match (None: no rule here)."""
        pats = []
        for r in rules:
            ps, pd, pp = r.match.split("/", 2)
            if fnmatch.fnmatchcase(site, ps) and fnmatch.fnmatchcase(device, pd):
                pats.append(pp)
        return pats or None

    def _wanted(self, site: str, device: str, point: str, pats: list[str]) -> bool:
        key = (site, device, point)
        hit = self._points.get(key)
        if hit is None:
            hit = point in self.refs or any(fnmatch.fnmatchcase(point, p) for p in pats)
            self._points[key] = hit
        return hit

    def readings(self, produce: Produce, batch: dict[str, Any], until: int | None = None) -> None:
        site, device = batch["site"], batch["device"]
        dev = (site, device)
        if dev not in self._devices:
            pats = self._device(site, device, self.reading_rules)
            self._devices[dev] = (pats, []) if pats else None
        entry = self._devices[dev]
        if entry is None:
            return
        pats = entry[0]
        samples = [
            [r["point"], r["ts"], r["value"], r["quality"], r.get("unit")]
            for r in batch["readings"]
            if (until is None or r["ts"] <= until) and self._wanted(site, device, r["point"], pats)
        ]
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


def command_key(instance: str) -> bytes:
    """The key an instance's samples travel under: ``site/device`` of ``rule/site/device/point``, or the loop
    id of ``rule/loop``."""
    parts = instance.split("/")
    if len(parts) >= 4:
        return f"{parts[1]}/{parts[2]}".encode()
    return parts[-1].encode()

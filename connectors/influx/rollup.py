"""Hourly rollups from minute aggregates: the same combination as the ``agg_1h`` view of the SQL sinks.

Counts add up; ``mean`` is sum / good_count (the count-weighted mean of the minutes); ``first``/``last`` come
from the earliest/latest minute with good readings; the variance combines the minutes' variances and the
spread of their means around the hour's mean (Chan et al.'s parallel formula), so ``stddev`` is the sample
standard deviation of the hour's good readings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

HOUR_MS = 3_600_000


def hour_of(ts_ms: int) -> int:
    return ts_ms - ts_ms % HOUR_MS


def combine(minutes: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The ``agg_1h`` fields of one series' minutes of one hour (each with ``window_start`` and the stats)."""
    ms = sorted(minutes, key=lambda m: m["window_start"])
    if not ms:
        raise ValueError("no minutes to combine")
    count = sum(int(m["count"]) for m in ms)
    good = sum(int(m["good_count"]) for m in ms)
    sums = [m["sum"] for m in ms if m.get("sum") is not None]
    total = math.fsum(sums) if sums else None
    mean = total / good if total is not None and good > 0 else None
    mins = [m["min"] for m in ms if m.get("min") is not None]
    maxs = [m["max"] for m in ms if m.get("max") is not None]
    with_good = [m for m in ms if int(m["good_count"]) > 0]
    stddev = None
    if good >= 2 and mean is not None:
        terms = [
            (m["stddev"] ** 2 * (m["good_count"] - 1) if m.get("stddev") is not None else 0.0)
            + m["good_count"] * (m["mean"] - mean) ** 2
            for m in ms
            if m.get("mean") is not None
        ]
        if terms:
            stddev = math.sqrt(max(0.0, math.fsum(terms) / (good - 1)))
    first = ms[0]
    return {
        "site": first["site"],
        "device": first["device"],
        "point": first["point"],
        "unit": first.get("unit"),
        "window_start": hour_of(int(first["window_start"])),
        "count": count,
        "good_count": good,
        "min": min(mins) if mins else None,
        "max": max(maxs) if maxs else None,
        "mean": mean,
        "sum": total if good > 0 else None,
        "first": with_good[0].get("first") if with_good else None,
        "last": with_good[-1].get("last") if with_good else None,
        "stddev": stddev,
    }


@dataclass(slots=True)
class Hour:
    """One series' hour, combined minute by minute (Chan et al.'s merge), with the minutes it holds as a
    bitmask: a minute seen before cannot be taken out again (min, max), so :meth:`add` refuses it and the
    writer reads the hour back instead."""

    site: str
    device: str
    point: str
    unit: str | None
    start: int
    minutes: int = 0  # bit i: the minute start + i min is in
    count: int = 0
    good: int = 0
    total: float | None = None
    vn: int = 0  # good readings of the minutes with a mean
    vmean: float = 0.0
    m2: float = 0.0
    lo: float | None = None
    hi: float | None = None
    first: tuple[int, float] | None = None
    last: tuple[int, float] | None = None

    def add(self, m: dict[str, Any]) -> bool:
        ws = int(m["window_start"])
        bit = 1 << ((ws - self.start) // 60_000)
        if self.minutes & bit or not self.start <= ws < self.start + HOUR_MS:
            return False
        self.minutes |= bit
        g = int(m["good_count"])
        self.count += int(m["count"])
        self.good += g
        if m.get("sum") is not None:
            self.total = m["sum"] if self.total is None else self.total + m["sum"]
        if m.get("mean") is not None and g > 0:
            s = m.get("stddev")
            m2 = s * s * (g - 1) if s is not None else 0.0
            n = self.vn + g
            delta = m["mean"] - self.vmean
            self.vmean += delta * g / n
            self.m2 += m2 + delta * delta * self.vn * g / n
            self.vn = n
        if m.get("min") is not None:
            self.lo = m["min"] if self.lo is None else min(self.lo, m["min"])
        if m.get("max") is not None:
            self.hi = m["max"] if self.hi is None else max(self.hi, m["max"])
        if g > 0:
            if m.get("first") is not None and (self.first is None or ws < self.first[0]):
                self.first = (ws, m["first"])
            if m.get("last") is not None and (self.last is None or ws > self.last[0]):
                self.last = (ws, m["last"])
        return True

    def fields(self) -> dict[str, Any]:
        mean = self.total / self.good if self.total is not None and self.good > 0 else None
        stddev = None
        if self.good >= 2 and mean is not None and self.vn > 0:
            # Spread around the hour's mean: the minutes' own, plus their means' around it (as combine()).
            m2 = self.m2 + self.vn * (self.vmean - mean) ** 2
            stddev = math.sqrt(max(0.0, m2 / (self.good - 1)))
        return {
            "site": self.site,
            "device": self.device,
            "point": self.point,
            "unit": self.unit,
            "window_start": self.start,
            "count": self.count,
            "good_count": self.good,
            "min": self.lo,
            "max": self.hi,
            "mean": mean,
            "sum": self.total if self.good > 0 else None,
            "first": self.first[1] if self.first else None,
            "last": self.last[1] if self.last else None,
            "stddev": stddev,
        }


def hour_from(minutes: Iterable[dict[str, Any]]) -> Hour:
    """An :class:`Hour` of one series' minutes of one hour (read back from the database)."""
    ms = sorted(minutes, key=lambda m: m["window_start"])
    first = ms[0]
    h = Hour(
        first["site"], first["device"], first["point"], first.get("unit"), hour_of(first["window_start"])
    )
    for m in ms:
        h.add(m)
    return h

"""Hourly rollups from minute aggregates: the same combination as the ``agg_1h`` view of the SQL sinks.

Counts add up; ``mean`` is sum / good_count (the count-weighted mean of the minutes); ``first``/``last`` come
from the earliest/latest minute with good readings; the variance combines the minutes' variances and the
spread of their means around the hour's mean (Chan et al.'s parallel formula), so ``stddev`` is the sample
standard deviation of the hour's good readings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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

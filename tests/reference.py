"""The independent reference for aggregates: pandas ``resample('1min')`` (or ``'1h'``) over the on-time
readings."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pandas as pd

FIELDS = ("count", "good_count", "min", "max", "mean", "sum", "first", "last", "stddev")


def expected_aggregates(
    readings: Iterable[tuple[str, int, float, str]],
    freq: str = "1min",
) -> dict[tuple[str, int], dict[str, Any]]:
    """readings: (series, ts_ms, value, quality) → {(series, window_start_ms): fields}."""
    df = pd.DataFrame(list(readings), columns=["series", "ts", "value", "quality"])
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for series, g in df.groupby("series"):
        g = g.sort_values("ts", kind="stable")
        idx = pd.to_datetime(g["ts"], unit="ms")
        counts = pd.Series(1, index=idx).resample(freq).sum()
        good = g[g["quality"] == "good"]
        gs = pd.Series(good["value"].to_numpy(), index=pd.to_datetime(good["ts"], unit="ms"))
        r = gs.resample(freq)
        stats = pd.DataFrame(
            {
                "good_count": r.count(),
                "min": r.min(),
                "max": r.max(),
                "mean": r.mean(),
                "sum": r.sum(),
                "first": r.first(),
                "last": r.last(),
                "stddev": r.std(ddof=1),
            }
        )
        for ts, n in counts.items():
            if n == 0:
                continue
            ws = int(ts.value // 1_000_000)
            row: dict[str, Any] = {
                "count": int(n),
                "good_count": 0,
                "min": None,
                "max": None,
                "mean": None,
                "sum": None,
                "first": None,
                "last": None,
                "stddev": None,
            }
            if ts in stats.index and stats.loc[ts, "good_count"] > 0:
                s = stats.loc[ts]
                row.update({k: (None if pd.isna(s[k]) else float(s[k])) for k in FIELDS[2:]})
                row["good_count"] = int(s["good_count"])
            out[(str(series), ws)] = row
    return out


def close(a: float | None, b: float | None, rel: float = 1e-9, scale: float = 1.0) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=rel * scale)


def compare(
    actual: dict[tuple[str, int], dict[str, Any]],
    expected: dict[tuple[str, int], dict[str, Any]],
    scale: float = 1000.0,
) -> list[str]:
    """Differences, as readable lines (empty when equal field by field)."""
    problems = []
    for key in sorted(set(expected) - set(actual)):
        problems.append(f"missing window {key}")
    for key in sorted(set(actual) - set(expected)):
        problems.append(f"unexpected window {key}: {actual[key]}")
    for key in sorted(set(actual) & set(expected)):
        a, e = actual[key], expected[key]
        for f in FIELDS:
            if f in ("count", "good_count"):
                if a[f] != e[f]:
                    problems.append(f"{key} {f}: {a[f]} != {e[f]}")
            elif not close(a[f], e[f], scale=scale):
                problems.append(f"{key} {f}: {a[f]!r} != {e[f]!r}")
    return problems

"""Records to InfluxDB line protocol, one function per measurement (the sink's row mapping).

Measurements are named like the PostgreSQL tables; tags ``site``, ``device``, ``point`` (and ``unit`` where
known), or ``loop`` and ``kpi`` for ``kpi_results``; the statistics are fields, nulls left out; the timestamp
is the window start (``agg_1m``, ``agg_1h``, ``kpi_results``) or the reading's time (``readings``), in
milliseconds (the writer scales them to its precision). A point with the same measurement, tags and time
overwrites the previous one, so replays are idempotent. Each function raises on a record that is not what
it expects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

_TAG = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": "", "\r": ""})
_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": "", "\r": ""})
STAT_FIELDS = ("min", "max", "mean", "sum", "first", "last", "stddev")


def tag(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise TypeError(f"a tag value must be a non-empty string, got {v!r:.40}")
    out = v.translate(_TAG)
    if out.endswith("\\"):
        out += " "  # a trailing backslash would escape the separator that follows
    return out


def field_str(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _float(name: str, v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
        raise TypeError(f"{name} must be a finite number or null, got {v!r:.40}")
    return f"{name}={float(v)!r}"


def _int(name: str, v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an integer, got {v!r:.40}")
    return f"{name}={v}i"


def _tags(rec: dict[str, Any]) -> str:
    out = f"site={tag(rec['site'])},device={tag(rec['device'])},point={tag(rec['point'])}"
    unit = rec.get("unit")
    if unit:
        out += f",unit={tag(unit)}"
    return out


def aggregate_lines(a: dict[str, Any], measurement: str = "agg_1m") -> list[str]:
    fields = [_int("count", a["count"]), _int("good_count", a["good_count"])]
    for f in STAT_FIELDS:
        v = _float(f, a.get(f))
        if v is not None:
            fields.append(v)
    ts = a["window_start"]
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise TypeError(f"window_start must be epoch ms, got {ts!r:.40}")
    return [f"{measurement},{_tags(a)} {','.join(fields)} {ts}"]


def hour_lines(h: dict[str, Any]) -> list[str]:
    """An hourly rollup (:func:`connectors.influx.rollup.combine`) as an ``agg_1h`` point."""
    return aggregate_lines(h, "agg_1h")


def reading_lines(batch: dict[str, Any]) -> list[str]:
    """A validated ReadingBatch: one point per reading."""
    site, device = tag(batch["site"]), tag(batch["device"])
    out = []
    for r in batch["readings"]:
        tags = f"site={site},device={device},point={tag(r['point'])}"
        if r.get("unit"):
            tags += f",unit={tag(r['unit'])}"
        out.append(f"readings,{tags} value={float(r['value'])!r},quality={field_str(r['quality'])} {r['ts']}")
    return out


def kpi_lines(rec: dict[str, Any]) -> list[str]:
    """A LoopKpi record: one point per KPI (long format, as the ``kpi_results`` table)."""
    loop, ts, we, samples = tag(rec["loop"]), rec["window_start"], rec["window_end"], rec["samples"]
    for name, v in (("window_start", ts), ("window_end", we)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be epoch ms, got {v!r:.40}")
    common = [
        _int("samples", samples),
        _int("window_end", we),
        f"closed_by={field_str(str(rec['closed_by']))}",
    ]
    out = []
    for kpi, r in rec["kpis"].items():
        fields = [f"status={field_str(str(r['status']))}"]
        for f in ("value", "coverage", "horizon_s"):
            v = _float(f, r.get(f))
            if v is not None:
                fields.append(v)
        if r.get("reason") is not None:
            fields.append(f"reason={field_str(str(r['reason']))}")
        out.append(f"kpi_results,loop={loop},kpi={tag(kpi)} {','.join(fields + common)} {ts}")
    return out


def _bool(name: str, v: Any) -> str:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be true or false, got {v!r:.40}")
    return f"{name}={'true' if v else 'false'}"


def alarm_lines(ev: dict[str, Any]) -> list[str]:
    """An AlertEvent as an ``alarm_events`` point: tags rule, source, transition; a command's point is at the
    time it was given (two commands at one event time stay two points)."""
    ts = ev["at"] if ev.get("command") is not None else ev["ts"]
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise TypeError(f"ts must be epoch ms, got {ts!r:.40}")
    fields = [
        f"id={field_str(str(ev['id']))}",
        _int("seq", ev["seq"]),
        f"state={field_str(str(ev['state']))}",
        _bool("active", ev["active"]),
        _bool("notify", ev["notify"]),
        f"message={field_str(str(ev['message']))}",
    ]
    if ev.get("severity") is not None:
        fields.append(f"severity={field_str(str(ev['severity']))}")
    for f in ("value", "limit"):
        v = _float(f, ev.get(f))
        if v is not None:
            fields.append(v)
    for f in ("by", "comment"):
        if ev.get(f) is not None:
            fields.append(f"{f}={field_str(str(ev[f]))}")
    tags = f"rule={tag(ev['rule'])},source={tag(ev['source'])},transition={tag(ev['transition'])}"
    return [f"alarm_events,{tags} {','.join(fields)} {ts}"]


LINES: dict[str, tuple[Callable[[Any], list[str]], str]] = {
    "agg_1m": (aggregate_lines, "aggregate"),
    "readings": (reading_lines, "ReadingBatch"),
    "kpi_results": (kpi_lines, "LoopKpi"),
    "alarm_events": (alarm_lines, "AlertEvent"),
}

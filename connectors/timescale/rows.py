"""Records to rows of the PostgreSQL tables, one function per table (the sink's row mapping).

Each function raises KeyError, TypeError or ValueError when its input is not the record it expects; the
sink then hands that record back as refused, with the reason, for the dead-letter topic.
``kpi_results`` is long format, one row per loop, KPI window and KPI, so that one KPI of one loop over time
is a plain indexed query and a new KPI needs no schema change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pipeline.core import codec

_DT: dict[int, datetime] = {}  # aggregates share their window bounds: one datetime per minute, not per row


def ms_to_dt(ms: int) -> datetime:
    dt = _DT.get(ms)
    if dt is None:
        if len(_DT) >= 4096:
            _DT.clear()
        dt = _DT[ms] = datetime.fromtimestamp(ms / 1000.0, UTC)
    return dt


def _str(x: Any) -> str:
    if not isinstance(x, str):
        raise TypeError(f"expected a string, got {type(x).__name__}")
    return x


def _int(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"expected an integer, got {type(x).__name__}")
    return x


def _num(x: Any) -> float | None:
    """A finite number or null: what a double precision column takes (the driver must never see more)."""
    if type(x) is float and x - x == 0.0:  # the usual case, in one test (false for NaN and ±inf)
        return x
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise TypeError(f"expected a number or null, got {type(x).__name__}")
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"expected a finite number, got {x!r}")
    return v


def aggregate_row(a: dict[str, Any]) -> tuple[Any, ...]:
    unit = a.get("unit")
    return (
        ms_to_dt(_int(a["window_start"])),
        _str(a["series"]),
        _str(a["site"]),
        _str(a["device"]),
        _str(a["point"]),
        _int(a["count"]),
        _int(a["good_count"]),
        _num(a["min"]),
        _num(a["max"]),
        _num(a["mean"]),
        _num(a["sum"]),
        _num(a["first"]),
        _num(a["last"]),
        _num(a["stddev"]),
        None if unit is None else _str(unit),
        ms_to_dt(_int(a["window_end"])),
    )


def reading_rows(batch: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of a validated ReadingBatch, one per reading."""
    site, device = batch["site"], batch["device"]
    prefix = f"{site}/{device}/"
    return [
        (
            ms_to_dt(r["ts"]),
            prefix + r["point"],
            r["value"],
            r["quality"],
            site,
            device,
            r["point"],
            r.get("unit"),
            codec.dumps(r["status"]).decode() if "status" in r else None,
        )
        for r in batch["readings"]
    ]


def kpi_rows(rec: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of one LoopKpi record."""
    ws, we = ms_to_dt(_int(rec["window_start"])), ms_to_dt(_int(rec["window_end"]))
    loop, samples, closed_by = _str(rec["loop"]), _int(rec["samples"]), _str(rec["closed_by"])
    rows = []
    for name, r in rec["kpis"].items():
        value = r["value"]
        rows.append(
            (
                ws,
                loop,
                _str(name),
                _num(value),
                _str(r["status"]),
                _num(r.get("coverage")),
                _num(r.get("horizon_s")),
                None if r.get("reason") is None else _str(r["reason"]),
                codec.dumps(r.get("extras") or {}).decode(),
                we,
                samples,
                closed_by,
            )
        )
    return rows


def command_row(result: dict[str, Any]) -> tuple[Any, ...]:
    """A CommandResult as a write_commands row."""
    return (
        _str(result["id"]),
        _str(result["point"]),
        _num(result["value"]),
        _int(result["priority"]),
        _str(result["requested_by"]),
        ms_to_dt(_int(result["requested_at"])),
        _str(result["status"]),
        None if result.get("error") is None else _str(result["error"]),
        ms_to_dt(_int(result["completed_at"])),
        None if result.get("source") is None else _str(result["source"]),
    )


ALARM_COLUMNS = (
    "instance",
    "rule",
    "source",
    "seq",
    "ts",
    "transition",
    "state",
    "active",
    "severity",
    "value",
    "limit",
    "unit",
    "message",
    "labels",
    "shelved_until",
    "suppressed",
    "out_of_service",
    "chattering",
    "notify",
)


def _bool(x: Any) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"expected true or false, got {type(x).__name__}")
    return x


def alarm_values(ev: dict[str, Any]) -> tuple[Any, ...]:
    """The columns both alarm tables have, from an AlertEvent."""
    shelved = ev.get("shelved_until")
    return (
        _str(ev["instance"]),
        _str(ev["rule"]),
        _str(ev["source"]),
        _int(ev["seq"]),
        ms_to_dt(_int(ev["ts"])),
        _str(ev["transition"]),
        _str(ev["state"]),
        _bool(ev["active"]),
        None if ev.get("severity") is None else _str(ev["severity"]),
        _num(ev.get("value")),
        _num(ev.get("limit")),
        None if ev.get("unit") is None else _str(ev["unit"]),
        _str(ev["message"]),
        codec.dumps(ev.get("labels") or {}).decode(),
        None if shelved is None else ms_to_dt(_int(shelved)),
        _bool(ev["suppressed"]),
        _bool(ev["out_of_service"]),
        _bool(ev["chattering"]),
        _bool(ev["notify"]),
    )


def alarm_event_row(ev: dict[str, Any]) -> tuple[Any, ...]:
    """An AlertEvent as an alarm_events row (the journal)."""
    at = ev.get("at")
    return (
        _str(ev["id"]),
        *alarm_values(ev),
        None if ev.get("by") is None else _str(ev["by"]),
        None if ev.get("comment") is None else _str(ev["comment"]),
        None if ev.get("command") is None else _str(ev["command"]),
        None if at is None else ms_to_dt(_int(at)),
    )


# table -> (rows of one record, what the record is called in a refusal)
ROWS: dict[str, tuple[Callable[[Any], list[tuple[Any, ...]]], str]] = {
    "agg_1m": (lambda a: [aggregate_row(a)], "aggregate"),
    "readings": (reading_rows, "ReadingBatch"),
    "kpi_results": (kpi_rows, "LoopKpi"),
    "write_commands": (lambda r: [command_row(r)], "command result"),
    "alarm_events": (lambda e: [alarm_event_row(e)], "AlertEvent"),
    "alarms": (lambda e: [alarm_values(e)], "AlertEvent"),
}

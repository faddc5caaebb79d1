"""Records to rows of the PostgreSQL tables, one function per table (the sink's row mapping).

Each function raises KeyError, TypeError or ValueError when its input is not the record it expects; the
sink then hands that record back as refused, with the reason, for the dead-letter topic.
``kpi_results`` is long format, one row per loop, KPI window and KPI, so that one KPI of one loop over time
is a plain indexed query and a new KPI needs no schema change.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pipeline.core import codec


def ms_to_dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000.0, UTC)


def aggregate_row(a: dict[str, Any]) -> tuple[Any, ...]:
    return (
        ms_to_dt(a["window_start"]),
        a["series"],
        a["site"],
        a["device"],
        a["point"],
        a["count"],
        a["good_count"],
        a["min"],
        a["max"],
        a["mean"],
        a["sum"],
        a["first"],
        a["last"],
        a["stddev"],
        a.get("unit"),
        ms_to_dt(a["window_end"]),
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
    ws, we = ms_to_dt(int(rec["window_start"])), ms_to_dt(int(rec["window_end"]))
    loop, samples, closed_by = str(rec["loop"]), int(rec["samples"]), str(rec["closed_by"])
    rows = []
    for name, r in rec["kpis"].items():
        value = r["value"]
        rows.append(
            (
                ws,
                loop,
                str(name),
                None if value is None else float(value),
                str(r["status"]),
                None if r.get("coverage") is None else float(r["coverage"]),
                None if r.get("horizon_s") is None else float(r["horizon_s"]),
                r.get("reason"),
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
        str(result["id"]),
        str(result["point"]),
        None if result["value"] is None else float(result["value"]),
        int(result["priority"]),
        str(result["requested_by"]),
        ms_to_dt(int(result["requested_at"])),
        str(result["status"]),
        result.get("error"),
        ms_to_dt(int(result["completed_at"])),
        result.get("source"),
    )


# table -> (rows of one record, what the record is called in a refusal)
ROWS: dict[str, tuple[Callable[[Any], list[tuple[Any, ...]]], str]] = {
    "agg_1m": (lambda a: [aggregate_row(a)], "aggregate"),
    "readings": (reading_rows, "ReadingBatch"),
    "kpi_results": (kpi_rows, "LoopKpi"),
    "write_commands": (lambda r: [command_row(r)], "command result"),
}

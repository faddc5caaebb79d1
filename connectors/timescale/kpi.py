"""The ``kpi_results`` table: one row per loop, KPI window and KPI, written from LoopKpi records.

Long format — ``(loop_id, kpi, window_start)`` is the key, with value, status, coverage, horizon, reason and
the KPI's extras (jsonb) as columns — so that one KPI of one loop over time is a plain indexed query for a
dashboard, and a new KPI needs no schema change. The table itself is created with the sink's others by
:func:`connectors.timescale.schema.create_schema` (hypertable or monthly partitions on ``window_start``).

The rows are written by :class:`connectors.timescale.writer.PostgresWriter` like every other sink table:
rows and Kafka offsets in one transaction, replays skipped, temporary errors retried, refused rows handed
back for the dead-letter topic.
"""

from __future__ import annotations

import logging
from typing import Any

from connectors.timescale.writer import COLUMNS as WRITER_COLUMNS
from connectors.timescale.writer import ms_to_dt
from pipeline import codec

log = logging.getLogger("plantstream.postgres")

COLUMNS = WRITER_COLUMNS["kpi_results"]


def kpi_rows(rec: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of one LoopKpi record; KeyError/TypeError/ValueError when it is not one."""
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

"""The ``kpi_results`` table: one row per loop, KPI window and KPI, written from LoopKpi records.

Long format — ``(loop_id, kpi, window_start)`` is the key, with value, status, coverage, horizon, reason and
the KPI's extras (jsonb) as columns — so that one KPI of one loop over time is a plain indexed query for a
dashboard, and a new KPI needs no schema change. The table itself is created with the sink's others by
:func:`connectors.timescale.schema.create_schema` (hypertable or monthly partitions on ``window_start``).

Writes follow the sink pattern of :mod:`connectors.timescale.writer`: one transaction holds the upsert of
the batch's rows and the upsert of its Kafka offsets into ``sink_offsets``; records at or below a stored
offset are skipped; a replayed record rewrites its rows with the same values. Temporary errors are retried
in place with capped backoff; after a permanent one the batch goes record by record under savepoints, and
the records the database refuses are handed back for the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from connectors.common.backoff import delays
from connectors.timescale.schema import month_bounds, partition_ddl
from connectors.timescale.writer import WriteResult, is_temporary, ms_to_dt
from pipeline import codec

log = logging.getLogger("plantstream.postgres")

TABLE = "kpi_results"
COLUMNS = (
    "window_start",
    "loop_id",
    "kpi",
    "value",
    "status",
    "coverage",
    "horizon_s",
    "reason",
    "extras",
    "window_end",
    "samples",
    "closed_by",
)
KEY = ("loop_id", "kpi", "window_start")


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


@dataclass
class KpiRecord:
    """One LoopKpi record's rows, with the Kafka position it came from."""

    partition: int
    offset: int
    rows: list[tuple[Any, ...]]
    source: Any = None  # what goes to the dead-letter topic if the database refuses it


class KpiWriter:
    def __init__(self, dsn: str, schema: str, consumer: str, *, max_backoff: float = 10.0) -> None:
        self.dsn = dsn
        self.schema = schema
        self.consumer = consumer
        self.max_backoff = max_backoff
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._partitioned: bool | None = None
        self._months: set[datetime] = set()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=False)
        return self._conn

    def _upsert(self) -> sql.Composed:
        return sql.SQL(
            "INSERT INTO {}.{} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}, written_at = now()"
        ).format(
            sql.Identifier(self.schema),
            sql.Identifier(TABLE),
            sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
            sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)),
            sql.SQL(", ").join(map(sql.Identifier, KEY)),
            sql.SQL(", ").join(
                sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c))
                for c in COLUMNS
                if c not in KEY
            ),
        )

    async def write(
        self, topic: str, records: Sequence[KpiRecord]
    ) -> tuple[WriteResult, list[tuple[KpiRecord, str]]]:
        """Write the records' rows and offsets; retries temporary errors forever.

        Returns the counts (rows) and the records the database refused for good, with the reason.
        """
        backoff = delays(0.2, self.max_backoff)
        while True:
            try:
                return await self._write_once(topic, records, one_by_one=False)
            except psycopg.Error as exc:
                await self.close()
                if not is_temporary(exc):
                    log.warning(
                        "%s: permanent error %s (%s); writing record by record",
                        TABLE,
                        getattr(exc, "sqlstate", None),
                        exc,
                    )
                    try:
                        return await self._write_once(topic, records, one_by_one=True)
                    except psycopg.Error as exc2:
                        await self.close()
                        if not is_temporary(exc2):
                            raise
                        exc = exc2
                delay = next(backoff)
                log.warning(
                    "%s: temporary database error %s (%s); retrying in %.1fs",
                    TABLE,
                    getattr(exc, "sqlstate", None),
                    str(exc).strip(),
                    delay,
                )
                await asyncio.sleep(delay)

    async def _ensure_partitions(
        self, conn: psycopg.AsyncConnection[Any], records: Sequence[KpiRecord]
    ) -> None:
        if self._partitioned is None:
            async with conn.cursor() as cur:
                await cur.execute(
                    "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = %s AND c.relname = %s",
                    (self.schema, TABLE),
                )
                row = await cur.fetchone()
            await conn.commit()
            self._partitioned = bool(row and row[0] == "p")
        if not self._partitioned:
            return
        months = {month_bounds(row[0])[0] for r in records for row in r.rows}
        for m in sorted(months - self._months):
            await conn.execute(partition_ddl(self.schema, TABLE, m))
            await conn.commit()
            self._months.add(m)

    async def _write_once(
        self, topic: str, records: Sequence[KpiRecord], one_by_one: bool
    ) -> tuple[WriteResult, list[tuple[KpiRecord, str]]]:
        conn = await self._connection()
        await self._ensure_partitions(conn, records)
        result = WriteResult()
        refused: list[tuple[KpiRecord, str]] = []
        upsert = self._upsert()
        ident = sql.Identifier(self.schema)
        async with conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                sql.SQL(
                    'SELECT partition, "offset" FROM {}.sink_offsets WHERE consumer = %s AND topic = %s '
                    "AND partition = ANY(%s) FOR UPDATE"
                ).format(ident),
                (self.consumer, topic, sorted({r.partition for r in records})),
            )
            stored = {p: o for p, o in await cur.fetchall()}
            fresh = [r for r in records if r.offset > stored.get(r.partition, -1)]
            result.skipped = len(records) - len(fresh)
            if not one_by_one:
                # The newest record of a key wins (a replayed window after an idle flush, say).
                rows: dict[tuple[Any, ...], tuple[Any, ...]] = {}
                for r in sorted(fresh, key=lambda r: (r.partition, r.offset)):
                    for row in r.rows:
                        rows[(row[1], row[2], row[0])] = row
                if rows:
                    await cur.executemany(upsert, list(rows.values()))
                result.written = len(rows)
            else:
                for r in fresh:
                    try:
                        async with conn.transaction():
                            await cur.executemany(upsert, r.rows)
                        result.written += len(r.rows)
                    except psycopg.Error as exc:
                        if is_temporary(exc):
                            raise
                        refused.append(
                            (
                                r,
                                f"database refused the record: {getattr(exc, 'sqlstate', '')} "
                                f"{str(exc).strip()}",
                            )
                        )
            top: dict[int, int] = {}
            for r in records:
                top[r.partition] = max(top.get(r.partition, -1), r.offset)
            await cur.executemany(
                sql.SQL(
                    'INSERT INTO {}.sink_offsets (consumer, topic, partition, "offset") '
                    "VALUES (%s, %s, %s, %s) "
                    'ON CONFLICT (consumer, topic, partition) DO UPDATE SET "offset" = '
                    'GREATEST(sink_offsets."offset", EXCLUDED."offset"), updated_at = now()'
                ).format(ident),
                [(self.consumer, topic, p, o) for p, o in top.items()],
            )
        return result, refused

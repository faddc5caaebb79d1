"""The ``write_commands`` audit table: one row per BACnet write command, from its CommandResult.

Rows are keyed by the command id and inserted with ``ON CONFLICT DO NOTHING``: a command has one result,
so a replayed results topic leaves the table as it was. Temporary database errors are retried with capped
backoff (SQLSTATE classes as in :mod:`connectors.timescale.writer`); a row the database refuses for good
is handed back for the dead-letter topic and the others are written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from connectors.common.backoff import delays
from connectors.timescale.writer import is_temporary, ms_to_dt

log = logging.getLogger("plantstream.postgres")

DDL = """
    CREATE TABLE IF NOT EXISTS {schema}.write_commands (
        id            text             PRIMARY KEY,
        point         text             NOT NULL,
        value         double precision,
        priority      smallint         NOT NULL,
        requested_by  text             NOT NULL,
        requested_at  timestamptz      NOT NULL,
        status        text             NOT NULL CHECK (status IN ('accepted', 'rejected', 'failed')),
        error         text,
        completed_at  timestamptz      NOT NULL,
        source        text,
        written_at    timestamptz      NOT NULL DEFAULT now()
    )"""
INDEX = (
    "CREATE INDEX IF NOT EXISTS write_commands_point_time ON {schema}.write_commands (point, requested_at)"
)
COLUMNS = (
    "id",
    "point",
    "value",
    "priority",
    "requested_by",
    "requested_at",
    "status",
    "error",
    "completed_at",
    "source",
)


def create_table(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        ident = sql.Identifier(schema)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        conn.execute(sql.SQL(DDL.format(schema="{schema}")).format(schema=ident))
        conn.execute(sql.SQL(INDEX.format(schema="{schema}")).format(schema=ident))


def row_of(result: dict[str, Any]) -> tuple[Any, ...]:
    """A CommandResult as a write_commands row; KeyError/TypeError/ValueError when it is not one."""
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


class CommandAuditWriter:
    def __init__(self, dsn: str, schema: str, *, max_backoff: float = 10.0) -> None:
        self.dsn = dsn
        self.schema = schema
        self.max_backoff = max_backoff
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def _insert(self) -> sql.Composed:
        return sql.SQL("INSERT INTO {}.write_commands ({}) VALUES ({}) ON CONFLICT (id) DO NOTHING").format(
            sql.Identifier(self.schema),
            sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS),
            sql.SQL(", ").join(sql.Placeholder() for _ in COLUMNS),
        )

    async def write(self, rows: Sequence[tuple[Any, ...]]) -> list[tuple[tuple[Any, ...], str]]:
        """Insert the rows in one transaction; returns the rows refused for good, with the reason."""
        backoff = delays(0.2, self.max_backoff)
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=False)
                async with self._conn.cursor() as cur:
                    await cur.executemany(self._insert(), list(rows))
                await self._conn.commit()
                return []
            except psycopg.Error as exc:
                await self.close()
                if not is_temporary(exc):
                    return await self._one_by_one(rows)
                delay = next(backoff)
                log.warning(
                    "write_commands: temporary database error %s (%s); retrying in %.1fs",
                    getattr(exc, "sqlstate", None),
                    str(exc).strip(),
                    delay,
                )
                await asyncio.sleep(delay)

    async def _one_by_one(self, rows: Sequence[tuple[Any, ...]]) -> list[tuple[tuple[Any, ...], str]]:
        refused = []
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            for row in rows:
                try:
                    await conn.execute(self._insert(), row)
                except psycopg.Error as exc:
                    if is_temporary(exc):
                        raise
                    refused.append((row, f"rejected by the database: {getattr(exc, 'sqlstate', '')} {exc}"))
        return refused

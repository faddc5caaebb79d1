"""Batched, idempotent writes into PostgreSQL/TimescaleDB, with the source offsets in the same transaction.

A batch is COPY'd into a temporary staging table and upserted with ``INSERT … ON CONFLICT DO UPDATE``;
the Kafka offsets of the batch are upserted into ``sink_offsets`` in the same transaction, and records at
or below a stored offset are skipped, so a replay neither duplicates nor rewrites rows. Errors are
classified by SQLSTATE class (as Telegraf's PostgreSQL output does): temporary ones are retried in place
with capped backoff; a permanent one makes the batch go row by row under savepoints, so only the records
the database refuses are handed back (to the dead-letter topic).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from connectors.common.backoff import delays
from connectors.timescale.rows import ALARM_COLUMNS
from connectors.timescale.schema import TIME_COLUMN, is_partitioned, month_bounds, partition_ddl

log = logging.getLogger("plantstream.postgres")

# SQLSTATE classes that judge a row on its merits: data exceptions (22: out of range, bad text), integrity
# (23: not null, check, unique), limits a row exceeds (54: an index row too large). Those rows go to the
# dead-letter topic. Every other error is about the database (08 connection, 40 rollback, 42 a table renamed
# or a privilege revoked, 53 resources, 55 lock not available, 57 shut down or cancelled, ...): the batch is
# retried with capped backoff, the input paused, nothing dead-lettered.
ROW_CLASSES = ("22", "23", "54")
# A database that stops answering (a host gone, a black-holed route) fails the connection within about 40 s
# instead of hanging the sink; the retry loop then takes over. Options the DSN sets itself win.
CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}

COLUMNS = {
    "agg_1m": (
        "bucket",
        "series",
        "site",
        "device",
        "point",
        "count",
        "good_count",
        "min",
        "max",
        "mean",
        "sum",
        "first",
        "last",
        "stddev",
        "unit",
        "window_end",
    ),
    "readings": ("time", "series", "value", "quality", "site", "device", "point", "unit", "status"),
    "write_commands": (
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
    ),
    "kpi_results": (
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
    ),
    "alarm_events": ("id", *ALARM_COLUMNS, "by", "comment", "command", "at"),
    "alarms": ALARM_COLUMNS,
}
KEYS = {
    "agg_1m": ("series", "bucket"),
    "readings": ("series", "time"),
    "kpi_results": ("loop_id", "kpi", "window_start"),
    "write_commands": ("id",),
    "alarm_events": ("id",),
    "alarms": ("instance",),
}
# Upserts that only replace an older row: the current state of an alarm is its newest event.
NEWER_ONLY = {"alarms": "seq"}
# tables that record when a row was last written
WRITTEN_AT = frozenset(("agg_1m", "kpi_results", "alarm_events", "alarms"))


_TS_TEXT: dict[datetime, str] = {}  # rows of a batch share few timestamps (the minute of their window)


def _ts_text(v: datetime) -> str:
    t = _TS_TEXT.get(v)
    if t is None:
        if len(_TS_TEXT) >= 8192:
            _TS_TEXT.clear()
        t = _TS_TEXT[v] = v.isoformat()
    return t


class _NoText(Exception):
    pass


def _str_text(v: str) -> str:
    if v.isprintable() and "\\" not in v:
        return v
    v = v.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    if not v.isprintable():
        raise _NoText
    return v


_CELL: dict[type, Callable[[Any], str]] = {
    float: float.__repr__,
    int: int.__repr__,
    str: _str_text,
    type(None): lambda _v: "\\N",
    datetime: _ts_text,
}


def copy_text(records: Sequence[Record]) -> bytes | None:
    """The rows in COPY's text format, each followed by its position (``ord``); None if a value is of a
    type not handled here (the caller then lets psycopg format the rows).

    psycopg formats a row value by value through its dumpers (~10 µs a row of 17 values here); the types of
    the sink's rows are few and plain, and their text form is Python's own (``repr`` of a finite float is
    exact and PostgreSQL reads it back to the same double).
    """
    cell = _CELL
    try:
        lines = ["\t".join([cell[type(v)](v) for v in r.row]) + f"\t{i}\n" for i, r in enumerate(records)]
    except (KeyError, _NoText):
        return None
    return "".join(lines).encode()


def is_temporary(exc: BaseException) -> bool:
    """Whether ``exc`` is about the database rather than the rows (retry the batch; see ROW_CLASSES)."""
    state = getattr(exc, "sqlstate", None) or ""
    if not state:
        # Without a server answer: connection-level trouble, or a value the client could not send (the row's).
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return state[:2] not in ROW_CLASSES


@dataclass
class Record:
    """One row to write, with the Kafka position it came from."""

    partition: int
    offset: int
    row: tuple[Any, ...]
    source: Any = None  # what goes to the dead-letter topic if the database refuses the row


@dataclass
class WriteResult:
    written: int = 0
    skipped: int = 0
    rejected: list[tuple[Record, str]] = field(default_factory=list)
    seconds: float = 0.0


class PostgresWriter:
    def __init__(
        self,
        dsn: str,
        schema: str,
        consumer: str,
        *,
        max_backoff: float = 10.0,
        on_retry: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.consumer = consumer
        self.max_backoff = max_backoff
        self.on_retry = on_retry
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._partitions_known: set[tuple[str, datetime]] = set()
        self._partitioned: dict[str, bool] = {}
        self._staged: set[str] = set()
        self._partition_function: bool | None = None  # deploy made schema.create_month_partition

    def forget_partitions(self, table: str) -> None:
        """After partitions were dropped: create them again if data for them still comes."""
        self._partitions_known = {k for k in self._partitions_known if k[0] != table}

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            given = psycopg.conninfo.conninfo_to_dict(self.dsn)
            options = {k: v for k, v in CONNECT_OPTIONS.items() if k not in given}
            self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=False, **options)
            self._staged.clear()
        return self._conn

    async def write(self, table: str, topic: str, records: Sequence[Record]) -> WriteResult:
        """Write ``records`` (rows of ``table``) and their offsets; retries temporary errors forever."""
        started = time.perf_counter()
        backoff = delays(0.2, self.max_backoff)
        while True:
            try:
                result = await self._write_once(table, topic, records)
                result.seconds = time.perf_counter() - started
                if result.written and log.isEnabledFor(logging.DEBUG):
                    tcol = COLUMNS[table].index(TIME_COLUMN[table])
                    times = [r.row[tcol] for r in records]
                    log.debug(
                        "%s: wrote %d rows (%d skipped) event time %s..%s in %.3fs",
                        table,
                        result.written,
                        result.skipped,
                        min(times),
                        max(times),
                        result.seconds,
                    )
                return result
            except psycopg.Error as exc:
                await self._discard()
                if not is_temporary(exc):
                    log.warning(
                        "%s: permanent error %s (%s); writing row by row",
                        table,
                        getattr(exc, "sqlstate", None),
                        exc,
                    )
                    result = await self._write_rows(table, topic, records)
                    result.seconds = time.perf_counter() - started
                    return result
                delay = next(backoff)
                log.warning(
                    "%s: temporary database error %s (%s); retrying in %.1fs",
                    table,
                    getattr(exc, "sqlstate", None),
                    str(exc).strip(),
                    delay,
                )
                if self.on_retry:
                    self.on_retry(exc)
                await asyncio.sleep(delay)

    async def _discard(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.close()
            finally:
                self._conn = None

    async def _stored_offsets(
        self, cur: psycopg.AsyncCursor[Any], topic: str, partitions: set[int]
    ) -> dict[int, int]:
        await cur.execute(
            sql.SQL(
                'SELECT partition, "offset" FROM {}.sink_offsets WHERE consumer = %s AND topic = %s '
                "AND partition = ANY(%s) FOR UPDATE"
            ).format(sql.Identifier(self.schema)),
            (self.consumer, topic, sorted(partitions)),
        )
        return {p: o for p, o in await cur.fetchall()}

    async def _store_offsets(
        self, cur: psycopg.AsyncCursor[Any], topic: str, records: Sequence[Record]
    ) -> None:
        top: dict[int, int] = {}
        for r in records:
            if r.offset > top.get(r.partition, -1):
                top[r.partition] = r.offset
        await cur.executemany(
            sql.SQL(
                'INSERT INTO {}.sink_offsets (consumer, topic, partition, "offset") VALUES (%s, %s, %s, %s) '
                'ON CONFLICT (consumer, topic, partition) DO UPDATE SET "offset" = '
                'GREATEST(sink_offsets."offset", EXCLUDED."offset"), updated_at = now()'
            ).format(sql.Identifier(self.schema)),
            [(self.consumer, topic, p, o) for p, o in top.items()],
        )

    async def _ensure_partitions(
        self, conn: psycopg.AsyncConnection[Any], table: str, records: Sequence[Record]
    ) -> None:
        if table not in self._partitioned:
            async with conn.cursor() as cur:
                await cur.execute(
                    "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = %s AND c.relname = %s",
                    (self.schema, table),
                )
                row = await cur.fetchone()
                if row is not None and row[0] == "p" and self._partition_function is None:
                    await cur.execute(
                        "SELECT to_regprocedure(%s)",
                        (f'"{self.schema}".create_month_partition(text, timestamptz)',),
                    )
                    fn = await cur.fetchone()
                    self._partition_function = bool(fn and fn[0])
            await conn.commit()
            if row is None:
                return  # not there (renamed away, not deployed): the write fails and is retried; nothing kept
            self._partitioned[table] = row[0] == "p"
        if not self._partitioned[table]:
            return
        tcol = COLUMNS[table].index(TIME_COLUMN[table])
        months = {month_bounds(t)[0] for t in {r.row[tcol] for r in records}}  # rows share few times
        missing = [m for m in months if (table, m) not in self._partitions_known]
        for m in missing:
            # A partition takes a lock on the table that queues every reader behind it while it waits (a
            # long dashboard query): wait 2 s at most, then retry the batch (55P03 is not about the rows).
            await conn.execute("SET LOCAL lock_timeout = '2s'")
            if self._partition_function:  # as the owner: the writer role may not run DDL itself
                await conn.execute(
                    sql.SQL("SELECT {}.create_month_partition(%s, %s)").format(sql.Identifier(self.schema)),
                    (table, m),
                )
            else:  # a schema deployed before the function existed: the sink's role owns the tables
                await conn.execute(partition_ddl(self.schema, table, m))
            await conn.commit()
            self._partitions_known.add((table, m))

    async def _stage(self, conn: psycopg.AsyncConnection[Any], table: str) -> str:
        name = f"stage_{table}"
        if name not in self._staged:
            # The staging table takes its column types from the real one; `ord` orders duplicates.
            await conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {}.{} INCLUDING DEFAULTS, ord bigint) "
                    "ON COMMIT DELETE ROWS"
                ).format(sql.Identifier(name), sql.Identifier(self.schema), sql.Identifier(table))
            )
            await conn.commit()
            self._staged.add(name)
        return name

    def _upsert(self, table: str, source: str) -> sql.Composed:
        cols = COLUMNS[table]
        keys = KEYS[table]
        updates = [c for c in cols if c not in keys]
        col_list = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
        set_list = sql.SQL(", ").join(
            sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c)) for c in updates
        )
        if table in WRITTEN_AT:
            set_list = sql.SQL("{}, written_at = now()").format(set_list)
        where: sql.Composable = sql.SQL("")
        if table in NEWER_ONLY:
            col = sql.Identifier(NEWER_ONLY[table])
            where = sql.SQL(" WHERE {}.{} < EXCLUDED.{}").format(sql.Identifier(table), col, col)
        return sql.SQL(
            "INSERT INTO {schema}.{table} ({cols}) SELECT DISTINCT ON ({keys}) {cols} FROM {source} "
            "ORDER BY {keys}, ord DESC ON CONFLICT ({keys}) DO UPDATE SET {updates}{where}"
        ).format(
            where=where,
            schema=sql.Identifier(self.schema),
            table=sql.Identifier(table),
            cols=col_list,
            keys=sql.SQL(", ").join(sql.Identifier(k) for k in keys),
            source=sql.Identifier(source),
            updates=set_list,
        )

    async def _write_once(self, table: str, topic: str, records: Sequence[Record]) -> WriteResult:
        conn = await self._connection()
        await self._ensure_partitions(conn, table, records)
        stage = await self._stage(conn, table)
        result = WriteResult()
        async with conn.transaction(), conn.cursor() as cur:
            stored = await self._stored_offsets(cur, topic, {r.partition for r in records})
            fresh = [r for r in records if r.offset > stored.get(r.partition, -1)]
            result.skipped = len(records) - len(fresh)
            if fresh:
                cols = ", ".join(f'"{c}"' for c in COLUMNS[table]) + ", ord"
                async with cur.copy(f"COPY {stage} ({cols}) FROM STDIN") as copy:
                    text = copy_text(fresh)
                    if text is not None:
                        await copy.write(text)
                    else:  # a value of a type the text form below does not know: psycopg's own
                        for i, r in enumerate(fresh):
                            await copy.write_row((*r.row, i))
                await cur.execute(self._upsert(table, stage))
                result.written = len(fresh)
            await self._store_offsets(cur, topic, records)
        return result

    async def _write_rows(self, table: str, topic: str, records: Sequence[Record]) -> WriteResult:
        """Row by row under savepoints, after a permanent error: keep what the database accepts."""
        conn = await self._connection()
        result = WriteResult()
        cols = COLUMNS[table]
        insert = sql.SQL("INSERT INTO {}.{} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}").format(
            sql.Identifier(self.schema),
            sql.Identifier(table),
            sql.SQL(", ").join(map(sql.Identifier, cols)),
            sql.SQL(", ").join(sql.Placeholder() * len(cols)),
            sql.SQL(", ").join(map(sql.Identifier, KEYS[table])),
            sql.SQL(", ").join(
                sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c))
                for c in cols
                if c not in KEYS[table]
            ),
        )
        async with conn.transaction(), conn.cursor() as cur:
            stored = await self._stored_offsets(cur, topic, {r.partition for r in records})
            for r in records:
                if r.offset <= stored.get(r.partition, -1):
                    result.skipped += 1
                    continue
                try:
                    async with conn.transaction():
                        await cur.execute(insert, r.row)
                    result.written += 1
                except psycopg.Error as exc:
                    if is_temporary(exc):
                        raise
                    result.rejected.append(
                        (r, f"database refused the row: {getattr(exc, 'sqlstate', '')} {str(exc).strip()}")
                    )
            await self._store_offsets(cur, topic, records)
        return result


def is_partitioned_sync(dsn: str, schema: str, table: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return is_partitioned(conn, schema, table)

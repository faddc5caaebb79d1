"""The PostgreSQL/TimescaleDB sink: the :class:`connectors.common.sink.SinkWriter` of ``type: postgres``.

Rows come from :mod:`connectors.timescale.rows`, the transaction (rows and source offsets together) from
:class:`connectors.timescale.writer.PostgresWriter`, the tables from :mod:`connectors.timescale.schema`.
On plain PostgreSQL a sink with ``retention`` drops whole monthly partitions older than it, at deploy and
then hourly while it writes (TimescaleDB does the same with its retention policy).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import psycopg

from connectors.common.sink import Entry, Refused, WriteResult
from connectors.timescale.rows import ROWS
from connectors.timescale.schema import create_schema, enforce_retention, refresh_hours
from connectors.timescale.tenancy import runtime_roles
from connectors.timescale.writer import PostgresWriter, Record

log = logging.getLogger("plantstream.postgres")

DAY_MS = 86_400_000
RETENTION_EVERY_S = 3600.0


def to_records(table: str, entries: Sequence[Entry]) -> tuple[list[Record], list[Refused]]:
    """The rows of ``entries`` for ``table``, and the entries that are not what the table holds."""
    to_rows, kind = ROWS[table]
    records: list[Record] = []
    refused: list[Refused] = []
    expand = table == "readings"  # one entry, many rows: a refused row is its own dead letter
    for e in entries:
        try:
            rows = to_rows(e.record)
        except Exception as exc:  # the mapping is pure: whatever it raises is about the record
            refused.append(Refused(e.partition, e.offset, e.source, f"invalid {kind}: {exc!r}"))
            continue
        records.extend(Record(e.partition, e.offset, row, None if expand else e.source) for row in rows)
    return records, refused


class PostgresSinkWriter:
    tables = frozenset(ROWS)

    def __init__(
        self,
        sink_id: str,
        dsn: str,
        schema: str,
        retention_ms: int | None,
        consumer: str,
        timescale: bool = True,
        admin_dsn: str | None = None,
    ) -> None:
        self.sink_id, self.dsn, self.schema, self.retention = sink_id, dsn, schema, retention_ms
        self.admin_dsn = admin_dsn or dsn  # deploy's: it creates what the runtime role may only use
        self.timescale = timescale
        self.writer = PostgresWriter(dsn, schema, consumer=consumer)
        self._retention_due = 0.0  # monotonic time of the next retention pass
        self._written_tables: set[str] = set()
        self._rollup: bool | None = None  # agg_1h is a continuous aggregate here (found on first write)

    def deploy(self, tables: Sequence[str], say: Callable[[str], None]) -> dict[str, str]:
        retention = self.retention
        kinds = create_schema(
            self.admin_dsn,
            self.schema,
            tuple(sorted(set(tables))),
            retention_days=max(1, retention // DAY_MS) if retention else None,
            timescale=self.timescale,
            say=lambda m: say(f"sink {self.sink_id}: {m}"),
        )
        for table, kind in kinds.items():
            say(f"sink {self.sink_id}: table {self.schema}.{table} ready ({kind})")
        roles = runtime_roles(self.schema)
        say(
            f"sink {self.sink_id}: runtime roles {roles['writer']} (writes; use it in the sink's dsn) and "
            f"{roles['readonly']} (reads every row; dashboards); set a password with "
            "`plantstream db password writer|readonly -t TOPOLOGY` (from $PLANTSTREAM_ROLE_PASSWORD or asked)"
        )
        if retention:
            self._retain(tuple(kinds), say, self.admin_dsn)
        return kinds

    def _retain(
        self, tables: tuple[str, ...], say: Callable[[str], None] = log.info, dsn: str | None = None
    ) -> None:
        assert self.retention
        dropped_by = enforce_retention(dsn or self.dsn, self.schema, tables, self.retention)
        for table, dropped in dropped_by.items():
            if dropped:
                say(f"sink {self.sink_id}: retention dropped {len(dropped)} partition(s) of {table}")
                self.writer.forget_partitions(table)

    async def write(self, table: str, topic: str, entries: Sequence[Entry]) -> WriteResult:
        records, refused = to_records(table, entries)
        out = WriteResult(refused=refused)
        if records:
            # alarm_events and alarms both come from alerts.events: their stored offsets must not mix.
            offsets_as = f"{topic}#alarms" if table == "alarms" else topic
            result = await self.writer.write(table, offsets_as, records)
            out.written, out.skipped = result.written, result.skipped
            seen: set[tuple[int, int]] = set()
            for rec, reason in result.rejected:
                if rec.source is None:
                    out.refused.append(Refused(rec.partition, rec.offset, repr(rec.row), reason))
                elif (rec.partition, rec.offset) not in seen:  # one dead letter per input record
                    seen.add((rec.partition, rec.offset))
                    out.refused.append(Refused(rec.partition, rec.offset, rec.source, reason))
        self._written_tables.add(table)
        if table == "agg_1m" and records and await asyncio.to_thread(self._can_refresh):
            hours = {r.row[0].replace(minute=0, second=0, microsecond=0) for r in records}
            try:
                await asyncio.to_thread(refresh_hours, self.dsn, self.schema, sorted(hours))
            except psycopg.Error as e:
                log.warning("agg_1h: refreshing %d hour(s) failed (%s); the policy will", len(hours), e)
        if self.retention and time.monotonic() >= self._retention_due:
            self._retention_due = time.monotonic() + RETENTION_EVERY_S
            await asyncio.to_thread(self._retain, tuple(sorted(self._written_tables)))
        return out

    def _can_refresh(self) -> bool:
        """Whether agg_1h is a continuous aggregate here that this sink's role may refresh.

        TimescaleDB lets only the owner refresh, and not from inside a function, so a SECURITY DEFINER
        wrapper cannot do it for the writer role: running as that role, the sink leaves rewritten hours to
        the refresh policy (every 10 minutes; newer hours are computed on read either way)."""
        if self._rollup is None:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT c.oid IS NOT NULL, pg_has_role(current_user, c.relowner, 'USAGE') "
                    "FROM (SELECT to_regclass(%s) AS oid) r LEFT JOIN pg_class c ON c.oid = r.oid",
                    (f'"{self.schema}".agg_1h_rollup',),
                ).fetchone()
            exists, owned = bool(row and row[0]), bool(row and row[1])
            if exists and not owned:
                log.info(
                    "agg_1h: this sink's role does not own %s.agg_1h_rollup; hours rewritten below the "
                    "materialized horizon are refreshed by its policy (within 10 minutes)",
                    self.schema,
                )
            self._rollup = exists and owned
        return self._rollup

    def forget(self, partitions: Sequence[int]) -> None:
        return None  # nothing kept in memory per partition

    async def close(self) -> None:
        await self.writer.close()

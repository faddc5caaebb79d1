"""Database schema of the PostgreSQL/TimescaleDB sink (docs/contracts.md) and its idempotent creation.

With the TimescaleDB extension: hypertables, compression and retention policies, and an hourly
continuous aggregate. Without it: native range partitioning by month, with partitions created ahead of
the data by the writer, and retention by dropping whole months (:func:`drop_old_partitions`). The tables
and the queries against them are the same either way. ``write_commands`` (the audit of BACnet writes) is a
plain table: a few rows a day, kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from connectors.timescale import tenancy

log = logging.getLogger("plantstream.postgres")

TABLES = {
    "agg_1m": """
        CREATE TABLE IF NOT EXISTS {schema}.agg_1m (
            bucket      timestamptz      NOT NULL,
            series      text             NOT NULL,
            site        text             NOT NULL,
            device      text             NOT NULL,
            point       text             NOT NULL,
            count       integer          NOT NULL,
            good_count  integer          NOT NULL,
            min         double precision,
            max         double precision,
            mean        double precision,
            sum         double precision,
            first       double precision,
            last        double precision,
            stddev      double precision,
            unit        text,
            window_end  timestamptz      NOT NULL,
            written_at  timestamptz      NOT NULL DEFAULT now(),
            PRIMARY KEY (series, bucket)
        ){partition}""",
    "readings": """
        CREATE TABLE IF NOT EXISTS {schema}.readings (
            time        timestamptz      NOT NULL,
            series      text             NOT NULL,
            value       double precision NOT NULL,
            quality     text             NOT NULL,
            site        text             NOT NULL,
            device      text             NOT NULL,
            point       text             NOT NULL,
            unit        text,
            status      jsonb,
            PRIMARY KEY (series, time)
        ){partition}""",
    # One row per loop, KPI window and KPI (connectors/timescale/rows.py maps LoopKpi records to them).
    "kpi_results": """
        CREATE TABLE IF NOT EXISTS {schema}.kpi_results (
            window_start timestamptz      NOT NULL,
            loop_id      text             NOT NULL,
            kpi          text             NOT NULL,
            value        double precision,
            status       text             NOT NULL,
            coverage     double precision,
            horizon_s    double precision,
            reason       text,
            extras       jsonb,
            window_end   timestamptz      NOT NULL,
            samples      integer          NOT NULL,
            closed_by    text             NOT NULL,
            written_at   timestamptz      NOT NULL DEFAULT now(),
            PRIMARY KEY (loop_id, kpi, window_start)
        ){partition}""",
}
# The audit of BACnet write commands, one row per command (from its CommandResult); not partitioned.
PLAIN_TABLES = {
    "write_commands": """
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
        )""",
}
_ALARM_COLUMNS = """
            instance        text             NOT NULL,
            rule            text             NOT NULL,
            source          text             NOT NULL,
            seq             integer          NOT NULL,
            ts              timestamptz      NOT NULL,
            transition      text             NOT NULL,
            state           text             NOT NULL,
            active          boolean          NOT NULL,
            severity        text,
            value           double precision,
            "limit"         double precision,
            unit            text,
            message         text             NOT NULL,
            labels          jsonb            NOT NULL,
            shelved_until   timestamptz,
            suppressed      boolean          NOT NULL,
            out_of_service  boolean          NOT NULL,
            chattering      boolean          NOT NULL,
            notify          boolean          NOT NULL"""
PLAIN_TABLES["alarm_events"] = (
    """
        CREATE TABLE IF NOT EXISTS {schema}.alarm_events (
            id              text             PRIMARY KEY,"""
    + _ALARM_COLUMNS
    + """,
            "by"            text,
            comment         text,
            command         text,
            "at"            timestamptz,
            written_at      timestamptz      NOT NULL DEFAULT now()
        )"""
)
PLAIN_TABLES["alarms"] = (
    """
        CREATE TABLE IF NOT EXISTS {schema}.alarms ("""
    + _ALARM_COLUMNS
    + """,
            written_at      timestamptz      NOT NULL DEFAULT now(),
            PRIMARY KEY (instance)
        )"""
)
PLAIN_INDEXES = {
    "write_commands": "CREATE INDEX IF NOT EXISTS write_commands_point_time "
    "ON {schema}.write_commands (point, requested_at)",
    "alarm_events": "CREATE INDEX IF NOT EXISTS alarm_events_instance_ts "
    "ON {schema}.alarm_events (instance, ts)",
    "alarms": "CREATE INDEX IF NOT EXISTS alarms_state ON {schema}.alarms (state, severity)",
}
TIME_COLUMN = {
    "agg_1m": "bucket",
    "readings": "time",
    "kpi_results": "window_start",
    "write_commands": "requested_at",
    "alarm_events": "ts",
    "alarms": "ts",
}
SEGMENT_BY = {"kpi_results": "loop_id"}  # TimescaleDB compression; 'series' for the others

OFFSETS = """
    CREATE TABLE IF NOT EXISTS {schema}.sink_offsets (
        consumer    text        NOT NULL,
        topic       text        NOT NULL,
        partition   integer     NOT NULL,
        "offset"    bigint      NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer, topic, partition)
    )"""


# Partitions on plain PostgreSQL are DDL, which needs the table's owner. The writer role (no DDL) gets two
# functions that run as the owner (SECURITY DEFINER) and do only this: create the partition of one month
# of one of the sink's partitioned tables, and drop whole months older than a time. Both pin search_path so
# the caller's cannot reach into them, and refuse any other table. Names and bounds as partition_ddl().
PARTITION_FUNCTIONS = """
CREATE OR REPLACE FUNCTION {schema}.create_month_partition(tbl text, month timestamptz) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s timestamp := date_trunc('month', month AT TIME ZONE 'UTC');
    part text;
BEGIN
    IF tbl NOT IN ({tables}) THEN
        RAISE EXCEPTION 'not a partitioned table of the sink: %', tbl USING ERRCODE = '42501';
    END IF;
    part := tbl || '_y' || to_char(s, 'YYYY') || 'm' || to_char(s, 'MM');
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I.%I PARTITION OF %I.%I FOR VALUES FROM (%L) TO (%L)',
                   {schema_text}, part, {schema_text}, tbl,
                   s AT TIME ZONE 'UTC', (s + interval '1 month') AT TIME ZONE 'UTC');
    RETURN part;
END $$;
CREATE OR REPLACE FUNCTION {schema}.drop_months_before(tbl text, older_than timestamptz) RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    part name;
BEGIN
    IF tbl NOT IN ({tables}) THEN
        RAISE EXCEPTION 'not a partitioned table of the sink: %', tbl USING ERRCODE = '42501';
    END IF;
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace
        WHERE n.nspname = {schema_text} AND p.relname = tbl
          AND c.relname ~ ('^' || tbl || '_y[0-9]{{4}}m[0-9]{{2}}$')
        ORDER BY 1
    LOOP
        -- a month goes once all of it is older than the retention (as drop_old_partitions says)
        IF (to_date(right(part, 7), 'YYYY"m"MM') + interval '1 month') AT TIME ZONE 'UTC' <= older_than THEN
            EXECUTE format('DROP TABLE %I.%I', {schema_text}, part);
            RETURN NEXT part;
        END IF;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION {schema}.create_month_partition(text, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION {schema}.drop_months_before(text, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.create_month_partition(text, timestamptz) TO {writer};
GRANT EXECUTE ON FUNCTION {schema}.drop_months_before(text, timestamptz) TO {writer};
"""


def has_partition_functions(conn: psycopg.Connection, schema: str) -> bool:
    """Whether ``deploy`` made the partition functions here (schemas of earlier versions lack them)."""
    row = conn.execute(
        "SELECT to_regprocedure(%s)", (f'"{schema}".create_month_partition(text, timestamptz)',)
    ).fetchone()
    return bool(row and row[0])


def timescale_status(dsn: str) -> tuple[bool, str | None]:
    """Try to enable TimescaleDB: (True, None), or (False, why not, with the fix where there is one).

    On a connection of its own: an extension that is installed but not preloaded fails with a FATAL error
    that closes the session it was tried on.
    """
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        return True, None
    except psycopg.Error as e:
        msg = str(e).strip()
        if "preload" in msg:
            return False, (
                "TimescaleDB is installed but not preloaded: add shared_preload_libraries = 'timescaledb' to "
                "postgresql.conf and restart PostgreSQL; until then the sink uses plain PostgreSQL"
            )
        return False, f"TimescaleDB not available ({msg.splitlines()[0] if msg else e!r}); plain PostgreSQL"


def _exists(conn: psycopg.Connection, schema: str, table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s)", (f"{schema}.{table}",)).fetchone()
    return bool(row and row[0])


def month_bounds(ts: datetime) -> tuple[datetime, datetime]:
    start = datetime(ts.year, ts.month, 1, tzinfo=UTC)
    end = datetime(ts.year + (ts.month == 12), ts.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def partition_ddl(schema: str, table: str, month_start: datetime) -> sql.Composed:
    start, end = month_bounds(month_start)
    name = f"{table}_y{start.year:04d}m{start.month:02d}"
    return sql.SQL("CREATE TABLE IF NOT EXISTS {}.{} PARTITION OF {}.{} FOR VALUES FROM ({}) TO ({})").format(
        sql.Identifier(schema),
        sql.Identifier(name),
        sql.Identifier(schema),
        sql.Identifier(table),
        sql.Literal(start),
        sql.Literal(end),
    )


def is_partitioned(conn: psycopg.Connection, schema: str, table: str) -> bool:
    row = conn.execute(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (schema, table),
    ).fetchone()
    return bool(row and row[0] == "p")


def create_schema(
    dsn: str,
    schema: str = "public",
    tables: tuple[str, ...] = ("agg_1m", "readings"),
    retention_days: int | None = None,
    timescale: bool = True,
    say: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Create what the sink needs; running it again changes nothing. Returns table -> storage kind.

    With ``timescale`` (the default) TimescaleDB is used where the extension can be enabled; without it, or
    when it cannot, native partitioning."""
    out: dict[str, str] = {}
    ts = False
    if timescale:
        ts, why = timescale_status(dsn)
        if why:
            (say or log.info)(why)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        ident = sql.Identifier(schema)
        tenancy.ensure_base(conn, schema)
        for table in tables:
            if table in PLAIN_TABLES:
                conn.execute(sql.SQL(PLAIN_TABLES[table].format(schema="{schema}")).format(schema=ident))
                conn.execute(sql.SQL(PLAIN_INDEXES[table].format(schema="{schema}")).format(schema=ident))
                out[table] = "plain"
                continue
            existed = _exists(conn, schema, table)
            partition = "" if ts else f" PARTITION BY RANGE ({TIME_COLUMN[table]})"
            conn.execute(
                sql.SQL(TABLES[table].format(schema="{schema}", partition=partition)).format(schema=ident)
            )
            if ts and not existed:
                conn.execute(
                    "SELECT create_hypertable(%s, %s, chunk_time_interval => interval '1 day', "
                    "if_not_exists => true)",
                    (f"{schema}.{table}", TIME_COLUMN[table]),
                )
                conn.execute(
                    sql.SQL(
                        "ALTER TABLE {}.{} SET (timescaledb.compress, timescaledb.compress_segmentby = {})"
                    ).format(ident, sql.Identifier(table), sql.Literal(SEGMENT_BY.get(table, "series")))
                )
                conn.execute(
                    "SELECT add_compression_policy(%s, interval '7 days', if_not_exists => true)",
                    (f"{schema}.{table}",),
                )
            if ts:
                # The retention policy follows the topology on every deploy (set, changed or removed).
                conn.execute("SELECT remove_retention_policy(%s, if_exists => true)", (f"{schema}.{table}",))
                if retention_days:
                    conn.execute(
                        "SELECT add_retention_policy(%s, %s::interval)",
                        (f"{schema}.{table}", f"{retention_days} days"),
                    )
            if not ts:
                now = datetime.now(UTC)
                conn.execute(partition_ddl(schema, table, now))
                conn.execute(partition_ddl(schema, table, month_bounds(now)[1]))
            out[table] = "hypertable" if ts else "partitioned"
        if "agg_1m" in tables:
            create_agg_1h(conn, schema, hypertable=is_hypertable(conn, schema, "agg_1m"))
        if "alarm_events" in tables:
            conn.execute(sql.SQL(ALARM_HEALTH.format(schema="{schema}")).format(schema=ident))
        conn.execute(sql.SQL(OFFSETS.format(schema="{schema}")).format(schema=ident))
        tenancy.protect(conn, schema, tables)
        create_partition_functions(conn, schema)
        tenancy.grant_runtime(conn, schema, tables)
    return out


def create_partition_functions(conn: psycopg.Connection, schema: str) -> None:
    """The owner's functions through which the writer role creates and drops monthly partitions."""
    conn.execute(
        sql.SQL(PARTITION_FUNCTIONS).format(
            schema=sql.Identifier(schema),
            schema_text=sql.Literal(schema),
            tables=sql.SQL(", ").join(map(sql.Literal, TABLES)),
            writer=sql.Identifier(tenancy.writer_role(schema)),
        )
    )


def is_hypertable(conn: psycopg.Connection, schema: str, table: str) -> bool:
    try:
        row = conn.execute(
            "SELECT 1 FROM timescaledb_information.hypertables "
            "WHERE hypertable_schema = %s AND hypertable_name = %s",
            (schema, table),
        ).fetchone()
    except psycopg.errors.UndefinedTable:  # no TimescaleDB in this database
        return False
    return row is not None


# Hourly rollups of agg_1m, the same columns and meaning on every backend. Counts add up; mean is
# sum / good_count (the count-weighted mean of the minutes); first/last come from the earliest/latest minute
# with good readings; the variance combines the minutes' variances and their means' spread (Chan et al.'s
# parallel formula), so stddev equals the sample standard deviation of the hour's good readings.
#
# Plain PostgreSQL: a view, so a minute rewritten late (a replay, a late window) is in its hour at once.
AGG_1H = """
CREATE VIEW {schema}.agg_1h AS
WITH m AS (
    SELECT date_trunc('hour', bucket) AS hour, bucket, series, site, device, point, count, good_count,
           min, max, mean, sum, first, last, stddev, unit,
           sum(sum) OVER w / NULLIF(sum(good_count) OVER w, 0) AS hour_mean
    FROM {schema}.agg_1m
    WINDOW w AS (PARTITION BY series, date_trunc('hour', bucket))
)
SELECT hour AS bucket, series, min(site) AS site, min(device) AS device, min(point) AS point,
       sum(count)::bigint AS count, sum(good_count)::bigint AS good_count,
       min(min) AS min, max(max) AS max,
       sum(sum) / NULLIF(sum(good_count), 0) AS mean,
       CASE WHEN sum(good_count) > 0 THEN sum(sum) END AS sum,
       (array_agg(first ORDER BY bucket) FILTER (WHERE good_count > 0))[1] AS first,
       (array_agg(last ORDER BY bucket DESC) FILTER (WHERE good_count > 0))[1] AS last,
       CASE WHEN sum(good_count) >= 2 THEN sqrt(greatest(0, sum(
           coalesce(stddev * stddev * (good_count - 1), 0) + good_count * (mean - hour_mean) ^ 2
       ) / (sum(good_count) - 1))) END AS stddev,
       min(unit) AS unit, hour + interval '1 hour' AS window_end
FROM m
GROUP BY hour, series
"""

# TimescaleDB: a real-time continuous aggregate (materialized hours plus the newest minutes computed on read)
# with a refresh policy, and the agg_1h view on top of it. A continuous aggregate allows no window
# functions, so it keeps the sums from which the view derives mean and variance: q = Σ((n-1)s² + n·m²) per
# hour, variance = (q - S²/N) / (N - 1). The sink refreshes the hours of minutes it rewrites below the
# policy's horizon, so a late minute reaches a materialized hour at once (the policy would, within 10 min).
AGG_1H_ROLLUP = """
CREATE MATERIALIZED VIEW {schema}.agg_1h_rollup
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(interval '1 hour', bucket) AS bucket, series, min(site) AS site, min(device) AS device,
       min(point) AS point, sum(count)::bigint AS count, sum(good_count)::bigint AS good_count,
       min(min) AS min, max(max) AS max, sum(sum) AS s,
       sum(coalesce(stddev * stddev * (good_count - 1), 0) + good_count * mean * mean)
           FILTER (WHERE mean IS NOT NULL) AS q,
       first(first, bucket) FILTER (WHERE good_count > 0) AS first,
       last(last, bucket) FILTER (WHERE good_count > 0) AS last,
       min(unit) AS unit
FROM {schema}.agg_1m
GROUP BY 1, series
WITH NO DATA
"""
AGG_1H_OVER_ROLLUP = """
CREATE VIEW {schema}.agg_1h AS
SELECT bucket, series, site, device, point, count, good_count, min, max,
       s / NULLIF(good_count, 0) AS mean,
       CASE WHEN good_count > 0 THEN s END AS sum,
       first, last,
       CASE WHEN good_count >= 2 THEN sqrt(greatest(0, (q - s * s / good_count) / (good_count - 1))) END
           AS stddev,
       unit, bucket + interval '1 hour' AS window_end
FROM {schema}.agg_1h_rollup
WHERE {schema}.sees_all() OR site IN (SELECT {schema}.visible_sites())
"""
ROLLUP_HORIZON = "1 hour"  # the policy materializes hours that ended at least this long ago


# Alarm-system health per site and hour, as EEMUA 191 measures it: alarms (raises) in the hour and per
# 10 minutes on average, the busiest 10 minutes, floods (10-minute periods with 10 or more alarms), instances
# that started chattering, and standing alarms (active at the end of the hour, raised 24 h or more before).
# The site is the first part of the source; for a loop, the site of its PV (empty if the loop is unknown).
ALARM_HEALTH = """
CREATE OR REPLACE VIEW {schema}.alarm_health AS
WITH ev AS (
    SELECT instance, transition, ts, coalesce({schema}.source_site(source), '') AS site
    FROM {schema}.alarm_events
),
tens AS (
    SELECT site, date_trunc('hour', ts) AS hour,
           date_trunc('hour', ts) + floor(extract(minute FROM ts) / 10) * interval '10 minutes' AS slot,
           count(*) AS n
    FROM ev WHERE transition = 'raise'
    GROUP BY 1, 2, 3
),
hours AS (SELECT DISTINCT site, date_trunc('hour', ts) AS hour FROM ev)
SELECT h.site, h.hour,
       coalesce(sum(t.n), 0)::bigint AS alarms,
       coalesce(sum(t.n), 0) / 6.0 AS per_10min,
       coalesce(max(t.n), 0)::bigint AS peak_10min,
       count(*) FILTER (WHERE t.n >= 10)::bigint AS floods,
       (SELECT count(DISTINCT e.instance) FROM ev e
         WHERE e.site = h.site AND e.transition = 'chatter'
           AND e.ts >= h.hour AND e.ts < h.hour + interval '1 hour')::bigint AS chattering,
       (SELECT count(*) FROM (
            SELECT DISTINCT ON (e.instance) e.transition, e.ts FROM ev e
            WHERE e.site = h.site AND e.transition IN ('raise', 'clear') AND e.ts < h.hour + interval '1 hour'
            ORDER BY e.instance, e.ts DESC) last
         WHERE last.transition = 'raise' AND last.ts <= h.hour + interval '1 hour' - interval '24 hours'
       )::bigint AS standing
FROM hours h LEFT JOIN tens t ON t.site = h.site AND t.hour = h.hour
GROUP BY h.site, h.hour
"""


def create_agg_1h(conn: psycopg.Connection, schema: str, hypertable: bool = False) -> None:
    """The agg_1h view (over the continuous aggregate where agg_1m is a hypertable); an older form of it is
    replaced."""
    row = conn.execute(
        "SELECT pg_get_viewdef(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = 'agg_1h'",
        (schema,),
    ).fetchone()
    marker = "visible_sites" if hypertable else "hour_mean"  # the rollup's view filters by tenant
    if row is not None and marker in (row[0] or ""):
        return
    ident = sql.Identifier(schema)
    if row is not None and hypertable and "agg_1h_rollup" in (row[0] or ""):
        pass  # the view over the rollup, without the tenant filter: replaced below
    elif row is not None:  # a continuous aggregate of that name (TimescaleDB's own DROP), else a plain view
        try:
            conn.execute(sql.SQL("DROP MATERIALIZED VIEW IF EXISTS {}.agg_1h CASCADE").format(ident))
        except psycopg.Error:
            conn.execute(sql.SQL("DROP VIEW IF EXISTS {}.agg_1h CASCADE").format(ident))
    if not hypertable:
        conn.execute(sql.SQL(AGG_1H.format(schema="{schema}")).format(schema=ident))
        return
    if not _exists(conn, schema, "agg_1h_rollup"):
        conn.execute(sql.SQL(AGG_1H_ROLLUP.format(schema="{schema}")).format(schema=ident))
    conn.execute(
        "SELECT add_continuous_aggregate_policy(%s, start_offset => NULL, end_offset => %s::interval, "
        "schedule_interval => interval '10 minutes', if_not_exists => true)",
        (f"{schema}.agg_1h_rollup", ROLLUP_HORIZON),
    )
    conn.execute(
        sql.SQL(
            AGG_1H_OVER_ROLLUP.replace("CREATE VIEW", "CREATE OR REPLACE VIEW").format(schema="{schema}")
        ).format(schema=ident)
    )


def _watermark(conn: psycopg.Connection, schema: str) -> datetime | None:
    """Where the continuous aggregate's materialized part ends (None when TimescaleDB will not say)."""
    try:
        row = conn.execute(
            "SELECT _timescaledb_functions.to_timestamp(_timescaledb_functions.cagg_watermark("
            "mat_hypertable_id)) FROM _timescaledb_catalog.continuous_agg "
            "WHERE user_view_schema = %s AND user_view_name = 'agg_1h_rollup'",
            (schema,),
        ).fetchone()
    except psycopg.Error:
        return None
    return row[0] if row and isinstance(row[0], datetime) else None


def refresh_hours(dsn: str, schema: str, hours: Sequence[datetime]) -> None:
    """Materialize again the hours of minutes rewritten below the policy's horizon (outside a transaction,
    as TimescaleDB requires); what fails here the policy repairs later, from its invalidation log."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        horizon = _watermark(conn, schema) or datetime.now(UTC) - timedelta(hours=1)
        old = sorted(h for h in hours if h < horizon)  # newer hours are computed on read
        if not old:
            return
        conn.execute(
            "CALL refresh_continuous_aggregate(%s, %s, %s)",
            (f"{schema}.agg_1h_rollup", old[0], old[-1] + timedelta(hours=1)),
        )


def drop_old_partitions(conn: psycopg.Connection, schema: str, table: str, older_than: datetime) -> list[str]:
    """Retention without TimescaleDB: drop whole monthly partitions that end at or before ``older_than``.

    A month is dropped only once all of it is older than the retention, so rows are kept at least as long
    as asked (up to a month longer), as TimescaleDB keeps whole chunks.
    """
    if has_partition_functions(conn, schema):  # the same, as the owner: the writer role may not DROP
        names = [
            r[0]
            for r in conn.execute(
                sql.SQL("SELECT * FROM {}.drop_months_before(%s, %s)").format(sql.Identifier(schema)),
                (table, older_than),
            ).fetchall()
        ]
        for name in names:
            log.info("retention: dropped %s.%s", schema, name)
        return names
    dropped = []
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace "
        "WHERE n.nspname = %s AND p.relname = %s",
        (schema, table),
    ).fetchall()
    for (name,) in rows:
        try:
            y, m = int(name[-7:-3]), int(name[-2:])
        except ValueError:
            continue
        _, end = month_bounds(datetime(y, m, 1, tzinfo=UTC))
        if end <= older_than:
            conn.execute(sql.SQL("DROP TABLE {}.{}").format(sql.Identifier(schema), sql.Identifier(name)))
            log.info("retention: dropped %s.%s (data before %s)", schema, name, end.date())
            dropped.append(name)
    return dropped


def enforce_retention(
    dsn: str, schema: str, tables: tuple[str, ...], retention_ms: int
) -> dict[str, list[str]]:
    """Drop the monthly partitions of ``tables`` older than ``retention_ms`` (plain PostgreSQL only)."""
    older_than = datetime.fromtimestamp(datetime.now(UTC).timestamp() - retention_ms / 1000, UTC)
    out: dict[str, list[str]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in tables:
            if table in TIME_COLUMN and table not in PLAIN_TABLES and is_partitioned(conn, schema, table):
                out[table] = drop_old_partitions(conn, schema, table, older_than)
    return out

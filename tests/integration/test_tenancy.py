"""Tenant isolation in the database: two tenants, each with a login role, on the real PostgreSQL.

Tenant A's role reads 0 rows of tenant B in every table and view (and cannot read the base tables at all);
the API role reads the tenant set for its transaction; the owner reads everything. Both storages: plain
PostgreSQL (row-level security on the base tables too) and TimescaleDB (hypertables with compression, where
the tenant views are the only way in).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from connectors.timescale import tenancy
from connectors.timescale.schema import create_schema, refresh_hours

pytestmark = pytest.mark.integration

TABLES = ("agg_1m", "readings", "kpi_results", "alarm_events", "alarms")
VIEWS = (*TABLES, "agg_1h", "alarm_health")


def seed(conn: psycopg.Connection, schema: str) -> datetime:
    """Rows of sites a1 (tenant A), b1 (tenant B) and c1 (nobody's) in every table."""
    s = sql.Identifier(schema)
    t0 = (datetime.now(UTC) - timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
    for site in ("a1", "b1", "c1"):
        series = f"{site}/dev/temp"
        for i in range(5):
            b = t0 + timedelta(minutes=i)
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.agg_1m (bucket, series, site, device, point, count, good_count, min, "
                    "max, mean, sum, first, last, stddev, unit, window_end) VALUES "
                    "(%s, %s, %s, 'dev', 'temp', 2, 2, 1, 3, 2, 4, 1, 3, 1.41, 'degC', %s)"
                ).format(s),
                (b, series, site, b + timedelta(minutes=1)),
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.readings (time, series, value, quality, site, device, point) "
                    "VALUES (%s, %s, 1.5, 'good', %s, 'dev', 'temp')"
                ).format(s),
                (b, series, site),
            )
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.kpi_results (window_start, loop_id, kpi, value, status, window_end, samples, "
                "closed_by) VALUES (%s, %s, 'iae', 1.0, 'ok', %s, 600, 'watermark')"
            ).format(s),
            (t0, f"FIC_{site}", t0 + timedelta(minutes=10)),
        )
        for source in (series, f"FIC_{site}"):
            inst = f"hot/{source}"
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.alarm_events (id, instance, rule, source, seq, ts, transition, state, "
                    "active, severity, message, labels, suppressed, out_of_service, chattering, notify) "
                    "VALUES (%s, %s, 'hot', %s, 1, %s, 'raise', 'unack', true, 'high', 'm', '{{}}', false, "
                    "false, false, true)"
                ).format(s),
                (f"{inst}#1", inst, source, t0),
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {s}.alarms SELECT instance, rule, source, seq, ts, transition, state, "
                    "active, "
                    'severity, value, "limit", unit, message, labels, shelved_until, suppressed, '
                    "out_of_service, chattering, notify FROM {s}.alarm_events WHERE instance = %s"
                ).format(s=s),
                (inst,),
            )
    tenancy.set_loop_sites(conn, schema, {"FIC_a1": "a1", "FIC_b1": "b1", "FIC_c1": "c1"})
    return t0


@pytest.fixture(params=["timescaledb", "postgres"])
def tenants(request: Any, namespace: dict[str, str]) -> Iterator[dict[str, Any]]:
    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    kinds = create_schema(dsn, schema, TABLES, timescale=request.param == "timescaledb")
    if request.param == "timescaledb" and kinds["agg_1m"] != "hypertable":
        pytest.skip("TimescaleDB is not available here")
    roles = {t: f"{schema}_{t}" for t in ("a", "b")}
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0 = seed(conn, schema)
        tenancy.add_tenant(conn, schema, "a", ["a1"], "Tenant A")
        tenancy.add_tenant(conn, schema, "b", ["b1"])
        for t, role in roles.items():
            tenancy.grant_role(conn, schema, t, role, password=f"pw-{t}")
    if request.param == "timescaledb":
        refresh_hours(dsn, schema, [t0])
    yield {"dsn": dsn, "schema": schema, "roles": roles, "kinds": kinds}


def as_role(dsn: str, role: str, password: str, schema: str) -> psycopg.Connection:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info.update(user=role, password=password, options=f"-c search_path={schema}")
    return psycopg.connect(**info, autocommit=True)


SITE = {
    "kpi_results": "split_part(loop_id, '_', 2)",  # FIC_a1 -> a1
    "alarm_events": "CASE WHEN position('/' IN source) > 0 THEN split_part(source, '/', 1) "
    "ELSE split_part(source, '_', 2) END",
}
SITE["alarms"] = SITE["alarm_events"]


def sites_in(conn: psycopg.Connection, view: str) -> set[str]:
    return {r[0] for r in conn.execute(f"SELECT DISTINCT {SITE.get(view, 'site')} FROM {view}").fetchall()}


def test_a_tenant_role_reads_its_own_sites_only(tenants: dict[str, Any]) -> None:
    schema, views = tenants["schema"], tenancy.tenant_schema(tenants["schema"])
    for t, other in (("a", "b1"), ("b", "a1")):
        with as_role(tenants["dsn"], tenants["roles"][t], f"pw-{t}", views) as conn:
            for view in VIEWS:
                assert sites_in(conn, view) == {f"{t}1"}, view
            for view in ("agg_1m", "readings", "agg_1h"):
                row = conn.execute(f"SELECT count(*) FROM {view} WHERE site = %s", (other,)).fetchone()
                assert row == (0,), view
            # The base tables are not theirs to read; nor are the tokens.
            for table in (*TABLES, "api_tokens"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(
                        sql.SQL("SELECT count(*) FROM {}.{}").format(
                            sql.Identifier(schema), sql.Identifier(table)
                        )
                    )
            # What tenants there are, and their sites: its own only.
            assert conn.execute(
                sql.SQL("SELECT site FROM {}.tenant_sites").format(sql.Identifier(schema))
            ).fetchall() == [(f"{t}1",)]


def test_the_api_role_reads_the_tenant_of_its_transaction_and_the_owner_everything(
    tenants: dict[str, Any],
) -> None:
    schema, views = tenants["schema"], tenancy.tenant_schema(tenants["schema"])
    with psycopg.connect(tenants["dsn"]) as conn:
        for t in ("a", "b", None):
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(tenancy.api_role(schema))))
                conn.execute("SELECT set_config('plantstream.tenant', %s, true)", (t or "",))
                rows = conn.execute(
                    sql.SQL("SELECT DISTINCT site FROM {}.agg_1m").format(sql.Identifier(views))
                ).fetchall()
                assert {r[0] for r in rows} == ({f"{t}1"} if t else set())
        # Back to the owner after each transaction: every site.
        rows = conn.execute(
            sql.SQL("SELECT DISTINCT site FROM {}.agg_1m").format(sql.Identifier(views))
        ).fetchall()
        assert {r[0] for r in rows} == {"a1", "b1", "c1"}
        conn.rollback()


def test_row_level_security_is_forced_where_the_storage_allows_it(tenants: dict[str, Any]) -> None:
    with psycopg.connect(tenants["dsn"]) as conn:
        rows = dict(
            conn.execute(
                "SELECT c.relname, c.relrowsecurity AND c.relforcerowsecurity FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relkind IN ('r', 'p')",
                (tenants["schema"],),
            ).fetchall()
        )
    for table in ("tenant_sites", "tenant_roles", "tenants", "loop_sites", "alarm_events", "alarms"):
        assert rows[table] is True, table
    compressed = {t for t, k in tenants["kinds"].items() if k == "hypertable"}
    for table in set(TABLES) - compressed:
        assert rows[table] is True, table


def test_tokens_are_hashed_and_refused_when_unknown_expired_or_revoked(tenants: dict[str, Any]) -> None:
    schema = tenants["schema"]
    with psycopg.connect(tenants["dsn"], autocommit=True) as conn:
        token, rec = tenancy.create_token(conn, schema, "a", "grafana", timedelta(days=1))
        assert tenancy.check_token(conn, schema, token).tenant == "a"
        stored = conn.execute(
            sql.SQL("SELECT hash FROM {}.api_tokens").format(sql.Identifier(schema))
        ).fetchall()
        assert all(token.split("_", 2)[2] not in h[0] for h in stored)
        for bad, why in ((None, "missing"), ("nonsense", "malformed"), (token[:-2] + "xx", "unknown")):
            with pytest.raises(tenancy.TokenError, match=why):
                tenancy.check_token(conn, schema, bad)
        old, _ = tenancy.create_token(conn, schema, "a", "old", timedelta(seconds=-1))
        with pytest.raises(tenancy.TokenError, match="expired"):
            tenancy.check_token(conn, schema, old)
        assert tenancy.revoke_token(conn, schema, rec.id)
        with pytest.raises(tenancy.TokenError, match="revoked"):
            tenancy.check_token(conn, schema, token)
        with pytest.raises(ValueError, match="belongs to tenant 'a'"):
            tenancy.add_tenant(conn, schema, "b", ["a1"])

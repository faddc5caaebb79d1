"""Tenants in the database: who owns which site, API tokens, and what each database role may read.

A tenant owns sites (``tenant_sites``; a site belongs to one tenant). Three kinds of role read the data:

* the **owner** (the role ``deploy`` runs as, which created the tables) sees and writes everything;
* the **runtime roles** see every row too, with only the privileges their work needs: ``<schema>_writer``
  (what the sink's ``dsn`` logs in as: reads and upserts the data tables and ``sink_offsets``, creates
  monthly partitions and drops old ones only through the owner's SECURITY DEFINER functions; no DDL) and
  ``<schema>_readonly`` (SELECT on the data tables and views, for dashboards);
* a **tenant role** (a login role mapped to one tenant in ``tenant_roles``, e.g. for Grafana or direct SQL)
  sees the rows of its tenant's sites only;
* the **API role** ``<schema>_api`` (no login; ``plantstream serve`` switches to it with ``SET LOCAL ROLE``)
  sees the rows of the tenant named by the setting ``plantstream.tenant``, set per transaction.

Tenant and API roles read the schema ``<schema>_tenant``: one ``security_barrier`` view per table and view
(same names, same columns), each keeping the rows whose site is the caller's tenant's. A row's site is its
``site`` column, the first part of its series id, or for a loop the site of its PV (``loop_sites``, which
``deploy`` writes from the topology). Row-level security, enabled and forced, holds the same rule on every
base table that can have it (the owner passes by a policy of its own); TimescaleDB refuses it on hypertables
with compression, which is why the views are the way in for everyone. Roles of neither kind read nothing.
API tokens are stored as SHA-256 of their secret part, readable by the owner only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

BASE = """
CREATE TABLE IF NOT EXISTS {schema}.tenants (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {schema}.tenant_sites (
    site        text PRIMARY KEY,
    tenant      text NOT NULL REFERENCES {schema}.tenants (id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS {schema}.tenant_roles (
    role        name PRIMARY KEY,
    tenant      text REFERENCES {schema}.tenants (id) ON DELETE CASCADE  -- NULL: the API role
);
CREATE TABLE IF NOT EXISTS {schema}.loop_sites (
    loop_id     text PRIMARY KEY,
    site        text NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.api_tokens (
    id          text PRIMARY KEY,
    tenant      text NOT NULL REFERENCES {schema}.tenants (id) ON DELETE CASCADE,
    name        text NOT NULL,
    hash        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz
);
CREATE OR REPLACE FUNCTION {schema}.sees_all() RETURNS boolean LANGUAGE sql STABLE AS
$$ SELECT pg_has_role(current_user, {owner}, 'MEMBER') OR pg_has_role(current_user, {writer}, 'MEMBER')
          OR pg_has_role(current_user, {readonly}, 'MEMBER') $$;
CREATE OR REPLACE FUNCTION {schema}.current_tenant() RETURNS text LANGUAGE sql STABLE AS
$$ SELECT CASE WHEN r.tenant IS NULL THEN nullif(current_setting('plantstream.tenant', true), '')
               ELSE r.tenant END
   FROM {schema}.tenant_roles r WHERE r.role = current_user $$;
CREATE OR REPLACE FUNCTION {schema}.visible_sites() RETURNS SETOF text LANGUAGE sql STABLE AS
$$ SELECT site FROM {schema}.tenant_sites WHERE tenant = {schema}.current_tenant() $$;
"""

# The site of a row, per table (loops: the site of their PV).
SITE_OF = {
    "agg_1m": "site",
    "readings": "site",
    "kpi_results": "(SELECT l.site FROM {schema}.loop_sites l WHERE l.loop_id = kpi_results.loop_id)",
    "alarm_events": "{schema}.source_site(source)",
    "alarms": "{schema}.source_site(source)",
    "write_commands": "split_part(point, '/', 1)",
}
SOURCE_SITE = """
CREATE OR REPLACE FUNCTION {schema}.source_site(source text) RETURNS text LANGUAGE sql STABLE AS
$$ SELECT CASE WHEN position('/' IN source) > 0 THEN split_part(source, '/', 1)
               ELSE (SELECT l.site FROM {schema}.loop_sites l WHERE l.loop_id = source) END $$;
"""
# Mapping tables: a tenant role sees its own rows (what current_tenant() and visible_sites() read).
MAPPING_POLICIES = {
    "tenant_roles": "role = current_user",
    "tenant_sites": "tenant = {schema}.current_tenant()",
    "loop_sites": "site IN (SELECT {schema}.visible_sites())",
    "tenants": "id = {schema}.current_tenant()",
}


def api_role(schema: str) -> str:
    return f"{schema}_api"


def reader_role(schema: str) -> str:
    """The group role every tenant role and the API role belong to: USAGE on the schema, SELECT on what
    tenants may read (row-level security decides which rows)."""
    return f"{schema}_reader"


def writer_role(schema: str) -> str:
    """The login role a sink writes as at runtime (its ``dsn``): DML on the sink's tables, no DDL."""
    return f"{schema}_writer"


def readonly_role(schema: str) -> str:
    """A login role that reads every row of the sink's tables and views and writes nothing (dashboards).
    Not ``<schema>_reader``: that one is the tenant roles' group, which must not read the base tables."""
    return f"{schema}_readonly"


def runtime_roles(schema: str) -> dict[str, str]:
    """The runtime login roles of ``schema`` by kind (``plantstream db password KIND``)."""
    return {"writer": writer_role(schema), "readonly": readonly_role(schema)}


# What the writer does to each kind of relation (connectors/timescale/writer.py): SELECT for the staging
# table's LIKE, the ON CONFLICT upserts and the offsets' FOR UPDATE; INSERT and UPDATE for the upserts.
# No DELETE, TRUNCATE or DDL: partitions come and go through the functions in schema.py.
WRITER_PRIVILEGES = "SELECT, INSERT, UPDATE"


def _x(conn: psycopg.Connection, text: str, schema: str, **more: sql.Composable) -> None:
    conn.execute(sql.SQL(text).format(schema=sql.Identifier(schema), **more))


def _role_exists(conn: psycopg.Connection, role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def _relation_exists(conn: psycopg.Connection, schema: str, name: str) -> bool:
    return conn.execute("SELECT to_regclass(%s)", (f'"{schema}"."{name}"',)).fetchone() not in (None, (None,))


def ensure_base(conn: psycopg.Connection, schema: str) -> None:
    """The tenancy tables and functions (before the views that use them); ``conn`` is the owner's."""
    owner = conn.execute("SELECT current_user").fetchone()
    assert owner is not None
    # The runtime roles before sees_all(), which names them.
    for role in runtime_roles(schema).values():
        if not _role_exists(conn, role):
            # LOGIN without a password: nobody logs in as it until `plantstream db password` sets one.
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE").format(
                    sql.Identifier(role)
                )
            )
    _x(
        conn,
        BASE,
        schema,
        owner=sql.Literal(owner[0]),
        writer=sql.Literal(writer_role(schema)),
        readonly=sql.Literal(readonly_role(schema)),
    )
    _x(conn, SOURCE_SITE, schema)


def tenant_schema(schema: str) -> str:
    """Where tenant roles (and the API) read: a view per table, filtered to the caller's tenant's sites."""
    return f"{schema}_tenant"


def protect(conn: psycopg.Connection, schema: str, tables: tuple[str, ...]) -> None:
    """Roles, grants, policies and tenant views for ``tables`` of ``schema`` (after :func:`ensure_base`);
    running it again changes nothing. ``conn`` is the owner's, in autocommit."""
    owner = conn.execute("SELECT current_user").fetchone()
    assert owner is not None
    reader, api, views = reader_role(schema), api_role(schema), tenant_schema(schema)
    for role in (reader, api):
        if not _role_exists(conn, role):
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
    conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(reader), sql.Identifier(api)))
    # The owner acts as the API role per transaction (SET LOCAL ROLE).
    conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(api), sql.Identifier(owner[0])))
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.tenant_roles (role, tenant) VALUES (%s, NULL) ON CONFLICT (role) DO NOTHING"
        ).format(sql.Identifier(schema)),
        (api,),
    )
    r = sql.Identifier(reader)
    # The base schema: the mapping tables only (for current_tenant() and visible_sites(), which run as the
    # caller), each under forced row-level security.
    _x(conn, "GRANT USAGE ON SCHEMA {schema} TO {r}", schema, r=r)
    for table, policy in MAPPING_POLICIES.items():
        _protect(conn, schema, table, policy)
        _x(conn, f"GRANT SELECT ON {{schema}}.{table} TO {{r}}", schema, r=r)
    # Row-level security on the data tables too, where TimescaleDB allows it (not on hypertables with
    # compression): a role given one of them directly still reads its tenant's rows only.
    for table in tables:
        if table in SITE_OF and _relation_exists(conn, schema, table):
            _protect(conn, schema, table, f"{SITE_OF[table]} IN (SELECT {{schema}}.visible_sites())")
    # Tenant views: the same filter for every table and view, whatever its storage.
    _x(conn, "CREATE SCHEMA IF NOT EXISTS {v}", schema, v=sql.Identifier(views))
    _x(conn, "GRANT USAGE ON SCHEMA {v} TO {r}", schema, v=sql.Identifier(views), r=r)
    for name, site in {**SITE_OF, "agg_1h": "site", "alarm_health": "site"}.items():
        if not _relation_exists(conn, schema, name):
            continue
        _x(
            conn,
            f"CREATE OR REPLACE VIEW {{v}}.{name} WITH (security_barrier) AS SELECT * FROM {{schema}}.{name} "
            f"WHERE {{schema}}.sees_all() OR {site} IN (SELECT {{schema}}.visible_sites())",
            schema,
            v=sql.Identifier(views),
        )
        _x(conn, f"GRANT SELECT ON {{v}}.{name} TO {{r}}", schema, v=sql.Identifier(views), r=r)


# Relations the read-only role reads besides the data tables (when they exist).
READONLY_EXTRA = ("agg_1h", "alarm_health", "sink_offsets")


def grant_runtime(conn: psycopg.Connection, schema: str, tables: tuple[str, ...]) -> None:
    """Privileges of the runtime roles on ``tables`` of ``schema`` (after :func:`protect`); idempotent.
    ``conn`` is the owner's."""
    w, ro = sql.Identifier(writer_role(schema)), sql.Identifier(readonly_role(schema))
    _x(conn, "GRANT USAGE ON SCHEMA {schema} TO {w}, {ro}", schema, w=w, ro=ro)
    for table in (*tables, "sink_offsets"):
        if not _relation_exists(conn, schema, table):
            continue
        t = sql.Identifier(table)
        _x(conn, f"GRANT {WRITER_PRIVILEGES} ON {{schema}}.{{t}} TO {{w}}", schema, t=t, w=w)
        _x(conn, "GRANT SELECT ON {schema}.{t} TO {ro}", schema, t=t, ro=ro)
    for name in READONLY_EXTRA:
        if _relation_exists(conn, schema, name):
            _x(conn, "GRANT SELECT ON {schema}.{t} TO {ro}", schema, t=sql.Identifier(name), ro=ro)
    # The tenant policies on the data tables call visible_sites() as the caller, which reads these: without
    # SELECT a statement fails while planning, even though sees_all() already lets the role through.
    for table in MAPPING_POLICIES:
        _x(conn, "GRANT SELECT ON {schema}.{t} TO {w}, {ro}", schema, t=sql.Identifier(table), w=w, ro=ro)
    # A second guard beside the grants: a dashboard's connection cannot write even where someone granted more.
    conn.execute(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(ro))


def set_password(conn: psycopg.Connection, role: str, password: str) -> None:
    """Set (or change) a login role's password. libpq hashes it here (SCRAM-SHA-256), so the password
    itself never reaches the server, its statement log or ``pg_stat_activity``."""
    if not _role_exists(conn, role):
        raise ValueError(f"no role {role!r} in this database; run plantstream deploy first")
    verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode()
    conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier)))


def _protect(conn: psycopg.Connection, schema: str, table: str, tenant_rows: str) -> bool:
    """Forced row-level security on ``table``: the owner everything, tenants ``tenant_rows``. False where
    the table cannot have it (a TimescaleDB hypertable with compression)."""
    t = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
    try:
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(t))
    except psycopg.errors.FeatureNotSupported:
        return False
    conn.execute(sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(t))
    conn.execute(sql.SQL("DROP POLICY IF EXISTS owner_all ON {}").format(t))
    conn.execute(sql.SQL("DROP POLICY IF EXISTS tenant_read ON {}").format(t))
    s = sql.Identifier(schema)
    conn.execute(
        sql.SQL(
            "CREATE POLICY owner_all ON {t} FOR ALL USING ({s}.sees_all()) WITH CHECK ({s}.sees_all())"
        ).format(t=t, s=s)
    )
    conn.execute(
        sql.SQL("CREATE POLICY tenant_read ON {t} FOR SELECT USING ({rows})").format(
            t=t, rows=sql.SQL(tenant_rows.replace("{schema}", "{s}")).format(s=s)
        )
    )
    return True


def drop(conn: psycopg.Connection, schema: str) -> None:
    """Undo :func:`protect` beyond the schema itself: the tenant views and the roles made for ``schema``
    (its reader and API roles, and the tenant roles mapped in it). Before ``DROP SCHEMA``."""
    roles = [reader_role(schema), api_role(schema), *runtime_roles(schema).values()]
    if _relation_exists(conn, schema, "tenant_roles"):
        roles += [
            r[0]
            for r in conn.execute(
                sql.SQL("SELECT role FROM {}.tenant_roles WHERE tenant IS NOT NULL").format(
                    sql.Identifier(schema)
                )
            ).fetchall()
        ]
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(tenant_schema(schema))))
    for role in roles:
        if _role_exists(conn, role):
            # DROP OWNED needs the role's privileges: a CREATEROLE owner that is no superuser takes them.
            conn.execute(
                sql.SQL(
                    "DO $$ BEGIN IF NOT pg_has_role(current_user, {r}, 'MEMBER') THEN "
                    "EXECUTE format('GRANT %I TO %I', {r}, current_user); END IF; END $$"
                ).format(r=sql.Literal(role))
            )
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def set_loop_sites(conn: psycopg.Connection, schema: str, loops: dict[str, str]) -> None:
    """loop id -> the site of its PV, as the topology says (replaces what was there)."""
    s = sql.Identifier(schema)
    with conn.transaction():
        conn.execute(sql.SQL("DELETE FROM {}.loop_sites").format(s))
        for loop_id, site in sorted(loops.items()):
            conn.execute(
                sql.SQL("INSERT INTO {}.loop_sites (loop_id, site) VALUES (%s, %s)").format(s),
                (loop_id, site),
            )


# -- tenants, roles, tokens (the CLI's verbs) ------------------------------------------------------------


def add_tenant(
    conn: psycopg.Connection, schema: str, tenant: str, sites: list[str], name: str | None = None
) -> None:
    """Create or update ``tenant`` and give it ``sites`` (a site another tenant owns is an error)."""
    s = sql.Identifier(schema)
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.tenants (id, name) VALUES (%s, %s) "
                "ON CONFLICT (id) DO UPDATE SET name = coalesce(%s, tenants.name)"
            ).format(s),
            (tenant, name or tenant, name),
        )
        for site in sites:
            row = conn.execute(
                sql.SQL("SELECT tenant FROM {}.tenant_sites WHERE site = %s").format(s), (site,)
            ).fetchone()
            if row is not None and row[0] != tenant:
                raise ValueError(f"site {site!r} belongs to tenant {row[0]!r}; remove it there first")
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.tenant_sites (site, tenant) VALUES (%s, %s) ON CONFLICT DO NOTHING"
                ).format(s),
                (site, tenant),
            )


def tenants(conn: psycopg.Connection, schema: str) -> list[tuple[str, str, list[str], list[str]]]:
    """(id, name, sites, roles) of every tenant."""
    s = sql.Identifier(schema)
    rows = conn.execute(
        sql.SQL(
            "SELECT t.id, t.name, "
            "coalesce((SELECT array_agg(site ORDER BY site) FROM {s}.tenant_sites x "
            "          WHERE x.tenant = t.id), '{{}}'), "
            "coalesce((SELECT array_agg(role::text ORDER BY role) FROM {s}.tenant_roles r "
            "          WHERE r.tenant = t.id), '{{}}') "
            "FROM {s}.tenants t ORDER BY t.id"
        ).format(s=s)
    ).fetchall()
    return [(r[0], r[1], list(r[2]), list(r[3])) for r in rows]


def _require_tenant(conn: psycopg.Connection, schema: str, tenant: str) -> None:
    row = conn.execute(
        sql.SQL("SELECT 1 FROM {}.tenants WHERE id = %s").format(sql.Identifier(schema)), (tenant,)
    ).fetchone()
    if row is None:
        raise ValueError(
            f"no tenant {tenant!r}; create it with: plantstream tenants add {tenant} --site SITE"
        )


def grant_role(conn: psycopg.Connection, schema: str, tenant: str, role: str, password: str | None) -> None:
    """A login role that reads ``tenant``'s rows only (created if missing; a password sets or changes it)."""
    s = sql.Identifier(schema)
    _require_tenant(conn, schema, tenant)
    r = sql.Identifier(role)
    if not _role_exists(conn, role):
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE").format(r))
    if password is not None:
        set_password(conn, role, password)
    conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(reader_role(schema)), r))
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.tenant_roles (role, tenant) VALUES (%s, %s) "
            "ON CONFLICT (role) DO UPDATE SET tenant = %s"
        ).format(s),
        (role, tenant, tenant),
    )


TOKEN_PREFIX = "pst"


@dataclass(frozen=True)
class Token:
    id: str
    tenant: str
    name: str
    expires_at: datetime | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(
    conn: psycopg.Connection, schema: str, tenant: str, name: str, valid_for: timedelta | None
) -> tuple[str, Token]:
    """A new API token for ``tenant``: the token (shown once; only its hash is stored) and its record."""
    s = sql.Identifier(schema)
    _require_tenant(conn, schema, tenant)
    token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    expires = datetime.now(UTC) + valid_for if valid_for is not None else None
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.api_tokens (id, tenant, name, hash, expires_at) VALUES (%s, %s, %s, %s, %s)"
        ).format(s),
        (token_id, tenant, name, _digest(secret), expires),
    )
    return f"{TOKEN_PREFIX}_{token_id}_{secret}", Token(token_id, tenant, name, expires)


class TokenError(Exception):
    """Why a token is refused (missing, malformed, unknown, expired, revoked)."""


def split_token(token: str | None) -> tuple[str, str]:
    """(id, secret) of ``pst_<id>_<secret>``, or TokenError."""
    if not token:
        raise TokenError("missing token: send 'Authorization: Bearer <token>'")
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1] or not parts[2]:
        raise TokenError("malformed token")
    return parts[1], parts[2]


TOKEN_ROW = "SELECT tenant, name, hash, expires_at, revoked_at FROM {}.api_tokens WHERE id = %s"


def judge_token(token_id: str, secret: str, row: tuple[object, ...] | None) -> Token:
    """The token's record, or TokenError saying why it is refused (``row``: :data:`TOKEN_ROW`'s answer)."""
    if row is None or not hmac.compare_digest(str(row[2]), _digest(secret)):
        raise TokenError("unknown token")
    if row[4] is not None:
        raise TokenError("revoked token")
    expires = row[3] if isinstance(row[3], datetime) else None
    if expires is not None and expires <= datetime.now(UTC):
        raise TokenError("expired token")
    return Token(token_id, str(row[0]), str(row[1]), expires)


def check_token(conn: psycopg.Connection, schema: str, token: str | None) -> Token:
    token_id, secret = split_token(token)
    row = conn.execute(sql.SQL(TOKEN_ROW).format(sql.Identifier(schema)), (token_id,)).fetchone()
    return judge_token(token_id, secret, row)


def revoke_token(conn: psycopg.Connection, schema: str, token_id: str) -> bool:
    cur = conn.execute(
        sql.SQL("UPDATE {}.api_tokens SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL").format(
            sql.Identifier(schema)
        ),
        (token_id,),
    )
    return cur.rowcount == 1


def list_tokens(
    conn: psycopg.Connection, schema: str
) -> list[tuple[str, str, str, datetime, datetime | None, datetime | None]]:
    """(id, tenant, name, created_at, expires_at, revoked_at) of every token (never the secret)."""
    return [
        tuple(r)
        for r in conn.execute(
            sql.SQL(
                "SELECT id, tenant, name, created_at, expires_at, revoked_at "
                "FROM {}.api_tokens ORDER BY created_at"
            ).format(sql.Identifier(schema))
        ).fetchall()
    ]

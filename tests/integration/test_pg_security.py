"""Least-privilege database roles and TLS on the real PostgreSQL.

The sink's runtime role ``<schema>_writer`` writes through a worker (plain PostgreSQL and TimescaleDB),
creates a new month's partition and drops old months only through the owner's functions, and can do
nothing else; ``<schema>_readonly`` reads and cannot write. TLS is tried on a private cluster (its own
state directory and port), started and stopped here, so the shared one is never restarted.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from connectors.common.producer import TelemetryProducer
from connectors.common.sink import Entry
from connectors.timescale import tenancy
from connectors.timescale.schema import create_schema, timescale_status
from pipeline.deploy import deploy
from pipeline.topology import Topology, validate_data
from pipeline.worker import build_worker
from tests.conftest import drop_schema, wait_for
from tests.e2e.test_mqtt_to_postgres import agg_rows
from tests.integration.test_event_time import minute_now, send, series_of
from tests.integration.test_postgres_retention import partitions
from tests.integration.test_postgres_sink import agg

pytestmark = [pytest.mark.integration, pytest.mark.faults]  # also in make faults
DAY = 86_400_000
DENIED = psycopg.errors.InsufficientPrivilege


def as_role(dsn: str, role: str, password: str) -> str:
    return make_conninfo(dsn, user=role, password=password)


def topo_with_roles(
    ns: dict[str, str], owner_dsn: str, writer_dsn: str, timescaledb: str, **sink: Any
) -> Topology:
    return validate_data(
        {
            "name": f"sec{ns['tag']}",
            "prefix": ns["prefix"],
            "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 1},
            "aggregates": {"grace": "10s", "idle_timeout": "2s", "checkpoint_interval": "300ms"},
            "sinks": [
                {
                    "id": "pg",
                    "type": "postgres",
                    "dsn": writer_dsn,
                    "admin_dsn": owner_dsn,
                    "schema": ns["schema"],
                    "topics": ["agg_1m", "readings"],
                    "batch_delay": "100ms",
                    "timescaledb": timescaledb,
                    **sink,
                }
            ],
        }
    )


def deploy_with_roles(
    ns: dict[str, str], owner_dsn: str, timescaledb: str, writer_options: dict[str, str] | None = None
) -> tuple[Topology, dict[str, str]]:
    """Deploy as the owner, then give the runtime roles passwords (as ``plantstream db password`` does);
    returns the topology (its sink's dsn the writer's) and the DSN of each runtime role."""
    schema = ns["schema"]
    passwords = {kind: secrets.token_urlsafe(12) for kind in ("writer", "readonly")}
    roles = tenancy.runtime_roles(schema)
    dsns = {k: as_role(owner_dsn, roles[k], passwords[k]) for k in roles}
    writer_dsn = make_conninfo(dsns["writer"], **(writer_options or {}))
    topo = topo_with_roles(ns, owner_dsn, writer_dsn, timescaledb, retention="90d")
    said: list[str] = []
    deploy(topo, say=said.append)
    with psycopg.connect(owner_dsn, autocommit=True) as conn:
        for kind, role in roles.items():
            tenancy.set_password(conn, role, passwords[kind])
    text = "\n".join(said)
    assert roles["writer"] in text and roles["readonly"] in text  # deploy names them
    assert not any(p in text for p in passwords.values())
    return topo, {**dsns, "writer": writer_dsn}


@pytest.fixture(params=["off", "auto"])
def timescaledb(request: pytest.FixtureRequest, namespace: dict[str, str]) -> str:
    if request.param == "auto":
        ok, why = timescale_status(namespace["PLANTSTREAM_PG_DSN"])
        if not ok:
            pytest.skip(f"TimescaleDB is not available on this machine: {why}")
    return str(request.param)


def run_worker_until_rows(topo: Topology, ns: dict[str, str], app_id: str, expect: int) -> None:
    """Readings of two points over 2 minutes into telemetry.raw; the worker (its sink as the writer role)
    until ``expect`` rows of agg_1m are there (read as the owner)."""
    start = minute_now() - 180_000
    readings = series_of("dev1", start, 120)
    producer = TelemetryProducer(topo.broker.bootstrap, topo.raw_topic, topo.dlq_topic)
    worker = build_worker(topo, app_id)
    worker.start()
    try:
        send(producer, readings)
        assert producer.flush(30) == 0
        wait_for(
            lambda: len(agg_rows(ns["PLANTSTREAM_PG_DSN"], ns["schema"])) >= expect,
            120,
            f"{expect} rows in agg_1m written as the writer role",
        )
        wait_for(
            lambda: count(ns["PLANTSTREAM_PG_DSN"], ns["schema"], "readings") == len(readings),
            60,
            f"{len(readings)} rows in readings written as the writer role",
        )
    finally:
        worker.stop()


def count(dsn: str, schema: str, table: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.{}").format(*map(sql.Identifier, (schema, table)))
        )
        got = row.fetchone()
    return int(got[0]) if got else 0


def write_entries(topo: Topology, entries: list[Entry]) -> None:
    writer = topo.sinks[0].open_writer(f"{topo.app_id}/pg")

    async def go() -> None:
        try:
            result = await writer.write("agg_1m", topo.agg_topic, entries)
            assert result.written == len(entries) and not result.refused, result
        finally:
            await writer.close()

    asyncio.run(go())


def test_the_writer_role_runs_the_sink(namespace: dict[str, str], timescaledb: str) -> None:
    ns = namespace
    owner, schema = ns["PLANTSTREAM_PG_DSN"], ns["schema"]
    topo, dsns = deploy_with_roles(ns, owner, timescaledb)
    with psycopg.connect(dsns["writer"]) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (f"{schema}_writer",)

    # Two points over two whole minutes: 4 closed windows through the worker, as the writer.
    run_worker_until_rows(topo, ns, f"sec-{ns['tag']}", 4)

    # A month no deploy made (40 days back) and one past the retention (400 days back), then today.
    now = int(time.time() * 1000)
    now -= now % 60_000
    ages = {"s/d/recent": 40 * DAY, "s/d/year": 400 * DAY, "s/d/now": 0}
    entries = [Entry(0, 1000 + i, agg(s, now - age, 1.0)) for i, (s, age) in enumerate(ages.items())]
    before = partitions(owner, schema, "agg_1m")
    write_entries(topo, entries)
    kept = {s for (s, _b) in agg_rows(owner, schema)}
    if timescaledb == "off":
        after = partitions(owner, schema, "agg_1m")
        recent = time.gmtime((now - 40 * DAY) / 1000)
        made = f"agg_1m_y{recent.tm_year:04d}m{recent.tm_mon:02d}"
        assert made not in before and made in after  # created by the writer, through the owner's function
        # Past the retention: created for the batch, then dropped by the sink's retention pass (as writer).
        assert {"s/d/recent", "s/d/now"} <= kept and "s/d/year" not in kept
        assert not any(
            p.endswith(time.strftime("y%Ym%m", time.gmtime((now - 400 * DAY) / 1000))) for p in after
        )
    else:
        # TimescaleDB made the chunks for the writer's INSERTs (all three rows were written); retention is
        # the owner's policy job, run here at once instead of waiting for its schedule.
        assert {"s/d/recent", "s/d/now"} <= kept
        with psycopg.connect(owner, autocommit=True) as conn:
            jobs = conn.execute(
                "SELECT hypertable_name, job_id FROM timescaledb_information.jobs "
                "WHERE hypertable_schema = %s AND proc_name = 'policy_retention'",
                (schema,),
            ).fetchall()
            assert sorted(j[0] for j in jobs) == ["agg_1m", "readings"]
            conn.execute("CALL run_job(%s)", (dict(jobs)["agg_1m"],))
        kept = {s for (s, _b) in agg_rows(owner, schema)}
        assert {"s/d/recent", "s/d/now"} <= kept and "s/d/year" not in kept

    # The read-only role reads every row, agg_1h too (the continuous aggregate's view on TimescaleDB).
    with psycopg.connect(dsns["readonly"]) as conn:
        seen = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.agg_1m").format(sql.Identifier(schema))
        ).fetchone()
        assert seen is not None and seen[0] == len(agg_rows(owner, schema))
        hours = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.agg_1h").format(sql.Identifier(schema))
        ).fetchone()
        assert hours is not None and hours[0] >= 1


def test_the_runtime_roles_may_do_only_their_part(namespace: dict[str, str]) -> None:
    ns = namespace
    owner, schema = ns["PLANTSTREAM_PG_DSN"], ns["schema"]
    _topo, dsns = deploy_with_roles(ns, owner, "off")
    other = f"{schema}_other"  # another sink's schema in the same database
    create_schema(owner, other, ("agg_1m",), timescale=False)
    s, o = sql.Identifier(schema), sql.Identifier(other)
    try:
        with psycopg.connect(dsns["writer"], autocommit=True) as conn:
            for statement in (
                sql.SQL("DROP TABLE {}.agg_1m").format(s),
                sql.SQL("ALTER TABLE {}.agg_1m ADD COLUMN x int").format(s),
                sql.SQL("CREATE TABLE {}.mine (x int)").format(s),
                sql.SQL("TRUNCATE {}.agg_1m").format(s),
                sql.SQL("DELETE FROM {}.agg_1m").format(s),
                sql.SQL("SELECT * FROM {}.agg_1m").format(o),  # not its schema
                sql.SQL("SELECT * FROM {}.api_tokens").format(s),  # the tokens' hashes: the owner's only
                sql.SQL("SELECT {}.create_month_partition('tenants', now())").format(s),  # not a sink table
                sql.SQL("SELECT * FROM {}.drop_months_before('tenant_sites', now())").format(s),
                sql.SQL("CREATE INDEX ON {}.agg_1m (site)").format(s),
            ):
                with pytest.raises(DENIED):
                    conn.execute(statement)
                    pytest.fail(f"the writer role may: {statement.as_string(conn)}")
            # What the writer does need: stage rows in a temporary table like the real one.
            conn.execute(sql.SQL("CREATE TEMP TABLE stage (LIKE {}.agg_1m)").format(s))

        with psycopg.connect(dsns["readonly"], autocommit=True) as conn:
            assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
            conn.execute(sql.SQL("SELECT count(*) FROM {}.agg_1m").format(s))
            conn.execute(sql.SQL("SELECT count(*) FROM {}.sink_offsets").format(s))
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute(sql.SQL("INSERT INTO {}.sink_offsets VALUES ('c', 't', 0, 1)").format(s))
            # And without the read-only default, the privileges refuse it.
            conn.execute("SET default_transaction_read_only = off")
            for statement in (
                sql.SQL("INSERT INTO {}.sink_offsets VALUES ('c', 't', 0, 1)").format(s),
                sql.SQL("UPDATE {}.agg_1m SET mean = 0").format(s),
                sql.SQL("SELECT {}.create_month_partition('agg_1m', now())").format(s),
                sql.SQL("SELECT * FROM {}.agg_1m").format(o),
            ):
                with pytest.raises(DENIED):
                    conn.execute(statement)

        # A tenant role (a reader of its tenant's rows) may not run the owner's functions either.
        with psycopg.connect(owner, autocommit=True) as conn:
            tenancy.add_tenant(conn, schema, "a", ["s"])
            tenancy.grant_role(conn, schema, "a", f"{schema}_ta", "pw-a")
        tenant_dsn = as_role(owner, f"{schema}_ta", "pw-a")
        with psycopg.connect(tenant_dsn, autocommit=True) as conn, pytest.raises(DENIED):
            conn.execute(sql.SQL("SELECT {}.create_month_partition('agg_1m', now())").format(s))
    finally:
        with psycopg.connect(owner, autocommit=True) as conn:
            tenancy.drop(conn, other)
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(o))


# ---- TLS, on a private cluster -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _services(env: dict[str, str], verb: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "services", verb, "postgres"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"services {verb} postgres: {done.stdout[-1500:]}{done.stderr[-1500:]}"


@pytest.fixture(scope="module")
def private_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A PostgreSQL of its own (state directory, port), as ``plantstream services up`` makes it; its
    connection variables (PLANTSTREAM_PG_DSN, PLANTSTREAM_PG_CA)."""
    from localservices import harness

    root = tmp_path_factory.mktemp("pg")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANTSTREAM_")}
    env.update(PLANTSTREAM_LOCAL_DIR=str(root), PLANTSTREAM_PG_PORT=str(_free_port()))
    _services(env, "up")
    try:
        saved = dict(os.environ)
        try:
            os.environ.update({k: v for k, v in env.items() if k.startswith("PLANTSTREAM_")})
            conn_env = harness.connection_env()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        yield {k: conn_env[k] for k in ("PLANTSTREAM_PG_DSN", "PLANTSTREAM_PG_CA")}
    finally:
        _services(env, "down")


def _ssl_of_this_connection(conn: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
    return conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()


def test_tls_and_the_local_cluster_without_superuser(
    private_pg: dict[str, str], namespace: dict[str, str], tmp_path: Path
) -> None:
    dsn, ca = private_pg["PLANTSTREAM_PG_DSN"], private_pg["PLANTSTREAM_PG_CA"]
    assert Path(ca).is_file()
    verified = make_conninfo(dsn, sslmode="verify-full", sslrootcert=ca)
    for host in ("127.0.0.1", "localhost"):  # both names are in the server certificate
        with psycopg.connect(make_conninfo(verified, host=host)) as conn:
            got = _ssl_of_this_connection(conn)
            assert got is not None and got[0] is True and str(got[1]).startswith("TLS")
            assert conn.execute(
                "SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user"
            ).fetchone() == (False, True)
    # The DSN as it always was still connects (libpq's default, prefer, takes TLS when offered) ...
    assert "sslmode" not in conninfo_to_dict(dsn)
    with psycopg.connect(dsn) as conn:
        got = _ssl_of_this_connection(conn)
        assert got is not None and got[0] is True
    # ... and so does a client that will not speak TLS.
    with psycopg.connect(make_conninfo(dsn, sslmode="disable")) as conn:
        assert _ssl_of_this_connection(conn) == (False, None)
    # A CA that did not sign the server's certificate is refused.
    other_ca = _self_signed_ca(tmp_path / "other-ca.crt")
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(make_conninfo(dsn, sslmode="verify-full", sslrootcert=str(other_ca)))

    # The sink over TLS, as its writer role; deploy as the non-superuser owner (TimescaleDB where the
    # cluster has it: the harness created the extension as the real superuser).
    ns = {**namespace, "PLANTSTREAM_PG_DSN": dsn}
    topo, _ = deploy_with_roles(ns, verified, "auto", {"sslmode": "verify-full", "sslrootcert": ca})
    writer = topo.sinks[0].open_writer(f"{topo.app_id}/pg")
    now = int(time.time() * 1000)
    now -= now % 60_000

    async def go() -> tuple[Any, ...] | None:
        try:
            res = await writer.write("agg_1m", topo.agg_topic, [Entry(0, 0, agg("s/d/tls", now, 2.0))])
            assert res.written == 1 and not res.refused
            conn = writer.writer._conn  # the connection the rows went over
            assert conn is not None
            cur = await conn.execute("SELECT ssl, current_user FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            return await cur.fetchone()
        finally:
            await writer.close()

    assert asyncio.run(go()) == (True, f"{ns['schema']}_writer")
    assert set(agg_rows(verified, ns["schema"])) == {("s/d/tls", now)}
    drop_schema(verified, ns["schema"])  # the teardown of a non-superuser owner
    with psycopg.connect(verified, autocommit=True) as conn:
        gone = conn.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE %s", (f"{ns['schema']}\\_%",)
        ).fetchone()
        assert gone == (0,)


def _self_signed_ca(path: Path) -> Path:
    """A CA certificate of its own (not the one that signed the server's)."""
    key = path.with_suffix(".key")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(path),
            "-days",
            "1",
            "-subj",
            "/CN=another CA",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path

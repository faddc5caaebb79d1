"""The Grafana dashboards in grafana/dashboards against the real PostgreSQL.

Every SQL target of every panel and every SQL template variable is expanded as Grafana's PostgreSQL
datasource expands it (tests/grafana_sql.py), then run in a schema made by the postgres sink's own DDL and
filled with two hours of plant data: it must run, return the columns its panel needs (``time`` first for a
time series; the columns a table panel names), and return rows. Grafana itself is not needed.

The queries run as Grafana's datasource would: as a tenant's login role (``tenancy.grant_role``, what
``plantstream tenants role`` makes) whose search_path is the tenant schema ``<schema>_tenant``, read-only.
The data has one more site, owned by a second tenant; no panel and no variable may show anything of it.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.conninfo import make_conninfo

from connectors.timescale import tenancy
from connectors.timescale.rows import ROWS
from connectors.timescale.schema import create_schema, month_bounds, partition_ddl, timescale_status
from connectors.timescale.writer import COLUMNS
from tests.grafana_sql import (
    Target,
    TimeRange,
    Variable,
    expand,
    expand_macros,
    iter_panels,
    load_dashboard,
    parse_interval,
    targets,
    variable_queries,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "grafana"
# The SQL dashboards; operations.json reads Prometheus (its PromQL is checked in tests/unit/test_metrics.py).
DASHBOARDS = sorted(p for p in (GRAFANA / "dashboards").glob("*.json") if p.name != "operations.json")
DATASOURCE = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "plantstream.yaml").read_text())[
    "datasources"
][0]
RANGE = timedelta(hours=2)  # the dashboards' time range in these tests: the last two hours
TABLES = ("agg_1m", "readings", "kpi_results", "alarm_events", "alarms")

# type OIDs: what Grafana takes as a time column, and as a number
TIME_TYPES = {1184, 1114, 1700, 701, 700, 20, 23}  # timestamptz, timestamp, or epoch seconds
NUMBER_TYPES = {20, 21, 23, 700, 701, 1700}


@dataclass(frozen=True)
class Mode:
    storage: str  # "plain" (monthly partitions, agg_1h a view) or "timescaledb" (hypertables, rollup)
    timescaledb_macros: bool  # the datasource's TimescaleDB option: $__timeGroup as time_bucket()


MODES = {
    "plain": Mode("plain", False),
    "timescaledb": Mode("timescaledb", False),
    "timescaledb-time_bucket": Mode("timescaledb", True),
}


@pytest.fixture(params=list(MODES))
def mode(request, namespace) -> Mode:
    m = MODES[request.param]
    if m.storage == "timescaledb":
        ok, why = timescale_status(namespace["PLANTSTREAM_PG_DSN"])
        if not ok:
            pytest.skip(f"TimescaleDB is not available on this machine: {why}")
    return m


@pytest.fixture
def time_range() -> TimeRange:
    end = datetime.now(UTC)
    end = end.replace(microsecond=end.microsecond // 1000 * 1000)  # Grafana's ranges are in milliseconds
    return TimeRange(end - RANGE, end)


# ---- two hours of a plant ------------------------------------------------------------------------------

# site, device, point, unit, level, daily swing, noise. One site name needs quoting in SQL (variables).
SERIES = [
    ("solarpark", "inv1", "p_ac", "kW", 420.0, 80.0, 6.0),
    ("solarpark", "inv2", "p_ac", "kW", 405.0, 75.0, 6.0),
    ("solarpark", "bat1", "soc", "%", 64.0, 8.0, 0.2),
    ("hq", "ahu1", "supply_temp", "°C", 18.0, 1.5, 0.1),
    ("hq", "ahu2", "supply_temp", "°C", 18.5, 1.2, 0.1),
    ("king's-lynn", "hp1", "cop", None, 3.4, 0.4, 0.05),
    ("windfarm", "wt1", "rotor_speed", "rpm", 14.0, 2.0, 0.1),  # tenant B's site
]
SAMPLE_S = 10  # one reading per 10 s
LOOP_SITES = {"FIC-101": "solarpark", "LIC-301": "hq", "TIC-201": "king's-lynn", "PIC-401": "windfarm"}
LOOPS = sorted(LOOP_SITES)
# Tenant A owns every site but one, which tenant B owns; the panels run as A's role. Nothing of B (its site,
# its loop) may appear in any cell of any panel's or variable's result.
B_SITE = "windfarm"
TENANT_SITES = {"a": sorted({s[0] for s in SERIES} - {B_SITE}), "b": [B_SITE]}
B_MARKS = (B_SITE, *(loop for loop, site in LOOP_SITES.items() if site == B_SITE))
KPI_WINDOW = timedelta(minutes=15)


def ms(t: datetime) -> int:
    return round(t.timestamp() * 1000)


def plant_minutes(
    start: datetime, end: datetime, rng: random.Random
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(Aggregate, ReadingBatch) per series and closed minute from ``start`` to ``end``: a few readings of
    bad quality now and then, and a 5-minute outage of one inverter."""
    minute = start.replace(second=0, microsecond=0)
    outage = (end - timedelta(minutes=50)).replace(second=0, microsecond=0)
    while minute + timedelta(minutes=1) <= end:
        for n, (site, device, point, unit, level, swing, noise) in enumerate(SERIES):
            if device == "inv2" and outage <= minute < outage + timedelta(minutes=5):
                continue
            readings: list[dict[str, Any]] = []
            for k in range(60 // SAMPLE_S):
                ts = minute + timedelta(seconds=k * SAMPLE_S)
                phase = 2 * math.pi * (ts.timestamp() % 86400) / 86400 + n
                value = level + swing * math.sin(phase) + rng.gauss(0.0, noise)
                bad = (minute.minute + n) % 17 == 0 and k < 2
                quality = "bad" if bad else "good"
                reading = {"point": point, "ts": ms(ts), "value": value, "quality": quality}
                readings.append(reading if unit is None else {**reading, "unit": unit})
            good: list[float] = [r["value"] for r in readings if r["quality"] == "good"]
            mean = sum(good) / len(good)
            stddev = math.sqrt(sum((v - mean) ** 2 for v in good) / (len(good) - 1))
            aggregate = {
                "series": f"{site}/{device}/{point}",
                "site": site,
                "device": device,
                "point": point,
                "window_start": ms(minute),
                "window_end": ms(minute + timedelta(minutes=1)),
                "count": len(readings),
                "good_count": len(good),
                "min": min(good),
                "max": max(good),
                "mean": mean,
                "sum": sum(good),
                "first": good[0],
                "last": good[-1],
                "stddev": stddev,
                "unit": unit,
            }
            batch = {"v": 1, "source": "site-mqtt", "site": site, "device": device, "readings": readings}
            yield aggregate, batch
        minute += timedelta(minutes=1)


def loop_kpis(start: datetime, end: datetime, rng: random.Random) -> Iterator[dict[str, Any]]:
    """LoopKpi records per loop and closed 15-minute window; Harris never has its horizon in 2 h."""
    window = datetime.fromtimestamp(start.timestamp() // 900 * 900, UTC)
    while window + KPI_WINDOW <= end:
        for loop in LOOPS:
            manual = loop == "LIC-301" and window.minute == 30  # in MAN for one window

            def ok(value: float, coverage: float = 1.0) -> dict[str, Any]:
                return {"value": value, "status": "ok", "coverage": coverage, "horizon_s": 900.0}

            kpis = {
                "data_quality": ok(100.0 - rng.random() * 2),
                "service_factor": ok(40.0 if manual else 100.0),
                "iae": ok(0.5 + rng.random()) if not manual else None,
                "osc_hagglund": ok(1.0 if loop == "TIC-201" else 0.0),
                "harris": {
                    "value": None,
                    "status": "insufficient_data",
                    "coverage": 1.0,
                    "horizon_s": 900.0,
                    "reason": "horizon 900 s, at least 1000 samples needed",
                    "extras": {"samples": 900},
                },
            }
            if kpis["iae"] is None:
                kpis["iae"] = {
                    "value": None,
                    "status": "insufficient_data",
                    "coverage": 0.4,
                    "horizon_s": 900.0,
                    "reason": "normal mode 40 % of the window, at least 50 % needed",
                }
            yield {
                "loop": loop,
                "window_start": ms(window),
                "window_end": ms(window + KPI_WINDOW),
                "samples": 900,
                "closed_by": "watermark",
                "kpis": kpis,
            }
        window += KPI_WINDOW


def alarm_events(end: datetime) -> list[dict[str, Any]]:
    """AlertEvents of a few instances: raised and acknowledged, cleared unacknowledged, still active,
    chattering, a flood of 12 raises in 4 minutes, a loop alarm, and one standing for 26 hours."""
    seq: dict[str, int] = {}
    out: list[dict[str, Any]] = []

    def ev(instance: str, ago_min: float, transition: str, state: str, active: bool, **more: Any) -> None:
        seq[instance] = seq.get(instance, 0) + 1
        rule, source = instance.split("/", 1)
        out.append(
            {
                "id": f"{instance}#{seq[instance]}",
                "instance": instance,
                "rule": rule,
                "source": source,
                "seq": seq[instance],
                "ts": ms(end - timedelta(minutes=ago_min)),
                "transition": transition,
                "state": state,
                "active": active,
                "severity": more.pop("severity", "high"),
                "value": more.pop("value", None),
                "limit": more.pop("limit", None),
                "unit": more.pop("unit", None),
                "message": more.pop("message", f"{rule} on {source}"),
                "labels": {"area": source.split("/")[0]},
                "shelved_until": None,
                "suppressed": False,
                "out_of_service": False,
                "chattering": more.pop("chattering", False),
                "notify": more.pop("notify", True),
                **more,
            }
        )

    def ack(instance: str, ago_min: float, state: str, active: bool, severity: str = "high") -> None:
        at = ms(end - timedelta(minutes=ago_min))
        cmd = f"cmd-{instance}-{at}"
        ev(instance, ago_min, "ack", state, active, severity=severity, by="operator1", command=cmd, at=at)

    t = "hi_temp/hq/ahu1/supply_temp"
    ev(t, 100, "raise", "unack", True, value=24.1, limit=24.0, unit="°C")
    ack(t, 95, "acked", True)
    ev(t, 80, "clear", "normal", False, value=23.2, limit=24.0, unit="°C")
    t = "lo_soc/solarpark/bat1/soc"
    ev(t, 40, "raise", "unack", True, severity="medium", value=19.5, limit=20.0, unit="%")
    t = "p_dev/solarpark/inv2/p_ac"
    ev(t, 70, "raise", "unack", True, severity="low", value=0.0, limit=50.0, unit="kW")
    ev(t, 60, "clear", "rtn_unack", False, severity="low", value=398.0, limit=50.0, unit="kW")
    t = "hi_temp/hq/ahu2/supply_temp"
    for i in range(4):
        ev(t, 30 - 2 * i, "raise", "unack", True, value=24.2, limit=24.0, unit="°C")
        ev(t, 29 - 2 * i, "clear", "rtn_unack", False, value=23.9, limit=24.0, unit="°C")
    ev(t, 22, "raise", "unack", True, value=24.3, limit=24.0, unit="°C")
    ev(t, 21.5, "chatter", "unack", True, chattering=True, notify=False)
    for i in range(12):
        t = f"comm_loss/solarpark/string{i:02d}/i_dc"
        ev(t, 35 - i / 3, "raise", "unack", True, severity="medium", message="no data for 60 s")
        ev(t, 25 - i / 3, "clear", "rtn_unack", False, severity="medium", message="data again")
        ack(t, 20, "normal", False, severity="medium")
    t = "osc/FIC-101"
    ev(t, 50, "raise", "unack", True, message="FIC-101 oscillates (Hägglund)")
    ack(t, 45, "acked", True)
    t = "lo_cop/king's-lynn/hp1/cop"
    ev(t, 26 * 60, "raise", "unack", True, severity="critical", value=1.2, limit=2.0)
    # tenant B's: one active per series and per loop, and one in its chatter
    t = "hi_speed/windfarm/wt1/rotor_speed"
    ev(t, 30, "raise", "unack", True, value=19.0, limit=18.0, unit="rpm")
    ev(t, 29, "chatter", "unack", True, chattering=True, notify=False)
    t = "osc/PIC-401"
    ev(t, 15, "raise", "unack", True, severity="medium", message="PIC-401 oscillates (Hägglund)")
    return out


def insert(conn: psycopg.Connection, schema: str, table: str, records: list[Any]) -> None:
    """Plain INSERTs of ``records`` mapped to rows by the sink's own mapping (connectors.timescale.rows)."""
    to_rows, _ = ROWS[table]
    rows = [row for rec in records for row in to_rows(rec)]
    cols = COLUMNS[table]
    stmt = sql.SQL("INSERT INTO {}.{} ({}) VALUES ({})").format(
        sql.Identifier(schema),
        sql.Identifier(table),
        sql.SQL(", ").join(map(sql.Identifier, cols)),
        sql.SQL(", ").join(sql.Placeholder() * len(cols)),
    )
    with conn.cursor() as cur:
        cur.executemany(stmt, rows)


@pytest.fixture
def populated(namespace, mode, time_range) -> TimeRange:
    """The sink's tables (its own DDL) in the test's schema, with the last two hours (and a bit) of data."""
    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    kinds = create_schema(dsn, schema, TABLES, timescale=mode.storage == "timescaledb")
    assert kinds["agg_1m"] == ("hypertable" if mode.storage == "timescaledb" else "partitioned")
    rng = random.Random(191)
    start, end = time_range.start - timedelta(minutes=20), time_range.end
    minutes = list(plant_minutes(start, end, rng))
    events = alarm_events(end)
    newest: dict[str, dict[str, Any]] = {}
    for e in events:  # the alarms table: each instance's newest event
        if e["seq"] > newest.get(e["instance"], {"seq": 0})["seq"]:
            newest[e["instance"]] = e
    with psycopg.connect(dsn, autocommit=True) as conn:
        if kinds["agg_1m"] == "partitioned":  # the months the data reaches (the writer does this too)
            month = month_bounds(start - KPI_WINDOW)[0]
            while month < end:
                for table in ("agg_1m", "readings", "kpi_results"):
                    conn.execute(partition_ddl(schema, table, month))
                month = month_bounds(month)[1]
        with conn.transaction():
            insert(conn, schema, "agg_1m", [a for a, _ in minutes])
            insert(conn, schema, "readings", [b for _, b in minutes])
            insert(conn, schema, "kpi_results", list(loop_kpis(start, end, rng)))
            insert(conn, schema, "alarm_events", events)
            insert(conn, schema, "alarms", list(newest.values()))
        if kinds["agg_1m"] == "hypertable":
            conn.execute("CALL refresh_continuous_aggregate(%s, NULL, NULL)", (f"{schema}.agg_1h_rollup",))
        tenancy.set_loop_sites(conn, schema, LOOP_SITES)  # as deploy does from the topology
        for table in (
            "agg_1m",
            "agg_1h",
            "readings",
            "kpi_results",
            "alarm_events",
            "alarms",
            "alarm_health",
        ):
            # the owner sees tenant B's rows: the isolation check below is not vacuous
            view = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
            site = {
                "kpi_results": "(SELECT l.site FROM {s}.loop_sites l WHERE l.loop_id = kpi_results.loop_id)",
                "alarm_events": "{s}.source_site(source)",
                "alarms": "{s}.source_site(source)",
            }.get(table, "site")
            query = sql.SQL("SELECT count(*) FROM {} WHERE " + site + " = %s").format(
                view, s=sql.Identifier(schema)
            )
            assert conn.execute(query, (B_SITE,)).fetchone() != (0,), table
    return time_range


@pytest.fixture
def panel_dsn(namespace, mode, populated) -> str:
    """Where the panels' queries run: as tenant A's login role, made as ``plantstream tenants role`` makes
    it, with the settings grafana/README.md gives it: search_path the tenant schema (the queries name no
    schema), with the TimescaleDB option the extension's schema after it (for time_bucket(); relations still
    resolve to the tenant schema first, and the runs without that option prove that every one of them is
    there), and read-only transactions. The two tenants split the seeded sites (TENANT_SITES)."""
    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    role, password = f"{schema}_grafana_a", secrets.token_urlsafe(16)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for tenant, sites in TENANT_SITES.items():
            tenancy.add_tenant(conn, schema, tenant, sites, f"tenant {tenant.upper()}")
        tenancy.grant_role(conn, schema, "a", role, password)
        path = [tenancy.tenant_schema(schema)]
        if mode.timescaledb_macros:
            row = conn.execute(
                "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'timescaledb'"
            ).fetchone()
            assert row is not None
            path.append(row[0])
        r = sql.Identifier(role)
        conn.execute(
            sql.SQL("ALTER ROLE {} SET search_path = {}").format(
                r, sql.SQL(", ").join(map(sql.Identifier, path))
            )
        )
        conn.execute(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(r))
    conninfo = make_conninfo(dsn, user=role, password=password)
    with psycopg.connect(conninfo) as conn:  # what the datasource gets: the role's own settings
        got = conn.execute(
            "SELECT current_user, current_setting('search_path'), current_setting('transaction_read_only')"
        ).fetchone()
        assert got == (role, ", ".join(path), "on"), got
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # the base tables are not its to read
            conn.execute(sql.SQL("SELECT 1 FROM {}.agg_1m LIMIT 1").format(sql.Identifier(schema)))
    return conninfo


# ---- running the dashboards ----------------------------------------------------------------------------


def min_interval() -> timedelta:
    """$__interval over two hours: range / max data points (a few seconds) is below the datasource's
    minimum interval (jsonData.timeInterval), so Grafana uses that minimum."""
    return parse_interval(DATASOURCE["jsonData"]["timeInterval"])


def tenant_b_in(names: list[str], rows: list[tuple[Any, ...]]) -> list[str]:
    """What of tenant B a result shows: a column name or a text cell (site, series, instance, source,
    loop, metric, message, ...) that contains B's site or loop."""
    cells = [*names, *(v for row in rows for v in row if isinstance(v, str))]
    return sorted({c for c in cells if any(mark in c for mark in B_MARKS)})


def resolve_variables(
    conn: psycopg.Connection, dashboard: dict[str, Any], tr: TimeRange, timescaledb: bool
) -> tuple[dict[str, Variable], list[str]]:
    """Each query variable's options from its SQL (in order: later ones may use earlier ones), and its value
    as Grafana picks it: "All" (every option) where allowed, else the saved value if offered, else the
    first option."""
    variables: dict[str, Variable] = {}
    failures = []
    for vq in variable_queries(dashboard):
        query = expand(vq.sql, tr, min_interval(), variables, timescaledb)
        try:
            options = [str(r[0]) for r in conn.execute(query).fetchall()]
        except psycopg.Error as e:
            failures.append(f"variable ${vq.name}: {e}\n{query}")
            continue
        if not options:
            failures.append(f"variable ${vq.name}: no options\n{query}")
            continue
        leaked = tenant_b_in([], [(o,) for o in options])
        if leaked:
            failures.append(f"variable ${vq.name}: offers tenant B's {leaked}\n{query}")
        value: str | list[str]
        if vq.include_all:
            value = options
        elif isinstance(vq.current, str) and vq.current in options:
            value = vq.current
        else:
            value = options[0]
        variables[vq.name] = Variable(vq.name, value, vq.multi, vq.include_all)
    return variables, failures


def check_target(conn: psycopg.Connection, target: Target, query: str) -> str | None:
    """What is wrong with the result of ``query`` for ``target``'s panel (None: nothing)."""
    try:
        cur = conn.execute(query)
        rows = cur.fetchall()
    except psycopg.Error as e:
        return f"does not run: {str(e).strip()}"
    assert cur.description is not None
    names = [d.name for d in cur.description]
    types = [d.type_code for d in cur.description]
    if target.format == "time_series":
        if not names or names[0] != "time":
            return f"a time series needs a time column first; columns: {names}"
        if types[0] not in TIME_TYPES:
            return f"its time column is of type oid {types[0]}, not a time or epoch seconds"
        if not any(t in NUMBER_TYPES for t in types[1:]):
            return f"a time series needs a numeric value column; columns: {names}"
        times = [r[0] for r in rows]
        if times != sorted(times):
            return "rows are not ordered by time (Grafana needs them so)"
    missing = [c for c in target.columns if c not in names]
    if missing:
        return f"columns the panel names are missing: {missing}; columns: {names}"
    if not rows:
        return "no rows, where the data has some"
    leaked = tenant_b_in(names, rows)
    if leaked:
        return f"shows tenant B's {leaked}"
    return None


def test_every_panel_query_runs_and_returns_its_columns(populated, panel_dsn, mode):
    tr = populated
    failures: list[str] = []
    checked = 0
    with psycopg.connect(panel_dsn, autocommit=True) as conn:
        for path in DASHBOARDS:
            dashboard = load_dashboard(path)
            variables, problems = resolve_variables(conn, dashboard, tr, mode.timescaledb_macros)
            failures += [f"{path.name}: {p}" for p in problems]
            for target in targets(dashboard):
                interval = max(min_interval(), parse_interval(target.interval or "0"))
                try:
                    query = expand(target.sql, tr, interval, variables, mode.timescaledb_macros)
                except ValueError as e:
                    failures.append(f"{target.label}: cannot be expanded: {e}")
                    continue
                problem = check_target(conn, target, query)
                checked += 1
                if problem:
                    failures.append(f"{target.label}: {problem}\n{query}")
    assert not failures, "\n\n".join(failures)
    assert checked >= 11


# ---- what holds without a database ---------------------------------------------------------------------


def test_dashboards_and_provisioning_fit_together():
    """Three dashboards; every panel queries the provisioned datasource; table panels name their columns
    (else the column check above checks nothing); the compose file mounts what the providers read."""
    assert [p.name for p in DASHBOARDS] == ["alarms.json", "loop-kpis.json", "plant-overview.json"]
    uid, kind = DATASOURCE["uid"], DATASOURCE["type"]
    assert kind == "grafana-postgresql-datasource" and DATASOURCE["jsonData"]["timescaledb"] is True
    for key in ("url", "user"):
        assert DATASOURCE[key].startswith("$PLANTSTREAM_GRAFANA_DB_")
    assert DATASOURCE["jsonData"]["database"] == "$PLANTSTREAM_GRAFANA_DB_NAME"
    assert DATASOURCE["secureJsonData"]["password"] == "$PLANTSTREAM_GRAFANA_DB_PASSWORD"
    for path in DASHBOARDS:
        dashboard = load_dashboard(path)
        found = targets(dashboard)
        assert found, path.name
        for t in found:
            assert t.format in ("time_series", "table"), t.label
            if t.format == "table":
                assert t.columns, f"{t.label}: a table panel should name its columns (organize)"
        panels = [p for p in iter_panels(dashboard) if p.get("type") != "row"]
        refs = [p.get("datasource") for p in panels]
        refs += [t.get("datasource") for p in panels for t in p.get("targets") or ()]
        refs += [v.get("datasource") for v in dashboard["templating"]["list"]]
        assert all(r == {"type": kind, "uid": uid} for r in refs), path.name
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "plantstream.yaml").read_text())
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in services["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    env = services["grafana"]["environment"]
    assert set(env) >= {"PLANTSTREAM_GRAFANA_DB_" + k for k in ("HOST", "NAME", "USER", "PASSWORD")}
    # a tenant's role (grafana/README.md makes it), not the owner; both from the environment, with defaults
    assert env["PLANTSTREAM_GRAFANA_DB_USER"] == "${PLANTSTREAM_GRAFANA_DB_USER:-grafana_demo}"
    assert env["PLANTSTREAM_GRAFANA_DB_PASSWORD"] == "${PLANTSTREAM_GRAFANA_DB_PASSWORD:-change-me}"
    assert services["timescaledb"]["environment"]["POSTGRES_USER"] != "grafana_demo"
    assert env["PLANTSTREAM_GRAFANA_DB_HOST"] == "timescaledb:5432"
    assert DATASOURCE["orgId"] == provider["providers"][0]["orgId"]  # one tenant's datasource, its dashboards


def test_targets_are_found_in_collapsed_rows():
    dashboard = {
        "uid": "d",
        "panels": [
            {"type": "timeseries", "title": "top", "targets": [{"refId": "A", "rawSql": "SELECT 1"}]},
            {
                "type": "row",
                "title": "r",
                "collapsed": True,
                "panels": [
                    {
                        "type": "table",
                        "title": "inner",
                        "targets": [{"refId": "B", "rawSql": "SELECT 2", "format": "table"}],
                        "transformations": [{"id": "organize", "options": {"indexByName": {"x": 0}}}],
                    }
                ],
            },
        ],
    }
    assert [(t.panel, t.ref_id, t.format, t.columns) for t in targets(dashboard)] == [
        ("top", "A", "time_series", ()),
        ("inner", "B", "table", ("x",)),
    ]


def test_macros_expand_as_grafana_expands_them():
    """The expectations of Grafana's own macros_test.go (grafana-postgresql-datasource), and variables."""
    tr = TimeRange(datetime(2018, 4, 12, 18, 0, tzinfo=UTC), datetime(2018, 4, 12, 18, 5, tzinfo=UTC))
    m = expand_macros
    assert m("WHERE $__timeFilter(time_column)", tr) == (
        "WHERE time_column BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00Z'"
    )
    assert (
        m("select $__timeFrom(), $__timeTo()", tr) == "select '2018-04-12T18:00:00Z', '2018-04-12T18:05:00Z'"
    )
    assert (
        m("SELECT $__timeGroup(time_column,'5m')", tr)
        == "SELECT floor(extract(epoch from time_column)/300)*300"
    )
    assert m("SELECT $__timeGroup(time_column,'5m'), value", tr) == (
        'SELECT floor(extract(epoch from time_column)/300)*300 AS "time", value'
    )
    assert m("$__timeGroupAlias(time_column , '5m')", tr) == (
        'floor(extract(epoch from time_column)/300)*300 AS "time"'
    )
    assert m("GROUP BY $__timeGroup(time_column , '5m')", tr, timescaledb=True) == (
        "GROUP BY time_bucket('300.000s',time_column)"
    )
    assert m("GROUP BY $__timeGroup(time_column , '20ms')", tr, timescaledb=True) == (
        "GROUP BY time_bucket('0.020s',time_column)"
    )
    assert m("GROUP BY $__timeGroup(time_column , '12d')", tr, timescaledb=True) == (
        "GROUP BY time_bucket('1036800.000s',time_column)"
    )
    assert m("select $__unixEpochFilter(time)", tr) == "select time >= 1523556000 AND time <= 1523556300"
    assert m("SELECT $__unixEpochGroupAlias(time_column+time_adjustment,'5m')", tr) == (
        'SELECT floor((time_column+time_adjustment)/300)*300 AS "time"'
    )
    assert m("select $__unixEpochNanoFrom()", tr) == "select 1523556000000000000"
    half = TimeRange(datetime(1960, 2, 1, 7, 0, 0, 500_000, tzinfo=UTC), tr.end)
    assert m("$__timeFilter(t)", half).startswith("t BETWEEN '1960-02-01T07:00:00.5Z'")
    with pytest.raises(ValueError, match="unknown macro"):
        m("SELECT $__nope(x)", tr)
    variables = {
        "site": Variable("site", ["a", "o'b"], multi=True, include_all=True),
        "one": Variable("one", "x'y"),
    }
    got = expand(
        "$site|${site}|[[site]]|${site:sqlstring}|${site:csv}|$one|${one:sqlstring}|$__interval|$__interval_ms|$other",
        tr,
        timedelta(minutes=1),
        variables,
    )
    assert got == "'a','o''b'|'a','o''b'|'a','o''b'|'a','o''b'|a,o'b|x''y|'x''y'|1m|60000|$other"

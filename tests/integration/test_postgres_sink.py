"""The PostgreSQL writer against the real server: idempotent replays, offsets, refused rows, partitions."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from connectors.timescale.rows import aggregate_row, ms_to_dt
from connectors.timescale.schema import create_schema, timescale_status
from connectors.timescale.writer import PostgresWriter, Record, is_temporary

pytestmark = pytest.mark.integration
T0 = 1_767_225_600_000


@pytest.fixture(params=["plain", "timescaledb"])
def backend(request, namespace) -> bool:
    """Each test on plain PostgreSQL (native partitions) and on TimescaleDB (hypertables)."""
    if request.param == "plain":
        return False
    ok, why = timescale_status(namespace["PLANTSTREAM_PG_DSN"])
    if not ok:
        pytest.skip(f"TimescaleDB is not available on this machine: {why}")
    return True


def agg(series: str, ws: int, mean: float, count: int = 3) -> dict:
    site, device, point = series.split("/")
    return {
        "series": series,
        "site": site,
        "device": device,
        "point": point,
        "window_start": ws,
        "window_end": ws + 60_000,
        "count": count,
        "good_count": count,
        "min": mean - 1,
        "max": mean + 1,
        "mean": mean,
        "sum": mean * count,
        "first": mean,
        "last": mean,
        "stddev": 1.0,
    }


def rows(dsn: str, schema: str) -> dict:
    with psycopg.connect(dsn) as conn:
        return {
            (s, b): (c, m)
            for s, b, c, m in conn.execute(
                f'SELECT series, bucket, count, mean FROM "{schema}".agg_1m'
            ).fetchall()
        }


def test_schema_is_idempotent_and_partitioned(namespace, backend):
    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    first = create_schema(dsn, schema, timescale=backend)
    second = create_schema(dsn, schema, timescale=backend)
    kind = "hypertable" if backend else "partitioned"
    assert first == second == {"agg_1m": kind, "readings": kind}


def test_replay_is_skipped_and_later_offsets_win(namespace, backend):
    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    create_schema(dsn, schema, timescale=backend)

    async def go() -> None:
        w = PostgresWriter(dsn, schema, consumer="t")
        recs = [
            Record(0, i, aggregate_row(agg(f"s/d/p{i % 3}", T0 + (i // 3) * 60_000, float(i))))
            for i in range(30)
        ]
        r1 = await w.write("agg_1m", "topic", recs)
        assert (r1.written, r1.skipped) == (30, 0)
        before = rows(dsn, schema)
        r2 = await w.write("agg_1m", "topic", recs)  # a replay after a crash
        assert (r2.written, r2.skipped) == (0, 30)
        assert rows(dsn, schema) == before
        # A re-emitted window with a higher offset updates the row; duplicates in one batch: last wins.
        again = [
            Record(0, 30, aggregate_row(agg("s/d/p0", T0, 100.0))),
            Record(0, 31, aggregate_row(agg("s/d/p0", T0, 200.0))),
        ]
        await w.write("agg_1m", "topic", again)
        assert rows(dsn, schema)[("s/d/p0", ms_to_dt(T0))] == (3, 200.0)
        # A month with no partition yet is created on the way.
        far = [Record(1, 0, aggregate_row(agg("s/d/p0", T0 - 400 * 86_400_000, 1.0)))]
        assert (await w.write("agg_1m", "topic", far)).written == 1
        await w.close()

    asyncio.run(go())


def test_refused_rows_are_returned_and_the_rest_written(namespace, backend):
    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    create_schema(dsn, schema, timescale=backend)

    async def go() -> None:
        w = PostgresWriter(dsn, schema, consumer="t")
        bad = agg("s/d/bad", T0, 1.0, count=2**40)  # does not fit the integer column: SQLSTATE 22003
        recs = [
            Record(0, 0, aggregate_row(agg("s/d/ok", T0, 1.0))),
            Record(0, 1, aggregate_row(bad), "bad"),
            Record(0, 2, aggregate_row(agg("s/d/ok2", T0, 2.0))),
        ]
        res = await w.write("agg_1m", "topic", recs)
        assert res.written == 2
        assert [r.source for r, _ in res.rejected] == ["bad"]
        assert "22003" in res.rejected[0][1]
        assert set(s for s, _ in rows(dsn, schema)) == {"s/d/ok", "s/d/ok2"}
        await w.close()

    asyncio.run(go())


def test_error_classification():
    class E(Exception):
        def __init__(self, state: str) -> None:
            super().__init__(state)
            self.sqlstate = state

    assert is_temporary(E("08006")) and is_temporary(E("40001")) and is_temporary(E("57P01"))
    # About the database, not the rows: a table renamed, a privilege revoked, a lock not granted in time.
    assert is_temporary(E("42P01")) and is_temporary(E("42501")) and is_temporary(E("55P03"))
    assert not is_temporary(E("22003")) and not is_temporary(E("23505")) and not is_temporary(E("54000"))
    assert is_temporary(psycopg.OperationalError("connection lost"))
    assert not is_temporary(psycopg.DataError("cannot adapt"))


def test_a_table_gone_for_a_while_pauses_the_sink_and_nothing_is_dead_lettered(namespace):
    """The table renamed away under the sink (42P01, as a migration or an operator might): the batch waits,
    retried, and lands whole once the table is back; no row is refused (and "no such table" is not taken for
    "not partitioned", which would refuse the rows of a month without its partition)."""
    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    create_schema(dsn, schema, ("agg_1m",), timescale=False)
    # A month without a partition yet (plain PostgreSQL): the writer must make it once the table is back.
    records = [Record(0, i, aggregate_row(agg("s/d/p", T0 + i * 60_000, float(i)))) for i in range(50)]

    async def go() -> None:
        w = PostgresWriter(dsn, schema, consumer="t/pg", max_backoff=0.5)
        retries: list[str] = []
        w.on_retry = lambda e: retries.append(getattr(e, "sqlstate", "") or "")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'ALTER TABLE "{schema}".agg_1m RENAME TO agg_1m_away')
            task = asyncio.create_task(w.write("agg_1m", "t.agg", records))
            for _ in range(100):
                if len(retries) >= 3:
                    break
                await asyncio.sleep(0.1)
            assert not task.done() and set(retries) == {"42P01"}
            conn.execute(f'ALTER TABLE "{schema}".agg_1m_away RENAME TO agg_1m')
        result = await asyncio.wait_for(task, 30)
        assert result.written == 50 and result.rejected == []
        assert len(rows(dsn, schema)) == 50
        await w.close()

    asyncio.run(go())


def test_timescaledb_policies_follow_the_topology(namespace):
    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    ok, why = timescale_status(dsn)
    if not ok:
        pytest.skip(f"TimescaleDB is not available on this machine: {why}")

    def jobs() -> dict[str, set[str]]:
        with psycopg.connect(dsn) as conn:
            got = conn.execute(
                "SELECT hypertable_name, proc_name FROM timescaledb_information.jobs "
                "WHERE hypertable_schema = %s",
                (schema,),
            ).fetchall()
        out: dict[str, set[str]] = {}
        for table, proc in got:
            out.setdefault(table, set()).add(proc)
        return out

    create_schema(dsn, schema, ("agg_1m", "readings"), retention_days=30)
    refresh = {"agg_1h_rollup": {"policy_refresh_continuous_aggregate"}}
    assert jobs() == {
        **{t: {"policy_compression", "policy_retention"} for t in ("agg_1m", "readings")},
        **refresh,
    }
    create_schema(dsn, schema, ("agg_1m", "readings"), retention_days=None)  # retention removed again
    assert jobs() == {**{t: {"policy_compression"} for t in ("agg_1m", "readings")}, **refresh}


def test_timescaledb_agg_1h_is_materialized_and_a_late_minute_reaches_its_hour(namespace):
    """agg_1h over a continuous aggregate: rows after the refresh; a minute rewritten later (a late window,
    a correction) is in its materialized hour as soon as the sink has written it."""
    from connectors.common.sink import Entry
    from connectors.influx.rollup import combine
    from connectors.timescale.sink import PostgresSinkWriter

    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    ok, why = timescale_status(dsn)
    if not ok:
        pytest.skip(f"TimescaleDB is not available on this machine: {why}")
    w = PostgresSinkWriter("pg", dsn, schema, None, "t")
    assert w.deploy(["agg_1m"], lambda m: None)["agg_1m"] == "hypertable"
    minutes = {
        ws: agg("s/d/p", ws, 10.0 + (ws - T0) / 60_000 % 7, count=3 + (ws - T0) // 60_000 % 4)
        for ws in range(T0, T0 + 3 * 3_600_000, 60_000)
    }
    entries = [Entry(0, i, a) for i, a in enumerate(minutes.values())]
    asyncio.run(w.write("agg_1m", "topic", entries))

    def hours() -> dict:
        with psycopg.connect(dsn) as conn:
            got = conn.execute(
                "SELECT bucket, count, good_count, min, max, mean, sum, first, last, stddev "
                f'FROM "{schema}".agg_1h'
            ).fetchall()
        return {int(r[0].timestamp() * 1000): r[1:] for r in got}

    def expected() -> dict:
        out = {}
        for h in range(T0, T0 + 3 * 3_600_000, 3_600_000):
            c = combine([m for ws, m in minutes.items() if h <= ws < h + 3_600_000])
            out[h] = tuple(
                c[f] for f in ("count", "good_count", "min", "max", "mean", "sum", "first", "last")
            )
            out[h] += (c["stddev"],)
        return out

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CALL refresh_continuous_aggregate('{schema}.agg_1h_rollup', NULL, NULL)")
        mat = conn.execute(
            "SELECT materialization_hypertable_schema, materialization_hypertable_name "
            "FROM timescaledb_information.continuous_aggregates WHERE view_schema = %s",
            (schema,),
        ).fetchone()
        assert mat is not None
        assert conn.execute(f'SELECT count(*) FROM "{mat[0]}"."{mat[1]}"').fetchone()[0] == 3
    for h, row in expected().items():
        assert hours()[h] == pytest.approx(row, rel=1e-12)
    late = T0 + 3_600_000 + 17 * 60_000
    minutes[late] = agg("s/d/p", late, 99.0, count=9)
    asyncio.run(w.write("agg_1m", "topic", [Entry(0, len(entries), minutes[late])]))
    assert hours()[T0 + 3_600_000] == pytest.approx(expected()[T0 + 3_600_000], rel=1e-12)
    assert hours()[T0 + 3_600_000][3] == 100.0  # the new minute's max
    asyncio.run(w.close())


def test_agg_1h_equals_pandas_hourly_on_every_backend(namespace, backend):
    """Minutes from the aggregator, written like the sink does; the hourly view against pandas '1h'."""
    import random

    import pandas as pd

    from pipeline.stages.windows import MinuteAggregator

    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    create_schema(dsn, schema, ("agg_1m",), timescale=backend)
    rng = random.Random(5)
    raw = []
    for series in ("s/d/a", "s/d/b"):
        for i in range(2 * 3600 // 7):  # two hours, a reading every 7 s, some bad
            q = "bad" if rng.random() < 0.05 else "good"
            raw.append((series, T0 + i * 7000 + rng.randint(0, 999), rng.gauss(50, 10), q))
    agg = MinuteAggregator(grace_ms=0)
    closes = []
    for off, (series, ts, v, q) in enumerate(sorted(raw, key=lambda r: r[1])):
        _, device, point = series.split("/")
        agg.apply(
            0,
            off,
            {
                "v": 1,
                "source": "t",
                "site": "s",
                "device": device,
                "readings": [{"point": point, "ts": ts, "value": v, "quality": q}],
            },
        )
        due = agg.due(0)
        closes += due
        agg.finish(0, off, due)
    closes += agg.due(0, flush_all=True)

    async def write() -> None:
        w = PostgresWriter(dsn, schema, consumer="t")
        await w.write(
            "agg_1m", "topic", [Record(0, i, aggregate_row(c.aggregate)) for i, c in enumerate(closes)]
        )
        await w.close()

    asyncio.run(write())
    with psycopg.connect(dsn) as conn:
        got = {
            (r[0], int(r[1].timestamp() * 1000)): r[2:]
            for r in conn.execute(
                f"SELECT series, bucket, count, good_count, min, max, mean, sum, first, last, stddev "
                f'FROM "{schema}".agg_1h'
            ).fetchall()
        }
    df = pd.DataFrame(raw, columns=["series", "ts", "value", "quality"])
    assert len(got) == 4
    for series, g in df.groupby("series"):
        g = g.sort_values("ts")
        idx = pd.to_datetime(g["ts"], unit="ms")
        counts = pd.Series(1, index=idx).resample("1h").sum()
        good = g[g["quality"] == "good"]
        r = pd.Series(good["value"].to_numpy(), index=pd.to_datetime(good["ts"], unit="ms")).resample("1h")
        for hour, n in counts.items():
            row = got[(series, int(hour.value // 1_000_000))]
            want = (
                n,
                r.count()[hour],
                r.min()[hour],
                r.max()[hour],
                r.mean()[hour],
                r.sum()[hour],
                r.first()[hour],
                r.last()[hour],
                r.std(ddof=1)[hour],
            )
            assert row[:2] == want[:2]
            assert row[2:] == pytest.approx(want[2:], rel=1e-9)


def test_alarm_health_counts_as_eemua_191_does(namespace):
    """Alarms per hour and per 10 minutes, the peak, floods, chattering and standing alarms, per site."""
    from connectors.common.sink import Entry
    from connectors.timescale.sink import PostgresSinkWriter

    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    w = PostgresSinkWriter("pg", dsn, schema, None, "t")
    w.deploy(["alarm_events"], lambda m: None)
    h = T0 + 24 * 3_600_000  # an hour, one day after T0
    seq: dict[str, int] = {}

    def ev(inst: str, ts: int, transition: str) -> dict:
        seq[inst] = seq.get(inst, 0) + 1
        return {
            "id": f"{inst}#{seq[inst]}",
            "instance": inst,
            "rule": "r",
            "source": inst.split("/", 1)[1],
            "seq": seq[inst],
            "ts": ts,
            "transition": transition,
            "state": "unack",
            "active": transition == "raise",
            "severity": "high",
            "value": 1.0,
            "limit": 0.5,
            "unit": None,
            "message": "m",
            "labels": {},
            "shelved_until": None,
            "suppressed": False,
            "out_of_service": False,
            "chattering": False,
            "notify": True,
        }

    events = [ev("r/a/d/standing", T0, "raise")]  # raised a day before the hour, never cleared
    events += [ev(f"r/a/d/p{i}", h + 60_000 + i * 1000, "raise") for i in range(12)]  # a flood in 10 min
    events += [ev(f"r/a/d/q{i}", h + 30 * 60_000, "raise") for i in range(3)]
    events += [ev("r/a/d/p0", h + 31 * 60_000, "chatter"), ev("r/b/d/x", h + 5 * 60_000, "raise")]
    asyncio.run(w.write("alarm_events", "t", [Entry(0, i, e) for i, e in enumerate(events)]))
    asyncio.run(w.close())
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT site, alarms, per_10min, peak_10min, floods, chattering, standing "
            f'FROM "{schema}".alarm_health WHERE hour = %s ORDER BY site',
            (ms_to_dt(h),),
        ).fetchall()
    assert [(r[0], r[1], float(r[2]), r[3], r[4], r[5], r[6]) for r in rows] == [
        ("a", 15, 2.5, 12, 1, 1, 1),
        ("b", 1, 1 / 6, 1, 0, 0, 0),
    ]


def test_the_sink_connection_has_a_connect_timeout_and_keepalives_unless_the_dsn_says_otherwise(namespace):
    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    create_schema(dsn, schema, ("agg_1m",), timescale=False)

    async def params(url: str) -> dict[str, str]:
        w = PostgresWriter(url, schema, consumer="t/pg")
        conn = await w._connection()
        out = conn.info.get_parameters()
        await w.close()
        return out

    got = asyncio.run(params(dsn))
    assert (
        got["connect_timeout"] == "10"
        and got["keepalives_idle"] == "10"
        and got["tcp_user_timeout"] == "30000"
    )
    sep = "&" if "?" in dsn else "?"
    assert asyncio.run(params(f"{dsn}{sep}keepalives_idle=60"))["keepalives_idle"] == "60"


def test_a_new_partition_does_not_queue_readers_behind_a_long_dashboard_query(namespace):
    """Plain PostgreSQL: a month's first rows need a partition, whose DDL locks the table. While a long
    query holds the table, the sink waits 2 s at most per try (55P03, retried), so other readers are not
    queued behind its lock for the length of that query; the rows land once the query is done."""
    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    create_schema(dsn, schema, ("agg_1m",), timescale=False)
    records = [Record(0, i, aggregate_row(agg("s/d/p", T0 + i * 60_000, float(i)))) for i in range(5)]

    async def go() -> None:
        w = PostgresWriter(dsn, schema, consumer="t/pg", max_backoff=0.5)
        retries: list[str] = []
        w.on_retry = lambda e: retries.append(getattr(e, "sqlstate", "") or "")
        with psycopg.connect(dsn) as dashboard:
            dashboard.execute(f'SELECT count(*) FROM "{schema}".agg_1m').fetchone()  # holds it until commit
            task = asyncio.create_task(w.write("agg_1m", "t.agg", records))
            for _ in range(200):
                if "55P03" in retries:
                    break
                await asyncio.sleep(0.1)
            assert "55P03" in retries
            with psycopg.connect(dsn, options="-c statement_timeout=5000") as reader:
                reader.execute(f'SELECT count(*) FROM "{schema}".agg_1m').fetchone()  # not stuck behind it
            dashboard.commit()
        result = await asyncio.wait_for(task, 30)
        assert result.written == 5 and result.rejected == []
        await w.close()

    asyncio.run(go())


def test_copy_text_round_trips_what_psycopg_would_send(namespace):
    # The sink formats COPY text itself; names with tabs, newlines, backslashes and non-ASCII, extreme
    # doubles and nulls come back exactly as psycopg's own formatting would have stored them.
    from connectors.timescale.writer import copy_text

    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    create_schema(dsn, schema, timescale=False)
    names = ["a\tb", "new\nline", "back\\slash", "\\N", "ünïcødé °C", "cr\rhere", "nbsp\xa0x"]
    recs = []
    for i, name in enumerate(names):
        a = agg(f"s/d/{name}", T0 + i * 60_000, [5e-324, 1.2345678901234567e300, -0.0, 0.1][i % 4])
        a["unit"] = name
        a["stddev"] = None
        recs.append(Record(0, i, aggregate_row(a)))
    assert copy_text(recs[:6]) is not None and copy_text(recs) is None  # a no-break space: psycopg's way

    async def go() -> None:
        w = PostgresWriter(dsn, schema, consumer="t")
        assert (await w.write("agg_1m", "topic", recs[:6])).written == 6
        assert (await w.write("agg_1m", "topic", recs[6:])).written == 1
        await w.close()

    asyncio.run(go())
    with psycopg.connect(dsn) as conn:
        got = conn.execute(
            f'SELECT series, bucket, unit, mean, stddev, count FROM "{schema}".agg_1m ORDER BY bucket'
        ).fetchall()
    assert [(s, b, u, m, sd, c) for s, b, u, m, sd, c in got] == [
        (r.row[1], r.row[0], r.row[14], r.row[9], None, 3) for r in recs
    ]

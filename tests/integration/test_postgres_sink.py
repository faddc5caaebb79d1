"""The PostgreSQL writer against the real server: idempotent replays, offsets, refused rows, partitions."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from connectors.timescale.rows import aggregate_row, ms_to_dt
from connectors.timescale.schema import create_schema
from connectors.timescale.writer import PostgresWriter, Record, is_temporary

pytestmark = pytest.mark.integration
T0 = 1_767_225_600_000


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


def test_schema_is_idempotent_and_partitioned(namespace):
    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    first = create_schema(dsn, schema)
    second = create_schema(dsn, schema)
    assert first == second == {"agg_1m": "partitioned", "readings": "partitioned"}


def test_replay_is_skipped_and_later_offsets_win(namespace):
    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    create_schema(dsn, schema)

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


def test_refused_rows_are_returned_and_the_rest_written(namespace):
    dsn, schema = namespace["PLANTSTREAM_PG_DSN"], namespace["schema"]
    create_schema(dsn, schema)

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
    assert not is_temporary(E("22003")) and not is_temporary(E("23505"))
    assert is_temporary(psycopg.OperationalError("connection lost"))

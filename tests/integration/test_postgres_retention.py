"""Plain-PostgreSQL retention: a sink with ``retention`` drops the monthly partitions older than it, at
deploy and while it writes; a sink without keeps everything."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from connectors.common.sink import Entry
from pipeline.deploy import deploy
from pipeline.topology import validate_data
from tests.integration.test_postgres_sink import agg

pytestmark = pytest.mark.integration
DAY = 86_400_000


def partitions(dsn: str, schema: str, table: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace "
            "WHERE n.nspname = %s AND p.relname = %s ORDER BY 1",
            (schema, table),
        ).fetchall()
    return [r[0] for r in rows]


def series_left(dsn: str, schema: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {r[0] for r in conn.execute(f'SELECT series FROM "{schema}".agg_1m').fetchall()}


@pytest.mark.parametrize("retention", ["90d", None])
def test_retention_drops_old_partitions_on_plain_postgres(namespace, retention):
    ns = namespace
    dsn, schema = ns["PLANTSTREAM_PG_DSN"], ns["schema"]
    sink = {
        "id": "pg",
        "type": "postgres",
        "dsn": dsn,
        "schema": schema,
        "topics": ["agg_1m"],
        "timescaledb": "off",
    }
    if retention:
        sink["retention"] = retention
    topo = validate_data(
        {
            "name": f"ret-{ns['tag']}",
            "prefix": ns["prefix"],
            "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"]},
            "sinks": [sink],
        }
    )
    deploy(topo, say=lambda m: None)
    fresh = partitions(dsn, schema, "agg_1m")
    assert fresh, "deploy makes this month's and next month's partitions"

    now = int(time.time() * 1000)
    now -= now % 60_000
    ages = {"s/d/year": 400 * DAY, "s/d/half": 180 * DAY, "s/d/now": 0}
    entries = [Entry(0, i, agg(series, now - age, 1.0)) for i, (series, age) in enumerate(ages.items())]
    writer = topo.sinks[0].open_writer(f"{topo.app_id}/pg")

    async def write() -> None:
        try:
            result = await writer.write("agg_1m", topo.agg_topic, entries)
            assert result.written == 3 and not result.refused
        finally:
            await writer.close()

    asyncio.run(write())
    kept = series_left(dsn, schema)
    if retention:
        # The year- and half-year-old months went with their partitions; this month stays.
        assert kept == {"s/d/now"}
        assert set(fresh) <= set(partitions(dsn, schema, "agg_1m"))
        assert len(partitions(dsn, schema, "agg_1m")) == len(fresh)
    else:
        assert kept == set(ages)
        assert len(partitions(dsn, schema, "agg_1m")) == len(fresh) + 2

    # Deploy again: idempotent, and with retention it drops whatever became too old meanwhile.
    deploy(topo, say=lambda m: None)
    assert series_left(dsn, schema) == kept

"""The database away or refusing under a running worker: the sink pauses and catches up, nothing in the DLQ.

A private PostgreSQL (the shared one is not touched) holds the sink's tables, deployed by their owner and
written by the sink's own role, ``<schema>_writer`` (so a revoked privilege applies to it). While readings
keep arriving, in turn: the server is stopped (12 s here, 60 s and 6 minutes in ``make faults``), the
sink's connections are terminated in a loop, and INSERT on its tables is revoked for a while. Then
``readings`` equals every reading sent, ``agg_1m`` equals pandas over them, no row is there twice, and the
DLQ is empty.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from connectors.common.producer import TelemetryProducer
from connectors.timescale.tenancy import writer_role
from pipeline.topology import validate_data
from tests.conftest import wait_for
from tests.e2e.test_mqtt_to_postgres import agg_rows, read_dlq, stop
from tests.faults.conftest import FULL, length
from tests.faults.services import Private, child_env, deploy, private, readings_rows, spawn
from tests.integration.test_event_time import Reading, minute_now, send, series_of
from tests.reference import compare, expected_aggregates

pytestmark = pytest.mark.integration
PASSWORD = "sink-writer-pw"


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[Private]:
    with private(tmp_path / "services", "postgres") as svc:
        yield svc


def test_the_sink_pauses_through_database_faults_and_loses_nothing(
    pg: Private, namespace: dict[str, str], tmp_path: Path
) -> None:
    ns = namespace
    admin = pg.connection()["PLANTSTREAM_PG_DSN"]  # the owner: deploy and the read-back
    schema = ns["schema"]
    role = writer_role(schema)  # what deploy makes for the sink to write as
    dsn = psycopg.conninfo.make_conninfo(admin, user=role, password=PASSWORD)
    topo: dict[str, Any] = {
        "name": f"dbout{ns['tag']}",
        "prefix": ns["prefix"],
        "broker": {"bootstrap": ns["PLANTSTREAM_KAFKA"], "partitions": 2},
        "aggregates": {"grace": "5s", "idle_timeout": "2s", "checkpoint_interval": "500ms"},
        "sinks": [
            {"id": "pg", "type": "postgres", "dsn": dsn, "admin_dsn": admin, "schema": schema,
             "timescaledb": "off", "topics": ["agg_1m", "readings"], "batch_delay": "100ms"}
        ],
    }  # fmt: skip
    topo_file = tmp_path / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topo))
    env = child_env(PLANTSTREAM_PG_DSN=dsn)
    deploy(topo_file, env)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {role} PASSWORD '{PASSWORD}'")
    t = validate_data(topo)

    start = minute_now() - 40 * 60_000
    readings: list[Reading] = []
    for d in range(5):
        readings += series_of(f"dev{d}", start, 10 * 60)
    # Two minutes each: a pause between chunks closes complete minutes only (idle close), none is cut.
    chunks = [
        [r for r in readings if start + i * 120_000 <= r[1] < start + (i + 1) * 120_000] for i in range(5)
    ]
    producer = TelemetryProducer(ns["PLANTSTREAM_KAFKA"], t.raw_topic, t.dlq_topic)
    worker = spawn(["worker", str(topo_file), "--app-id", f"dbout-{ns['tag']}", "--loglevel", "info"],
                   tmp_path / "worker.log", env)  # fmt: skip
    alive = lambda: worker.poll() is None  # noqa: E731

    def sent(chunk: list[Reading]) -> None:
        send(producer, chunk)
        assert producer.flush(30) == 0

    try:
        sent(chunks[0])
        wait_for(lambda: len(readings_rows(admin, schema)) >= len(chunks[0]), 90, "the first readings")
        assert len(readings_rows(admin, schema)) == len(chunks[0])

        # 1. The server stopped (and, in make faults, stopped again for six minutes).
        for outage in [length(12, 60)] + ([360.0] if FULL else []):
            pg.down("postgres")
            sent(chunks[1] if outage == length(12, 60) else [])
            ends = time.monotonic() + outage
            while time.monotonic() < ends:
                assert alive(), "the worker exited while the database was away"
                time.sleep(1)
            pg.up("postgres")
        wait_for(
            lambda: len(readings_rows(admin, schema)) >= len(chunks[0]) + len(chunks[1]), 120, "catch-up"
        )

        # 2. The sink's connections terminated again and again while data flows.
        done = threading.Event()
        cut: list[int] = []
        errors: list[BaseException] = []

        def terminate() -> None:
            # As the writer role itself: a role may end its own sessions, and the owner is no superuser.
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    while not done.wait(0.7):
                        row = conn.execute(
                            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE usename = %s AND pid <> pg_backend_pid()",
                            (role,),
                        ).fetchone()
                        cut.append(row[0] if row else 0)
            except BaseException as e:
                errors.append(e)

        killer = threading.Thread(target=terminate, daemon=True)
        killer.start()
        sent(chunks[2])
        time.sleep(length(6, 60))  # the fault's length: connections keep being cut throughout
        done.set()
        killer.join(10)
        assert not errors, errors
        assert sum(cut) > 0, "no connection of the sink was cut"

        # 3. INSERT revoked for a while on every table of the schema.
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"REVOKE INSERT ON ALL TABLES IN SCHEMA {schema} FROM {role}")
        sent(chunks[3])
        time.sleep(length(5, 30))  # the fault's length
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"GRANT INSERT ON ALL TABLES IN SCHEMA {schema} TO {role}")
        sent(chunks[4])

        want = sorted((s, ts, v) for s, ts, v, _q in readings)
        wait_for(lambda: len(readings_rows(admin, schema)) >= len(want), 180, f"{len(want)} readings")
        assert sorted(readings_rows(admin, schema)) == want  # the primary key forbids a second copy
        expected = expected_aggregates(readings)
        wait_for(lambda: len(agg_rows(admin, schema)) >= len(expected), 120, f"{len(expected)} windows")
        assert compare(agg_rows(admin, schema), expected) == []
        assert alive()
        assert read_dlq(ns["PLANTSTREAM_KAFKA"], t.dlq_topic, 0, 3) == []
        log = (tmp_path / "worker.log").read_text()
        assert "temporary database error" in log  # the faults were seen, and waited out
    finally:
        stop([worker], 20)

"""Shared fixtures: the real local services, and a fresh namespace (topics, schema, group) per test."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# The tests use the services living in the checkout's .local/ (as `make test`, which exports the same
# variable), not the per-user state directory an installed plantstream defaults to. Subprocesses inherit it.
os.environ.setdefault("PLANTSTREAM_LOCAL_DIR", str(REPO / ".local"))


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def services_env() -> dict[str, str]:
    """Start (or reuse) the local Kafka, PostgreSQL and Mosquitto; returns their connection variables."""
    from localservices import harness as services

    services.up(("kafka", "postgres", "mosquitto"), progress=lambda m: None)
    env = services.connection_env()
    os.environ.update(env)
    return env


@pytest.fixture(scope="session")
def influx_urls(services_env: dict[str, str]) -> dict[str, str | None]:
    """The InfluxDB servers: ``v1`` (Debian's 1.6, 1.x API) and ``v2`` (1.8 built from source, the 2.x API;
    None where it cannot be built here)."""
    from localservices import harness as services

    got = services.up(("influxdb", "influxdb18"), progress=lambda m: None)
    return {"v1": got["influxdb"], "v2": got.get("influxdb18")}


@pytest.fixture
def namespace(services_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """Unique names so tests never see each other's topics, rows or consumer groups."""
    tag = uuid.uuid4().hex[:8]
    ns = {"tag": tag, "prefix": f"t{tag}.", "schema": f"t_{tag}", "mqtt_root": f"t{tag}", **services_env}
    yield ns
    drop_schema(services_env["PLANTSTREAM_PG_DSN"], ns["schema"])


def drop_schema(dsn: str, schema: str) -> None:
    """A test schema dropped with its roles and tenancy objects."""
    import psycopg

    from connectors.timescale import tenancy

    # TimescaleDB's background workers (a continuous aggregate's refresh policy) may update the catalog rows a
    # DROP ... CASCADE touches: "tuple concurrently updated". The drop is tried again until it goes through.
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                tenancy.drop(conn, schema)
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            break
        except (psycopg.InternalError, psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)

"""Configuration of the PostgreSQL/TimescaleDB sink (``type: postgres`` in a topology's ``sinks``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from pipeline.core.durations import DurationMs
from pipeline.core.topology import SinkBase

SINK_TOPICS = ("agg_1m", "readings", "kpi_results")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


class PostgresSink(SinkBase):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["postgres"]
    dsn: str = Field(
        "postgresql://plantstream:plantstream@127.0.0.1:55432/plantstream",
        repr=False,
        description="what the sink writes as at runtime: best the role <schema>_writer that deploy makes "
        "(libpq settings such as sslmode, sslrootcert, sslcert, sslkey go in the DSN)",
    )
    admin_dsn: str | None = Field(
        None,
        repr=False,
        description="what deploy creates the tables, functions and roles as (the schema's owner); "
        "default: dsn",
    )
    schema_name: str = Field("public", alias="schema", pattern=r"^[a-z_][a-z0-9_]*$")
    topics: list[Literal["agg_1m", "readings", "kpi_results", "alarm_events", "alarms"]] = Field(
        default_factory=lambda: ["agg_1m"],  # type: ignore[arg-type]
        min_length=1,
    )
    batch_size: int = Field(2000, ge=1, le=100_000)
    batch_delay: DurationMs = Field(500)
    retention: DurationMs | None = Field(None, description="drop data older than this (default: keep)")
    timescaledb: Literal["auto", "off"] = Field(
        "auto",
        description="auto: hypertables, compression and retention policies where the TimescaleDB extension "
        "can be enabled; off: plain PostgreSQL with monthly partitions",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("dsn", "admin_dsn")
    @classmethod
    def _dsn(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("postgresql://", "postgres://")) and "=" not in v:
            raise ValueError("expected postgresql://user:password@host:port/database or key=value pairs")
        from psycopg.conninfo import conninfo_to_dict  # libpq's own parser; no connection is made

        try:
            params = conninfo_to_dict(v)
        except Exception as e:  # the message of libpq may quote the DSN: say what is wrong without it
            raise ValueError(
                "not a connection string libpq can read (check quoting and ?key=value parameters)"
            ) from e
        mode = params.get("sslmode")
        if mode is not None and mode not in SSLMODES:
            raise ValueError(f"sslmode={mode!r} is not one of {', '.join(SSLMODES)}")
        return v

    @property
    def owner_dsn(self) -> str:
        """What deploy (and the tenant and token commands) connect as: ``admin_dsn``, else ``dsn``."""
        return self.admin_dsn or self.dsn

    def open_writer(self, consumer: str) -> Any:
        from connectors.timescale.sink import PostgresSinkWriter  # psycopg: only where a sink runs

        return PostgresSinkWriter(
            self.id,
            self.dsn,
            self.schema_name,
            self.retention,
            consumer,
            self.timescaledb == "auto",
            admin_dsn=self.owner_dsn,
        )

"""Configuration of the PostgreSQL/TimescaleDB sink (``type: postgres`` in a topology's ``sinks``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from pipeline.core.durations import DurationMs
from pipeline.core.topology import SinkBase

SINK_TOPICS = ("agg_1m", "readings", "kpi_results")


class PostgresSink(SinkBase):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["postgres"]
    dsn: str = Field("postgresql://plantstream:plantstream@127.0.0.1:55432/plantstream", repr=False)
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

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: str) -> str:
        if not v.startswith(("postgresql://", "postgres://")) and "=" not in v:
            raise ValueError("expected postgresql://user:password@host:port/database or key=value pairs")
        return v

    def open_writer(self, consumer: str) -> Any:
        from connectors.timescale.sink import PostgresSinkWriter  # psycopg: only where a sink runs

        return PostgresSinkWriter(
            self.id, self.dsn, self.schema_name, self.retention, consumer, self.timescaledb == "auto"
        )

"""Configuration of the InfluxDB sink (``type: influx`` in a topology's ``sinks``), validated on load."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline.core.durations import DurationMs
from pipeline.core.topology import SinkBase


class InfluxSink(SinkBase):
    type: Literal["influx"]
    url: str = Field("http://127.0.0.1:8086", description="http(s)://host:port of the InfluxDB 1.x HTTP API")
    database: str = Field("plantstream", pattern=r"^[A-Za-z0-9_.-]+$")
    username: str | None = None
    password: str | None = Field(None, repr=False)
    topics: list[Literal["agg_1m", "readings"]] = Field(
        default_factory=lambda: ["agg_1m"],  # type: ignore[arg-type]
        min_length=1,
    )
    batch_size: int = Field(5000, ge=1, le=100_000)
    retention: DurationMs | None = Field(
        None, description="duration of the database's default retention policy (default: keep)"
    )
    timeout: DurationMs = Field(10_000, description="per HTTP request")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/:]+(:\d+)?/?$", v):
            raise ValueError("expected http://host:port (the InfluxDB 1.x HTTP API)")
        return v.rstrip("/")

    @field_validator("retention")
    @classmethod
    def _retention(cls, v: int | None) -> int | None:
        if v is not None and v < 3_600_000:
            raise ValueError("retention must be at least 1h (InfluxDB's minimum)")
        return v

    def open_writer(self, consumer: str) -> Any:
        from connectors.influx.sink import InfluxSinkWriter

        return InfluxSinkWriter(self)

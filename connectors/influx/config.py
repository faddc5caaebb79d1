"""Configuration of the InfluxDB sink (``type: influx`` in a topology's ``sinks``), validated on load.

``api: v1`` speaks the 1.x HTTP API (``/write``, ``/query``: database, retention policy, user/password);
``api: v2`` the 2.x API through ``influxdb-client`` (org, bucket, token; Flux for reading back), which
InfluxDB 2.x/3.x and InfluxDB 1.8+ (``flux-enabled``; bucket ``database/retention_policy``) serve.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.durations import DurationMs
from pipeline.core.topology import SinkBase

V1_ONLY = ("database", "retention_policy", "username", "password")
V2_ONLY = ("org", "bucket", "token")


class InfluxSink(SinkBase):
    type: Literal["influx"]
    api: Literal["v1", "v2"] = Field("v1", description="v1: /write + InfluxQL; v2: influxdb-client + Flux")
    url: str = Field("http://127.0.0.1:8086", description="http(s)://host:port of the InfluxDB HTTP API")
    # -- v1
    database: str = Field("plantstream", pattern=r"^[A-Za-z0-9_.-]+$", description="v1")
    retention_policy: str = Field("autogen", pattern=r"^[A-Za-z0-9_.-]+$", description="v1")
    username: str | None = Field(None, description="v1")
    password: str | None = Field(None, repr=False, description="v1")
    # -- v2
    org: str | None = Field(None, description="v2 (InfluxDB 1.8: any, '-' by convention)")
    bucket: str | None = Field(None, description="v2 (InfluxDB 1.8: database/retention_policy)")
    token: str | None = Field(None, repr=False, description="v2 (InfluxDB 1.8: user:password)")
    # -- both
    topics: list[Literal["agg_1m", "readings", "kpi_results", "alarm_events"]] = Field(
        default_factory=lambda: ["agg_1m"],  # type: ignore[arg-type]
        min_length=1,
        description="agg_1m also writes its hourly rollup, measurement agg_1h",
    )
    precision: Literal["ms", "us", "ns"] = Field(
        "ms", description="timestamp precision of the writes (never coarser than the records' milliseconds)"
    )
    batch_size: int = Field(5000, ge=1, le=100_000, description="points per write request, at most")
    retention: DurationMs | None = Field(
        None, description="retention of what the sink writes (v1: its retention policy; v2: the bucket's)"
    )
    timeout: DurationMs = Field(10_000, description="per HTTP request")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/:]+(:\d+)?/?$", v):
            raise ValueError("expected http://host:port (the InfluxDB HTTP API)")
        return v.rstrip("/")

    @field_validator("retention")
    @classmethod
    def _retention(cls, v: int | None) -> int | None:
        if v is not None and v < 3_600_000:
            raise ValueError("retention must be at least 1h (InfluxDB's minimum)")
        return v

    @model_validator(mode="after")
    def _api_fields(self) -> InfluxSink:
        other = V2_ONLY if self.api == "v1" else V1_ONLY
        given = [f for f in other if f in self.model_fields_set]
        if given:
            raise ValueError(
                f"{', '.join(given)} belong(s) to api {'v2' if self.api == 'v1' else 'v1'}; "
                f"with api: {self.api} use {', '.join(V1_ONLY if self.api == 'v1' else V2_ONLY)}"
            )
        if self.api == "v2":
            missing = [f for f in V2_ONLY if getattr(self, f) is None]
            if missing:
                raise ValueError(f"api: v2 needs {', '.join(missing)} (org, bucket and token of the 2.x API)")
        if self.username is None and self.password is not None:
            raise ValueError("password without username")
        return self

    def open_writer(self, consumer: str) -> Any:
        from connectors.influx.sink import InfluxSinkWriter

        return InfluxSinkWriter(self)

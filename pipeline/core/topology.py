"""The base of a topology: errors, the model base, the broker and aggregation settings, topic names.

The full topology (sources, sinks, loops, simulations) is assembled in :mod:`pipeline.topology` from the
configuration models that live beside each connector and stage; the stages and connectors below it depend
only on what is here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.core.durations import DurationMs


class TopologyError(Exception):
    """A topology that cannot be used; ``problems`` holds one line per mistake, each naming its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Broker(Model):
    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    partitions: int = Field(4, ge=1, le=1024, description="partitions of telemetry.raw (and its state)")
    replication: int = Field(1, ge=1, le=16)
    # Size, not time: record timestamps are event times, and time retention would delete a backfill at once.
    raw_retention_bytes: int = Field(
        8 << 30, ge=-1, description="bytes kept per partition of telemetry.raw and loops.samples (-1: all)"
    )
    agg_retention_bytes: int = Field(
        1 << 30, ge=-1, description="bytes kept per partition of telemetry.agg.1m and loops.kpi (-1: all)"
    )


class Aggregates(Model):
    window: Literal["1m"] = "1m"
    grace: DurationMs = Field(
        10_000, description="how far behind its device's newest event time a reading may arrive"
    )
    idle_timeout: DurationMs = Field(
        30_000,
        description="wall-clock quiet time after which a device's open windows close (once its "
        "partition is drained)",
    )
    latest: bool = Field(True, description="keep the compacted telemetry.latest topic")
    checkpoint_interval: DurationMs = Field(
        "2s",
        validate_default=True,
        description="how often the worker makes its aggregation state durable and acknowledges its input; "
        "after a crash at most this much input is read again. telemetry.latest is published at this pace "
        "(every 15 s while a partition catches up on a backlog)",
    )

    max_future: DurationMs = Field(
        "5m",
        validate_default=True,
        description="readings stamped further ahead of the wall clock go to the DLQ as 'future' and move no "
        "device's clock",
    )

    @field_validator("max_future")
    @classmethod
    def _future(cls, v: int) -> int:
        if not 1_000 <= v <= 7 * 86_400_000:
            raise ValueError("max_future must be between 1s and 7d")
        return v

    @field_validator("checkpoint_interval")
    @classmethod
    def _checkpoint(cls, v: int) -> int:
        if not 100 <= v <= 60_000:
            raise ValueError("checkpoint_interval must be between 100ms and 60s")
        return v

    @field_validator("grace")
    @classmethod
    def _grace(cls, v: int) -> int:
        if not 0 <= v <= 3_600_000:
            raise ValueError("grace must be between 0s and 1h")
        return v

    @field_validator("idle_timeout")
    @classmethod
    def _idle(cls, v: int) -> int:
        if not 1_000 <= v <= 86_400_000:
            raise ValueError("idle_timeout must be between 1s and 24h")
        return v


class SinkBase(Model):
    """What every sink has, whatever its database: the fields the sink stage reads."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: str
    topics: Sequence[str] = Field(default_factory=lambda: ["agg_1m"], min_length=1)
    batch_size: int = Field(2000, ge=1, le=100_000)
    batch_delay: DurationMs = Field(500)

    def open_writer(self, consumer: str) -> Any:
        """The sink's writer (a :class:`connectors.common.sink.SinkWriter`); imports its client lazily."""
        raise NotImplementedError


class TopologyBase(Model):
    """Name, prefix, broker and aggregation settings, and the topic names they make."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: Literal[1] = 1
    prefix: str = Field("", pattern=r"^([A-Za-z0-9_-]+\.)?$", description="topic prefix such as 'acme.'")
    broker: Broker = Broker()
    aggregates: Aggregates = Aggregates()

    @property
    def app_id(self) -> str:
        """Names the worker's consumer groups and state topics: ``<prefix>plantstream-<name>``."""
        return f"{self.prefix}plantstream-{self.name}"

    def topic(self, base: str) -> str:
        return f"{self.prefix}{base}"

    @property
    def raw_topic(self) -> str:
        return self.topic("telemetry.raw")

    @property
    def dlq_topic(self) -> str:
        return self.topic("telemetry.dlq")

    @property
    def agg_topic(self) -> str:
        return self.topic("telemetry.agg.1m")

    @property
    def latest_topic(self) -> str:
        return self.topic("telemetry.latest")

    @property
    def commands_topic(self) -> str:
        return self.topic("commands.bacnet")

    @property
    def results_topic(self) -> str:
        return self.topic("commands.results")

    @property
    def loop_samples_topic(self) -> str:
        return self.topic("loops.samples")

    @property
    def loop_kpi_topic(self) -> str:
        return self.topic("loops.kpi")

    @property
    def alert_samples_topic(self) -> str:
        return self.topic("alerts.samples")

    @property
    def alerts_events_topic(self) -> str:
        return self.topic("alerts.events")

    @property
    def alerts_state_topic(self) -> str:
        return self.topic("alerts.state")

    @property
    def alerts_commands_topic(self) -> str:
        return self.topic("alerts.commands")

"""The base of a topology: errors, the model base, the broker and aggregation settings, topic names.

The full topology (sources, sinks, loops, simulations) is assembled in :mod:`pipeline.topology` from the
configuration models that live beside each connector and stage; the stages and connectors below it depend
only on what is here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pipeline.core.durations import DurationMs


class TopologyError(Exception):
    """A topology that cannot be used; ``problems`` holds one line per mistake, each naming its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: Secret fields of ``broker.security``: only ``${VAR}`` references in a file, never echoed in messages.
SECRET_FIELDS = ("password", "commands_password", "admin_password", "key_password")
_SECRET_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")

KafkaRole = Literal["pipeline", "commands", "admin"]


class BrokerSecurity(Model):
    """How every client authenticates to Kafka, and which principal each role uses.

    ``username``/``password`` is the pipeline's principal (worker, connectors, API). ``commands_*`` is the
    principal of ``plantstream write/relinquish``, the only producer of ``commands.bacnet``; ``admin_*`` is
    the one ``plantstream deploy`` creates topics and ACLs with. Both fall back to the pipeline's.
    """

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security.protocol; SASL_SSL for a broker reached over a network"
    )
    sasl_mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism (SASL_PLAINTEXT and SASL_SSL)"
    )
    username: str | None = Field(None, description="the pipeline's principal (worker, connectors, API)")
    password: SecretStr | None = Field(None, description="${ENV_VAR} reference; a literal is refused")
    commands_username: str | None = Field(
        None, description="principal that writes commands.bacnet (plantstream write/relinquish)"
    )
    commands_password: SecretStr | None = Field(None, description="${ENV_VAR} reference")
    admin_username: str | None = Field(None, description="principal of plantstream deploy (topics, ACLs)")
    admin_password: SecretStr | None = Field(None, description="${ENV_VAR} reference")
    ca_file: str | None = Field(None, description="PEM file of the CA that signed the broker's certificate")
    cert_file: str | None = Field(None, description="PEM client certificate (mutual TLS)")
    key_file: str | None = Field(None, description="PEM private key of cert_file")
    key_password: SecretStr | None = Field(
        None, description="${ENV_VAR} reference, when key_file is encrypted"
    )
    ssl_check_hostname: bool = Field(
        True, description="verify the broker's host name against its certificate"
    )

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @model_validator(mode="after")
    def _consistent(self) -> BrokerSecurity:
        problems = []
        if self.sasl and (not self.username or self.password is None):
            problems.append(f"protocol {self.protocol} needs username and password")
        for role in ("commands", "admin"):
            user, pw = getattr(self, f"{role}_username"), getattr(self, f"{role}_password")
            if (user is None) != (pw is None):
                problems.append(f"{role}_username and {role}_password go together")
            if user is not None and not self.sasl:
                problems.append(f"{role}_username is only used with SASL_PLAINTEXT or SASL_SSL")
        if (self.cert_file is None) != (self.key_file is None):
            problems.append("cert_file and key_file go together (mutual TLS)")
        tls_fields = [f for f in ("ca_file", "cert_file", "key_file") if getattr(self, f) is not None]
        if tls_fields and not self.tls:
            problems.append(f"{', '.join(tls_fields)} need protocol SSL or SASL_SSL (found {self.protocol})")
        for f in tls_fields:
            if not Path(getattr(self, f)).is_file():
                problems.append(f"{f}: no such file {getattr(self, f)} (give the path of a PEM file)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def credentials(self, role: KafkaRole) -> tuple[str, str] | None:
        """The SASL user and password of ``role`` (falling back to the pipeline's), or None without SASL."""
        if not self.sasl or self.username is None or self.password is None:
            return None
        user, pw = getattr(self, f"{role}_username", None), getattr(self, f"{role}_password", None)
        if role == "pipeline" or user is None or pw is None:
            return self.username, self.password.get_secret_value()
        return user, pw.get_secret_value()


def literal_secrets(data: Any) -> list[str]:
    """Problems for secrets written literally in a topology file, checked before ``${VAR}`` expansion.

    A password in the file ends up in version control and backups; only a reference to the environment is
    accepted. The value found is never repeated in the message.
    """
    broker = data.get("broker") if isinstance(data, dict) else None
    security = broker.get("security") if isinstance(broker, dict) else None
    if not isinstance(security, dict):
        return []
    out = []
    for name in SECRET_FIELDS:
        value = security.get(name)
        if value is None or (isinstance(value, str) and _SECRET_REF.match(value)):
            continue
        var = "PLANTSTREAM_KAFKA_" + name.upper()
        out.append(
            f"broker.security.{name}: a password written in the file is refused; write ${{{var}}} "
            f"(any environment variable name) and set that variable where plantstream runs"
        )
    return out


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
    security: BrokerSecurity = Field(
        default_factory=lambda: BrokerSecurity(),
        description="TLS, SASL and the principal of each role; PLAINTEXT when left out",
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


def _listen(v: str) -> str:
    from pipeline.core.metrics import parse_listen  # not at the top: the topology loads without the server

    parse_listen(v)  # raises with the value found and what to write instead
    return v.strip()


class WorkerMetricsConfig(Model):
    listen: str = Field(
        "127.0.0.1:9464",
        description="HOST:PORT of the worker's /metrics and /health; port 0 picks a free port (logged); "
        "'off' disables. `plantstream worker --metrics ADDR` overrides it",
    )
    checkpoint_stale_factor: float = Field(
        10,
        ge=1,
        le=1000,
        description="health degrades when a stage's last checkpoint (or poll) is older "
        "than this many checkpoint intervals (and checkpoint_stale_min)",
    )
    checkpoint_stale_min: DurationMs = Field(
        "30s", validate_default=True, description="the smallest such age limit (sinks checkpoint every batch)"
    )
    sink_stuck_after: DurationMs = Field(
        "60s",
        validate_default=True,
        description="health degrades when one sink batch has been writing (retrying) longer than this",
    )

    @field_validator("listen")
    @classmethod
    def _addr(cls, v: str) -> str:
        return _listen(v)


class ConnectMetricsConfig(Model):
    listen: str = Field(
        "127.0.0.1:9465",
        description="HOST:PORT of plantstream connect's /metrics and /health; port 0 picks a free port "
        "(logged); 'off' disables. `plantstream connect --metrics ADDR` overrides it",
    )

    @field_validator("listen")
    @classmethod
    def _addr(cls, v: str) -> str:
        return _listen(v)


class Metrics(Model):
    """Where the processes serve Prometheus metrics and health (docs/operations.md#monitoring)."""

    worker: WorkerMetricsConfig = Field(default_factory=lambda: WorkerMetricsConfig())
    connect: ConnectMetricsConfig = Field(default_factory=lambda: ConnectMetricsConfig())


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
    metrics: Metrics = Field(
        default_factory=lambda: Metrics(), description="addresses of /metrics and /health, health limits"
    )

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

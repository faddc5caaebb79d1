"""Configuration of the OPC UA source (``type: opcua`` in a topology's ``sources``).

Validated when the topology is loaded: every mistake names its field and says what is allowed. Nothing
here imports asyncua, so loading a topology does not need the OPC UA extra installed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from connectors.common.spool import SpoolConfig, SpoolSetting
from pipeline.core.durations import DurationMs

# ns=<index>;<kind>=<id>  or  nsu=<namespace uri>;<kind>=<id>  or  <kind>=<id> (namespace 0)
NODE_ID = re.compile(r"^(?:(?:ns=\d+|nsu=[^;]+);)?[isgb]=.+$", re.DOTALL)
TEMPLATE_FIELDS = ("name", "parent", "path")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_node_id(v: str) -> str:
    if not NODE_ID.match(v):
        raise ValueError(
            "expected a NodeId such as ns=2;s=Plant/TIC101/PV, nsu=urn:example;s=Tag1, ns=3;i=1001, "
            "ns=2;g=<guid> or ns=2;b=<base64>"
        )
    return v


class Deadband(_Model):
    """A DataChangeFilter deadband: absolute (in the node's units) or percent of its EURange span."""

    type: Literal["absolute", "percent"]
    value: float = Field(gt=0, description="absolute: engineering units; percent: 0-100 of the EURange span")

    @model_validator(mode="after")
    def _percent(self) -> Deadband:
        if self.type == "percent" and self.value > 100:
            raise ValueError("a percent deadband must be at most 100")
        return self


class Monitoring(_Model):
    """Per-node monitoring settings; unset ones fall back to the source's ``defaults``."""

    sampling_interval: DurationMs | None = Field(
        default=None, description="how often the server samples the value"
    )
    queue_size: int | None = Field(
        default=None, ge=1, le=10_000, description="values the server queues per publish"
    )
    deadband: Deadband | None = None


class NodeDefaults(_Model):
    sampling_interval: DurationMs = Field(default=1000, description="default sampling interval")
    queue_size: int = Field(default=10, ge=1, le=10_000)
    deadband: Deadband | None = None


class NodeMapping(Monitoring):
    """One node by NodeId, mapped to site/device/point."""

    node_id: str = Field(
        description="ns=2;s=..., nsu=<uri>;s=..., ns=2;i=..., ns=2;g=<guid>, ns=2;b=<base64>"
    )
    site: str | None = Field(default=None, description="site (default: the source's site)")
    device: str = Field(pattern=r"^[^/]+$")
    point: str = Field(min_length=1)
    unit: str | None = Field(default=None, description="unit (default: the node's EngineeringUnits, if any)")

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str) -> str:
        return check_node_id(v)


class BrowseMapping(Monitoring):
    """Every Variable under a folder or object whose browse name matches a glob."""

    root: str = Field(
        description="the folder or object to start from: a NodeId, or a browse path from the Root folder "
        "such as /0:Objects/2:Plant/2:Loops"
    )
    include: str = Field(default="*", description="glob on the Variable's browse name, e.g. 'PV' or 'Temp*'")
    exclude: str | None = Field(default=None, description="glob of browse names to leave out")
    recursive: bool = Field(default=True, description="descend into sub-folders and objects")
    max_depth: int = Field(default=8, ge=1, le=64)
    site: str | None = None
    device: str = Field(default="{parent}", description="template: {parent}, {name} or fixed text")
    point: str = Field(
        default="{name}", description="template: {name}, {parent}, {path} (relative browse path)"
    )
    unit: str | None = None

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        if v.startswith("/"):
            if not re.match(r"^(/\d+:[^/]+)+$", v):
                raise ValueError("a browse path is /<ns>:<name>/<ns>:<name>..., e.g. /0:Objects/2:Plant")
            return v
        return check_node_id(v)

    @field_validator("device", "point")
    @classmethod
    def _template(cls, v: str) -> str:
        for name in re.findall(r"\{([^}]*)\}", v):
            if name not in TEMPLATE_FIELDS:
                raise ValueError(
                    f"unknown field {{{name}}}; allowed: " + ", ".join(f"{{{f}}}" for f in TEMPLATE_FIELDS)
                )
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if "{path}" in v or "/" in v:
            raise ValueError("a device name cannot contain '/': use {parent} or {name}, not {path}")
        return v


class Security(_Model):
    policy: Literal["None", "Basic256Sha256"] = "None"
    mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    certificate: Path | None = Field(default=None, description="client certificate (DER or PEM)")
    private_key: Path | None = Field(default=None, description="client private key (PEM)")
    private_key_password: SecretStr | None = None
    server_certificate: Path | None = Field(
        default=None, description="trusted server certificate; with trust_on_first_use, where it is stored"
    )
    trust_on_first_use: bool = Field(
        default=False,
        description="store the server's certificate at server_certificate on first connect, "
        "then insist on it",
    )
    application_uri: str = Field(
        default="urn:plantstream:client", description="must match the URI in the client certificate"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Security:
        if (self.policy == "None") != (self.mode == "None"):
            raise ValueError(
                "policy and mode go together: policy None with mode None, or policy "
                "Basic256Sha256 with mode Sign or SignAndEncrypt"
            )
        if self.policy != "None":
            missing = [f for f in ("certificate", "private_key") if getattr(self, f) is None]
            if missing:
                raise ValueError(
                    f"policy {self.policy} needs a client {' and '.join(missing)} (paths to the files)"
                )
            if self.server_certificate is None:
                raise ValueError(
                    "policy Basic256Sha256 needs server_certificate: the trusted server "
                    "certificate file, or where to store it with trust_on_first_use: true"
                )
        if self.trust_on_first_use and self.server_certificate is None:
            raise ValueError(
                "trust_on_first_use needs server_certificate: the file to store the certificate in"
            )
        return self


class Reconnect(_Model):
    initial: DurationMs = Field(default=500, description="first retry delay")
    max: DurationMs = Field(default=5_000, description="cap of the exponential backoff")

    @model_validator(mode="after")
    def _order(self) -> Reconnect:
        if not 10 <= self.initial <= self.max:
            raise ValueError("reconnect.initial must be at least 10ms and at most reconnect.max")
        return self


class OpcUaSource(_Model):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["opcua"]
    endpoint: str = Field(description="opc.tcp://host:port[/path]")
    site: str = Field(pattern=r"^[^/]+$", description="site of every node unless a mapping sets its own")
    security: Security = Field(default_factory=lambda: Security.model_validate({}))
    username: str | None = None
    password: SecretStr | None = None
    timestamp: Literal["source", "server"] = Field(
        default="source", description="which timestamp becomes the reading's ts; both are kept in status"
    )
    publishing_interval: DurationMs = Field(
        default=1000, description="how often the server sends notifications"
    )
    defaults: NodeDefaults = Field(default_factory=lambda: NodeDefaults.model_validate({}))
    nodes: list[NodeMapping] = Field(default_factory=list)
    browse: list[BrowseMapping] = Field(default_factory=list)
    request_timeout: DurationMs = Field(default=4000, description="timeout of each OPC UA request")
    reconnect: Reconnect = Field(default_factory=lambda: Reconnect.model_validate({}))
    max_batch: int = Field(default=2000, ge=1, le=100_000, description="readings per ReadingBatch at most")
    spool: SpoolSetting = SpoolConfig()  # store and forward; when_full defaults to drop_oldest here

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not re.match(r"^opc\.tcp://[^/:]+(:\d+)?(/.*)?$", v):
            raise ValueError("expected opc.tcp://host:port[/path]")
        return v

    @model_validator(mode="after")
    def _complete(self) -> OpcUaSource:
        if not self.nodes and not self.browse:
            raise ValueError(
                "give at least one entry in 'nodes' (by NodeId) or 'browse' (by folder and glob)"
            )
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: set both, or neither for anonymous")
        seen: dict[tuple[str, str, str], str] = {}
        for n in self.nodes:
            key = (n.site or self.site, n.device, n.point)
            if key in seen:
                raise ValueError(f"nodes {seen[key]} and {n.node_id} both map to {'/'.join(key)}")
            seen[key] = n.node_id
        return self

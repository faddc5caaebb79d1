"""Configuration of the BACnet/IP source (``type: bacnet`` in a topology's ``sources``).

Validated when the topology is loaded, each mistake with its field and the fix. Nothing here imports
bacpypes3, so loading a topology does not need the BACnet extra installed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from connectors.common.spool import SpoolConfig, SpoolSetting
from pipeline.core.durations import DurationMs

ObjectType = Literal[
    "analog-input",
    "analog-output",
    "analog-value",
    "binary-input",
    "binary-output",
    "binary-value",
    "multi-state-input",
    "multi-state-output",
    "multi-state-value",
]
OBJECT_TYPES: tuple[ObjectType, ...] = get_args(ObjectType)
OBJECT_REF = re.compile(r"^(" + "|".join(OBJECT_TYPES) + r"),(\d{1,7})$")
IPV4_PORT = re.compile(r"^\d{1,3}(\.\d{1,3}){3}(:\d{1,5})?$")
MAX_INSTANCE = 4_194_302


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PointConfig(_Model):
    """One object of a device, read as a point; optionally COV-subscribed and writable."""

    object: str = Field(description="object type and instance, e.g. analog-value,1")
    name: str | None = Field(
        default=None, min_length=1, description="point name (default: the object's objectName)"
    )
    cov: bool = Field(default=False, description="subscribe to changes (SubscribeCOV) instead of polling")
    writable: bool = Field(default=False, description="accept WriteCommands for this point")
    min: float | None = Field(default=None, description="lowest value a command may write")
    max: float | None = Field(default=None, description="highest value a command may write")
    unit: str | None = Field(default=None, description="unit (default: the object's units property)")

    @field_validator("object")
    @classmethod
    def _object(cls, v: str) -> str:
        m = OBJECT_REF.match(v.strip())
        if not m:
            raise ValueError(
                "expected <object-type>,<instance> such as analog-value,1; types: " + ", ".join(OBJECT_TYPES)
            )
        return v.strip()

    @model_validator(mode="after")
    def _bounds(self) -> PointConfig:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        if self.writable and self.name is None:
            raise ValueError("a writable point needs a 'name': commands address it as site/device/name")
        return self


class DeviceDefaults(_Model):
    interval: DurationMs = Field(default=10_000, description="polling interval of each device")
    object_types: list[ObjectType] = Field(
        default_factory=lambda: list(OBJECT_TYPES), description="object types read from the objectList"
    )
    name_pattern: str = Field(default="*", description="glob on objectName for points from the objectList")
    cov_pattern: str | None = Field(default=None, description="glob on objectName: those points use COV")
    timeout: DurationMs = Field(default=5_000, description="longest wait for one request, retries included")
    max_concurrent: int = Field(default=2, ge=1, le=16, description="requests in flight per device")


class DeviceConfig(_Model):
    instance: int = Field(ge=0, le=MAX_INSTANCE, description="device instance number")
    address: str | None = Field(default=None, description="IPv4[:port]; without it, found by Who-Is")
    name: str | None = Field(
        default=None,
        pattern=r"^[^/]+$",
        description="device name in records (default: the device's objectName)",
    )
    site: str | None = Field(default=None, pattern=r"^[^/]+$")
    interval: DurationMs | None = None
    points: list[PointConfig] = Field(
        default_factory=list,
        description="points by object, with their settings (name, cov, writable, min, max, unit)",
    )
    object_list: bool | None = Field(
        default=None,
        description="also read every object of the device's objectList that "
        "matches object_types and name_pattern (default: only when "
        "'points' is empty)",
    )
    object_types: list[ObjectType] | None = None
    name_pattern: str | None = None
    cov_pattern: str | None = None
    max_apdu: int | None = Field(
        default=None, ge=50, le=1476, description="override the device's maxApduLengthAccepted"
    )
    read_multiple: bool | None = Field(
        default=None,
        description="true/false forces ReadPropertyMultiple on/off; "
        "default: use it unless the device rejects it",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not IPV4_PORT.match(v):
            raise ValueError(
                "expected an IPv4 address with an optional port, e.g. 192.168.1.20 or 127.0.0.2:47808"
            )
        return v

    @model_validator(mode="after")
    def _unique(self) -> DeviceConfig:
        names = [p.name for p in self.points if p.name]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"point names must be unique in a device; repeated: {', '.join(dup)}")
        objs = [p.object for p in self.points]
        dup = sorted({o for o in objs if objs.count(o) > 1})
        if dup:
            raise ValueError(f"each object may be listed once; repeated: {', '.join(dup)}")
        if any(p.writable for p in self.points) and self.name is None:
            raise ValueError(
                "a device with writable points needs a 'name': commands address points as site/device/point"
            )
        return self


class Discovery(_Model):
    low: int = Field(default=0, ge=0, le=MAX_INSTANCE, description="lowest device instance to look for")
    high: int = Field(default=MAX_INSTANCE, ge=0, le=MAX_INSTANCE, description="highest device instance")
    target: str | None = Field(
        default=None, description="where Who-Is goes, IPv4:port (default: the local broadcast)"
    )
    timeout: DurationMs = Field(default=3_000, description="how long to collect I-Am answers")
    interval: DurationMs = Field(default=300_000, description="repeat discovery this often (0: once)")

    @model_validator(mode="after")
    def _range(self) -> Discovery:
        if self.low > self.high:
            raise ValueError(f"discovery.low {self.low} is above discovery.high {self.high}")
        if self.target is not None and not IPV4_PORT.match(self.target):
            raise ValueError("discovery.target: expected IPv4:port, e.g. 192.168.1.255:47808")
        return self


class Cov(_Model):
    lifetime: DurationMs = Field(default=300_000, description="subscription lifetime; renewed before it ends")
    confirmed: bool = Field(default=False, description="ask for confirmed notifications")

    @field_validator("lifetime")
    @classmethod
    def _lifetime(cls, v: int) -> int:
        if not 10_000 <= v <= 86_400_000:
            raise ValueError("cov.lifetime must be between 10s and 24h")
        return v


class BacnetSource(_Model):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["bacnet"]
    local_address: str = Field(
        description="the connector's own BACnet/IP address: ip/prefix:port, e.g. 192.168.1.10/24:47808"
    )
    device_instance: int = Field(
        default=599_999, ge=0, le=MAX_INSTANCE, description="instance of the connector's own device object"
    )
    site: str = Field(pattern=r"^[^/]+$", description="site of every device unless the device sets its own")
    devices: list[DeviceConfig] = Field(default_factory=list)
    discovery: Discovery | None = None
    defaults: DeviceDefaults = Field(default_factory=lambda: DeviceDefaults.model_validate({}))
    cov: Cov = Field(default_factory=lambda: Cov.model_validate({}))
    apdu_timeout: DurationMs = Field(default=2_000, description="APDU timeout of the connector's requests")
    apdu_retries: int = Field(default=1, ge=0, le=5)
    priority_floor: int = Field(
        default=8,
        ge=1,
        le=16,
        description="commands may write at this priority or a lower one (higher "
        "number); 1-7 are life-safety and manual ranges",
    )
    max_batch: int = Field(default=2000, ge=1, le=100_000)
    spool: SpoolSetting = SpoolConfig()  # store and forward; when_full defaults to drop_oldest here
    network: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.:/-]+$",
        description="the BACnet network this source is on; write commands of a network are executed by one "
        "process at a time (default: the IP network and port of local_address, e.g. 192.168.1.0/24:47808)",
    )

    @field_validator("local_address")
    @classmethod
    def _local(cls, v: str) -> str:
        if v != "host" and not re.match(r"^\d{1,3}(\.\d{1,3}){3}(/\d{1,2})?(:\d{1,5})?$", v):
            raise ValueError("expected ip/prefix:port such as 192.168.1.10/24:47808 (or 'host')")
        return v

    @model_validator(mode="after")
    def _complete(self) -> BacnetSource:
        if not self.devices and self.discovery is None:
            raise ValueError("give 'devices' (instances with addresses) or 'discovery' (a Who-Is range)")
        instances = [d.instance for d in self.devices]
        dup = sorted({i for i in instances if instances.count(i) > 1})
        if dup:
            raise ValueError(f"device instances must be unique; repeated: {', '.join(map(str, dup))}")
        for i, d in enumerate(self.devices):
            if d.address is None and self.discovery is None:
                raise ValueError(
                    f"devices[{i}] (instance {d.instance}) has no address: give one, or add "
                    "'discovery' so it is found by Who-Is"
                )
        if self.network is None and self.writable_points() and self.local_address == "host":
            raise ValueError(
                "network: a source with writable points and local_address 'host' needs a 'network' (the "
                "BACnet network's name, e.g. 192.168.1.0/24:47808), so that one process executes its writes"
            )
        names = [(d.site or self.site, d.name) for d in self.devices if d.name]
        dup_names = sorted({"/".join(n) for n in names if names.count(n) > 1})
        if dup_names:
            raise ValueError(f"device names must be unique per site; repeated: {', '.join(dup_names)}")
        return self

    @property
    def network_id(self) -> str:
        """The BACnet network: ``network``, else the IP network and UDP port of ``local_address``.

        Two connectors on one IP subnet and port reach the same devices, so they are one network.
        """
        if self.network is not None:
            return self.network
        addr, _, port = self.local_address.partition(":")
        if addr == "host":
            return f"host:{port or 47808}"
        net = ipaddress.ip_interface(addr if "/" in addr else f"{addr}/24").network
        return f"{net}:{port or 47808}"

    def writable_points(self) -> dict[str, tuple[DeviceConfig, PointConfig]]:
        """Series id (site/device/point) -> where it lives, for every point marked writable."""
        out = {}
        for d in self.devices:
            for p in d.points:
                if p.writable and d.name and p.name:
                    out[f"{d.site or self.site}/{d.name}/{p.name}"] = (d, p)
        return out

    def configured_points(self) -> dict[str, tuple[DeviceConfig, PointConfig]]:
        """Series id -> point, for every point the topology names (writable or not)."""
        out = {}
        for d in self.devices:
            for p in d.points:
                if d.name and p.name:
                    out[f"{d.site or self.site}/{d.name}/{p.name}"] = (d, p)
        return out


def check_write_networks(sources: Iterable[object]) -> str | None:
    """None when each BACnet network has its writable points in one source, else the problem and the fix.

    The write commands of a network are executed by one process at a time (one consumer group per
    network), and that process must hold the devices of every writable point of the network.
    """
    writers: dict[str, list[str]] = {}
    for s in sources:
        if isinstance(s, BacnetSource) and s.writable_points():
            writers.setdefault(s.network_id, []).append(s.id)
    for net, ids in writers.items():
        if len(ids) > 1:
            return (
                f"sources {', '.join(ids)} are on the same BACnet network {net} and all have writable "
                "points: put the writable points of a network in one source (or give the sources different "
                "'network' values if they really are on different networks)"
            )
    return None

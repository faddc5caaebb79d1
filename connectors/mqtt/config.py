"""Configuration of the MQTT source (``type: mqtt`` in a topology's ``sources``), validated on load."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from connectors.common.spool import SpoolConfig, SpoolSetting
from connectors.mqtt.wire import MAX_PACKET_SIZE, MIN_PACKET_SIZE
from pipeline.core.durations import DurationMs
from pipeline.core.topology import Model

TEMPLATE_FIELDS = ("site", "device", "point")


class TopicMapping(Model):
    filter: str = Field(description="MQTT topic filter, e.g. plant/+/+/+ or heatpump/#")
    template: str = Field(description="topic levels to site/device/point, e.g. plant/{site}/{device}/{point}")
    site: str | None = Field(None, description="fixed site where the topic does not carry it")
    device: str | None = Field(None, description="fixed device where the topic does not carry it")
    point: str | None = Field(None, description="fixed point where the topic does not carry it")
    unit: str | None = None

    @field_validator("template")
    @classmethod
    def _known_fields(cls, v: str) -> str:
        for name in re.findall(r"\{([^}]*)\}", v):
            if name not in TEMPLATE_FIELDS:
                raise ValueError(
                    f"unknown field {{{name}}}; allowed: " + ", ".join(f"{{{f}}}" for f in TEMPLATE_FIELDS)
                )
        return v

    @model_validator(mode="after")
    def _complete(self) -> TopicMapping:
        named = set(re.findall(r"\{([^}]*)\}", self.template))
        for f in ("site", "device"):
            if f not in named and getattr(self, f) is None:
                raise ValueError(
                    f"the template does not name {{{f}}}: add it to the template or set a fixed '{f}:'"
                )
        if "point" in named and self.point is not None:
            raise ValueError("'point' is set both in the template and as a fixed value; keep one")
        return self

    @property
    def names_point(self) -> bool:
        return "{point}" in self.template or self.point is not None


class BatchSettings(Model):
    max_readings: int = Field(500, ge=1, le=100_000)
    max_delay: DurationMs = Field(200, description="flush a device's batch after at most this long")

    @field_validator("max_delay")
    @classmethod
    def _bounded(cls, v: int) -> int:
        if not 1 <= v <= 200:
            raise ValueError("max_delay must be between 1ms and 200ms")
        return v


class MqttSource(Model):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["mqtt"]
    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host:port")
    client_id: str | None = Field(None, description="persistent-session client id (default plantstream-<id>)")
    qos: Literal[0, 1] = 1
    topics: list[TopicMapping] = Field(min_length=1)
    batch: BatchSettings = BatchSettings()
    max_inflight: int = Field(10_000, ge=1, description="unacknowledged MQTT messages at most")
    max_packet_size: int = Field(
        1 << 20,
        description="largest MQTT packet taken, in bytes; also the MQTT 5 Maximum Packet Size asked of the "
        "broker",
    )
    username: str | None = None
    password: str | None = Field(None, repr=False)
    spool: SpoolSetting = SpoolConfig()  # store and forward; when_full defaults to block here

    @field_validator("max_packet_size")
    @classmethod
    def _packet_size(cls, v: int) -> int:
        if not MIN_PACKET_SIZE <= v <= MAX_PACKET_SIZE:
            raise ValueError(
                f"max_packet_size must be between {MIN_PACKET_SIZE} and {MAX_PACKET_SIZE} bytes "
                f"(MQTT's largest packet), got {v}"
            )
        return v

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, v: str) -> str:
        if not re.match(r"^mqtts?://[^/:]+(:\d+)?/?$", v):
            raise ValueError("expected mqtt://host:port")
        return v

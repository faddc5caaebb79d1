"""Sources and sinks by topology ``type``: adding one is a folder beside this file and a line here.

A source line names its configuration model (validated when the topology is loaded; it must not import the
protocol's client library) and its runner, built as ``Runner(cfg, producer)`` and driven by
``runner.run(stop_event)`` on a thread of its own. A sink line names its configuration model, a
:class:`pipeline.core.topology.SinkBase` whose ``open_writer`` returns a
:class:`connectors.common.sink.SinkWriter`.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import BaseModel

SOURCES: dict[str, tuple[str, str]] = {
    "mqtt": ("connectors.mqtt.config:MqttSource", "connectors.mqtt.source:MqttSourceRunner"),
    "opcua": ("connectors.opcua.config:OpcUaSource", "connectors.opcua.source:OpcUaSourceRunner"),
    "bacnet": ("connectors.bacnet.config:BacnetSource", "connectors.bacnet.source:BacnetSourceRunner"),
}

SINKS: dict[str, str] = {
    "postgres": "connectors.timescale.config:PostgresSink",
    "influx": "connectors.influx.config:InfluxSink",
}


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def source_config(source_type: str) -> type[BaseModel]:
    return _load(SOURCES[source_type][0])


def sink_config(sink_type: str) -> type[BaseModel]:
    return _load(SINKS[sink_type])


def source_configs() -> list[type[BaseModel]]:
    return [source_config(t) for t in SOURCES]


def sink_configs() -> list[type[BaseModel]]:
    return [sink_config(t) for t in SINKS]


def runner_for(source_type: str) -> Any:
    try:
        ref = SOURCES[source_type][1]
    except KeyError:
        raise KeyError(f"no connector for source type {source_type!r}; known: {', '.join(SOURCES)}") from None
    return _load(ref)

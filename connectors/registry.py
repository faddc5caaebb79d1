"""Source connectors by topology ``type``: adding a protocol adds a line here and a folder beside it.

Each runner class is built as ``Runner(cfg, producer)`` and driven by ``runner.run(stop_event)`` on a
thread of its own; it returns once ``stop_event`` is set, after flushing what it holds.
"""

from __future__ import annotations

import importlib
from typing import Any

RUNNERS: dict[str, str] = {
    "mqtt": "connectors.mqtt.source:MqttSourceRunner",
    "opcua": "connectors.opcua.source:OpcUaSourceRunner",
    "bacnet": "connectors.bacnet.source:BacnetSourceRunner",
}


def runner_for(source_type: str) -> Any:
    try:
        module, _, name = RUNNERS[source_type].partition(":")
    except KeyError:
        raise KeyError(f"no connector for source type {source_type!r}; known: {', '.join(RUNNERS)}") from None
    return getattr(importlib.import_module(module), name)

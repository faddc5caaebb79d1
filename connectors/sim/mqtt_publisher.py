"""``plantstream simulate``: publish synthetic devices to MQTT at a set rate (QoS 1)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from connectors.sim.signals import devices
from pipeline.core import codec

log = logging.getLogger("plantstream.sim")


def _topic_for(template: str, site: str, device: str, point: str | None) -> str:
    out = template.replace("{site}", site).replace("{device}", device)
    return out.replace("{point}", point) if point is not None else out


def run_simulation(
    topo: Any, stop: threading.Event, duration: float | None = None, on_tick: Any = None
) -> int:
    """``topo``: a loaded topology with a ``simulate`` section.

    Publish until ``stop`` is set (or ``duration`` seconds); returns messages published."""
    if topo.simulate is None:
        raise ValueError("the topology has no 'simulate' section")
    src = topo.source(topo.simulate.source)
    mapping = src.topics[0]
    url = urlparse(src.url)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"plantstream-sim-{topo.name}", clean_session=True
    )
    client.max_inflight_messages_set(1000)
    client.connect(url.hostname or "127.0.0.1", url.port or 1883, keepalive=30)
    client.loop_start()
    sims = [d for sc in topo.simulate.scenarios for d in devices(sc.kind, sc.site, sc.devices)]
    period = 1.0 / topo.simulate.rate
    sent = 0
    started = time.time()
    next_t = started
    try:
        while not stop.is_set() and (duration is None or time.time() - started < duration):
            now = time.time()
            for site, device, model in sims:
                values = model.sample(now, period)
                ts = int(now * 1000)
                if mapping.names_point:
                    for point, v in values.items():
                        payload = {"value": v, "ts": ts, "unit": model.units.get(point)}
                        client.publish(
                            _topic_for(mapping.template, site, device, point), codec.dumps(payload), qos=1
                        )
                        sent += 1
                else:
                    client.publish(
                        _topic_for(mapping.template, site, device, None),
                        codec.dumps({"ts": ts, **values}),
                        qos=1,
                    )
                    sent += 1
            if on_tick:
                on_tick(sent)
            next_t += period
            stop.wait(max(0.0, next_t - time.time()))
    finally:
        client.loop_stop()
        client.disconnect()
    return sent

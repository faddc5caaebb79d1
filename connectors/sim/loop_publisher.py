"""Simulated control loops over MQTT: each scenario loop's PV/SP/OP/MODE as readings with explicit timestamps.

The topology's ``simulate.loops`` names, for loops of its ``loops`` section, a scenario of
:mod:`connectors.sim.loops` (well_tuned, aggressive, sticky_valve, saturated, mostly_manual,
external_disturbance). Every sample of a loop is published to the topics the simulate source's topic
mappings give its series, in the conventions of topologies/demo.yaml: ``{"value": v, "ts": ms}`` on a
topic naming the point (``plant/{site}/{device}/{point}``), or one JSON object of the device's points with
``ts`` on a topic without a point (``loops/{site}/{device}``). MODE goes out as the number ``mode_codes``
gives the mode.

Event time is the simulator's own clock (one step per ts) from a start time; ``speed`` paces it against
the wall clock (1: real time). :func:`loop_steps` gives the same steps without publishing, so a test knows
exactly what was sent and what the simulation's truth was.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from connectors.mqtt.parse import topic_matches
from connectors.sim.loops import SCENARIOS, LoopSample, LoopSimulator, scenario
from pipeline.core import codec

log = logging.getLogger("plantstream.sim.loops")

LOOP_TAGS = ("pv", "sp", "op", "mode")


def mqtt_target(source: Any, series: str) -> tuple[str, str | None] | None:
    """(MQTT topic, payload key) that the source's topic mappings turn into ``series``; key None when the
    topic names the point (payload ``{"value", "ts"}``). None when no mapping can carry the series."""
    site, device, point = series.split("/", 2)
    for m in source.topics:
        fixed = {"site": m.site, "device": m.device, "point": m.point}
        if any(
            v is not None and v != {"site": site, "device": device, "point": point}[k]
            for k, v in fixed.items()
        ):
            continue
        levels = m.template.split("/")
        if any(lvl in ("+", "#") for lvl in levels):
            continue
        names_point = "{point}" in levels
        topic = m.template.replace("{site}", site).replace("{device}", device)
        if names_point:
            if "/" in point:
                continue
            topic = topic.replace("{point}", point)
        elif m.point is None and point == "ts":
            continue  # "ts" is the timestamp key of a JSON-object payload
        # The connector parses a message with the first mapping whose filter matches its topic.
        first = next((x for x in source.topics if topic_matches(x.filter, topic)), None)
        if first is not m:
            continue
        return topic, None if names_point or fixed["point"] is not None else point
    return None


def check_simulated_loop(loop: Any, sim: Any, source: Any) -> str | None:
    """Why ``sim`` (a SimLoop) cannot publish ``loop`` through ``source``, or None."""
    spec = SCENARIOS[sim.scenario](sim.seed)
    ts_ms = round(spec.ts * 1000)
    if loop.ts != ts_ms:
        return (
            f"scenario {sim.scenario} samples every {spec.ts:g}s but loop {loop.id!r} has ts {loop.ts}ms; "
            f"set the loop's ts to {spec.ts:g}s"
        )
    if loop.mode is not None:
        missing = [m for m in ("AUTO", "MAN") if m not in loop.mode_codes]
        if missing:
            return (
                f"loop {loop.id!r}: mode_codes need {' and '.join(missing)} (the simulation switches "
                "between AUTO and MAN)"
            )
    for tag, series in loop.series().items():
        if mqtt_target(source, series) is None:
            return (
                f"loop {loop.id!r} {tag} series {series!r} has no topic among source {source.id!r}'s "
                "topic mappings; add one such as plant/{site}/{device}/{point}"
            )
    return None


@dataclass(frozen=True)
class LoopStep:
    """One simulated sample of one loop and the MQTT messages that carry it."""

    loop: str
    ts: int  # event time, epoch ms
    sample: LoopSample
    messages: list[tuple[str, bytes]]  # (topic, payload)
    readings: list[tuple[str, int, float]]  # (series, ts, value) as the connector will read them


class SimulatedLoop:
    def __init__(self, loop: Any, sim: Any, source: Any, start_ms: int) -> None:
        self.loop = loop
        self.sim: LoopSimulator = scenario(sim.scenario, sim.seed)
        self.ts_ms = round(self.sim.spec.ts * 1000)
        skip = round(sim.offset / self.ts_ms)
        for _ in range(skip):
            self.sim.step()
        self.next_ts = start_ms
        self.targets: dict[str, tuple[str, str | None]] = {}
        for tag, series in loop.series().items():
            target = mqtt_target(source, series)
            if target is None:
                raise ValueError(f"loop {loop.id!r}: no MQTT topic for {series!r}")
            self.targets[tag] = target

    def step(self) -> LoopStep:
        smp = self.sim.step()
        ts = self.next_ts
        self.next_ts += self.ts_ms
        values: dict[str, float] = {"pv": smp.pv, "sp": smp.sp, "op": smp.op}
        if "mode" in self.targets:
            values["mode"] = float(self.loop.mode_codes[smp.mode])
        objects: dict[str, dict[str, Any]] = {}
        messages: list[tuple[str, bytes]] = []
        series = self.loop.series()
        for tag, (topic, key) in self.targets.items():
            if key is None:
                messages.append((topic, codec.dumps({"value": values[tag], "ts": ts})))
            else:
                objects.setdefault(topic, {"ts": ts})[key] = values[tag]
        messages.extend((topic, codec.dumps(obj)) for topic, obj in objects.items())
        readings = [(series[tag], ts, values[tag]) for tag in self.targets]
        return LoopStep(self.loop.id, ts, smp, messages, readings)


def simulated_loops(topo: Any, start_ms: int) -> list[SimulatedLoop]:
    if topo.simulate is None or not topo.simulate.loops:
        raise ValueError("the topology's simulate section has no loops")
    source = topo.source(topo.simulate.source)
    by_id = {lp.id: lp for lp in topo.loops}
    return [SimulatedLoop(by_id[s.loop], s, source, start_ms) for s in topo.simulate.loops]


def loop_steps(loops: Sequence[SimulatedLoop], until_ms: int | None = None) -> Iterator[LoopStep]:
    """The loops' steps merged in event-time order (ties in the order of the loops)."""
    heap = [(lp.next_ts, i) for i, lp in enumerate(loops)]
    heapq.heapify(heap)
    while heap:
        ts, i = heapq.heappop(heap)
        if until_ms is not None and ts >= until_ms:
            return
        step = loops[i].step()
        heapq.heappush(heap, (loops[i].next_ts, i))
        yield step


def publish_steps(
    client: mqtt.Client,
    steps: Iterator[LoopStep],
    start_ms: int,
    speed: float,
    stop: threading.Event,
    wall_limit: float | None = None,
    on_step: Callable[[LoopStep], None] | None = None,
) -> int:
    """Publish each step when the wall clock reaches its event time at ``speed``; returns messages sent."""
    started = time.monotonic()
    sent = 0
    pending: deque[mqtt.MQTTMessageInfo] = deque(maxlen=5000)
    for step in steps:
        due = started + (step.ts - start_ms) / 1000.0 / speed
        delay = due - time.monotonic()
        if delay > 0.002 and stop.wait(delay):
            break
        if stop.is_set() or (wall_limit is not None and time.monotonic() - started >= wall_limit):
            break
        for topic, payload in step.messages:
            pending.append(client.publish(topic, payload, qos=1))
            sent += 1
        if on_step is not None:
            on_step(step)
    for info in pending:  # the broker has everything before the caller disconnects
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            info.wait_for_publish(30)
    return sent


def connect(url: str, client_id: str) -> mqtt.Client:
    u = urlparse(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.max_inflight_messages_set(1000)
    client.connect(u.hostname or "127.0.0.1", u.port or 1883, keepalive=30)
    client.loop_start()
    return client


def run_loop_simulation(
    topo: Any,
    stop: threading.Event,
    duration: float | None = None,
    on_tick: Callable[[int], None] | None = None,
    start_ms: int | None = None,
) -> int:
    """``plantstream simulate`` for ``simulate.loops``: publish live from now (or ``start_ms``) at
    ``simulate.speed`` until ``stop`` is set or ``duration`` wall-clock seconds have passed."""
    start = int(time.time() * 1000) if start_ms is None else start_ms
    start -= start % 1000
    loops = simulated_loops(topo, start)
    source = topo.source(topo.simulate.source)
    client = connect(source.url, f"plantstream-sim-loops-{topo.name}")
    count = [0]

    def tick(_step: LoopStep) -> None:
        count[0] += 1
        if on_tick is not None and count[0] % (10 * len(loops)) == 0:
            on_tick(count[0])

    try:
        sent = publish_steps(client, loop_steps(loops), start, topo.simulate.speed, stop, duration, tick)
    finally:
        client.loop_stop()
        client.disconnect()
    log.info("loop simulation: %d messages published", sent)
    return sent

"""Configuration of the simulated devices (the topology's ``simulate`` section)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.durations import DurationMs
from pipeline.core.topology import Model

# The named loop simulations of connectors/sim/loops.py (a unit test keeps the two lists equal).
LOOP_SCENARIOS = (
    "well_tuned",
    "aggressive",
    "sticky_valve",
    "saturated",
    "mostly_manual",
    "external_disturbance",
)


class SimLoop(Model):
    loop: str = Field(description="id of a loop in the loops section; its series are published")
    scenario: Literal[
        "well_tuned", "aggressive", "sticky_valve", "saturated", "mostly_manual", "external_disturbance"
    ] = Field(description="named loop simulation (connectors/sim/loops.py)")
    seed: int = Field(0, ge=0)
    offset: DurationMs = Field(0, description="simulated time skipped before publishing starts")


class SimSignal(Model):
    kind: Literal["energy_site", "ahu"]
    site: str = "site1"
    devices: int = Field(1, ge=1, le=10_000)


class Simulation(Model):
    source: str = Field(description="id of the MQTT source whose topics the simulator publishes to")
    rate: float = Field(1.0, gt=0, le=10_000, description="samples per second per device")
    scenarios: list[SimSignal] = Field(default_factory=lambda: [SimSignal(kind="energy_site")])
    loops: list[SimLoop] = Field(
        default_factory=list,
        description="simulated control loops, published as "
        "their loops' PV/SP/OP/MODE series with explicit timestamps",
    )
    speed: float = Field(
        1.0,
        gt=0,
        le=1000,
        description="event-time pacing of the loop simulations: 1 "
        "is real time, 20 makes a simulated minute last 3 s (timestamps run ahead of time)",
    )

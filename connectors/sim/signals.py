"""Synthetic but plausible plant signals for demos and load: an energy site and an air-handling unit.

Deterministic for a seed; values are functions of event time, so a replayed simulation is the same.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

DAY_S = 86_400.0


@dataclass
class EnergySite:
    """PV power following the sun, a battery balancing it against a load, the grid taking the rest."""

    peak_kw: float = 250.0
    battery_kwh: float = 500.0
    seed: int = 1
    soc: float = 55.0
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    units = {
        "pv.power": "kW",
        "load.power": "kW",
        "battery.power": "kW",
        "battery.soc": "%",
        "grid.power": "kW",
        "inverter.temperature": "degC",
    }

    def sample(self, t: float, dt: float) -> dict[str, float]:
        r = self._rng
        hour = (t % DAY_S) / 3600.0
        sun = max(0.0, math.sin(math.pi * (hour - 6.0) / 12.0))
        clouds = 0.85 + 0.15 * math.sin(t / 420.0) + r.gauss(0, 0.02)
        pv = max(0.0, self.peak_kw * sun * clouds)
        load = 120.0 + 40.0 * math.sin(2 * math.pi * (hour - 9.0) / 24.0) + r.gauss(0, 3.0)
        surplus = pv - load
        batt = max(-100.0, min(100.0, surplus * 0.8))  # + charges
        if (self.soc >= 95 and batt > 0) or (self.soc <= 10 and batt < 0):
            batt = 0.0
        self.soc = min(100.0, max(0.0, self.soc + batt * dt / 3600.0 / self.battery_kwh * 100.0))
        grid = load - pv + batt  # + imports
        return {
            "pv.power": round(pv, 3),
            "load.power": round(load, 3),
            "battery.power": round(batt, 3),
            "battery.soc": round(self.soc, 3),
            "grid.power": round(grid, 3),
            "inverter.temperature": round(25.0 + pv / self.peak_kw * 30.0 + r.gauss(0, 0.2), 2),
        }


@dataclass
class AirHandlingUnit:
    """Supply air tracking its set-point, outdoor air on a daily cycle, fan and damper positions. Now and then
    (90 s in every 10 minutes, a little later for each unit) the heating valve sticks open and the supply air
    overshoots by up to 8 K: an excursion for the demo's alert rules."""

    seed: int = 2
    _rng: random.Random = field(init=False)
    _supply: float = 16.0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    units = {
        "outdoor.temperature": "degC",
        "return.temperature": "degC",
        "supply.temperature": "degC",
        "supply.setpoint": "degC",
        "fan.speed": "%",
        "damper.position": "%",
        "filter.dp": "Pa",
    }

    def sample(self, t: float, dt: float) -> dict[str, float]:
        r = self._rng
        hour = (t % DAY_S) / 3600.0
        outdoor = 8.0 + 7.0 * math.sin(2 * math.pi * (hour - 9.0) / 24.0) + r.gauss(0, 0.1)
        sp = 17.0 if 6 <= hour < 19 else 15.0
        self._supply += (sp - self._supply) * min(1.0, dt / 120.0) + r.gauss(0, 0.05)
        phase = (t + self.seed % 300) % 600
        excursion = 8.0 * math.sin(math.pi * (phase - 300) / 90) if 300 <= phase < 390 else 0.0
        return {
            "outdoor.temperature": round(outdoor, 3),
            "return.temperature": round(21.5 + r.gauss(0, 0.1), 3),
            "supply.temperature": round(self._supply + excursion, 3),
            "supply.setpoint": sp,
            "fan.speed": round(65.0 + 10 * math.sin(t / 900.0) + r.gauss(0, 0.5), 2),
            "damper.position": round(min(100.0, max(0.0, 30.0 + (outdoor - 8.0) * 3.0)), 2),
            "filter.dp": round(120.0 + t % 3600 / 360.0, 2),
        }


MODELS = {"energy_site": EnergySite, "ahu": AirHandlingUnit}


def devices(kind: str, site: str, count: int) -> Iterator[tuple[str, str, EnergySite | AirHandlingUnit]]:
    prefix = {"energy_site": "bess", "ahu": "ahu"}[kind]
    for i in range(count):
        yield site, f"{prefix}{i + 1:02d}", MODELS[kind](seed=hash((site, kind, i)) & 0xFFFF)

"""Simulated control loops for KPI tests and live demos.

A loop is a discrete-time process (first order plus dead time, or integrating) under a velocity-form PI
controller with OP limits, an optional sticky valve (He, Wang, Pottmann & Qin 2007, IECR 46:4549 two-
parameter model), external disturbances (sinusoid, step, random walk) at the process input or output,
white measurement noise, AUTO/MAN mode changes and SP steps.

:func:`scenario` builds the named cases (``well_tuned``, ``aggressive``, ``sticky_valve``, ``saturated``,
``mostly_manual``, ``external_disturbance``); each :class:`LoopSimulator` can be stepped sample by sample
(to publish live) or run into arrays (for tests), and is deterministic for a seed. ``truth`` gives what
the KPIs should find: the oscillation period, the time at the OP limit, the time in AUTO, … .
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Where = Literal["input", "output"]

AUTO = "AUTO"
MAN = "MAN"

# ------------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class Fopdt:
    """K·e^(-θs)/(τs + 1), in % of PV span per % OP; discretised with a zero-order hold."""

    gain: float = 1.0
    tau: float = 20.0  # s
    dead_time: float = 4.0  # s, rounded to whole samples

    loop_type = "self_regulating"


@dataclass(frozen=True)
class Integrating:
    """K·e^(-θs)/s: PV moves at gain·(OP - balance_op) %/s (a level with a fixed outflow)."""

    gain: float = 0.01
    dead_time: float = 2.0
    balance_op: float = 50.0

    loop_type = "integrating"


@dataclass(frozen=True)
class PiTuning:
    """u = Kc·(e + (1/Ti)∫e dt), e = SP - PV (reverse acting for a positive process gain)."""

    kc: float
    ti: float  # s


@dataclass(frozen=True)
class HeStiction:
    """He et al. (2007) stiction model: the valve holds until the accumulated OP change exceeds the static
    band fs, then jumps to OP - sign·fd (fd the dynamic band; fd = 0 means no slip-jump)."""

    fs: float = 3.0  # % of valve travel
    fd: float = 0.0


@dataclass(frozen=True)
class Sinusoid:
    amplitude: float
    period_s: float
    phase: float = 0.0
    where: Where = "output"


@dataclass(frozen=True)
class Step:
    at_s: float
    size: float
    until_s: float | None = None
    where: Where = "input"


@dataclass(frozen=True)
class RandomWalk:
    sigma: float  # increment std per √s, in % (PV span for "output", OP for "input")
    where: Where = "input"


Disturbance = Sinusoid | Step | RandomWalk


@dataclass(frozen=True)
class ScenarioSpec:
    """Everything that defines one simulated loop. Times in s from the run start."""

    name: str
    process: Fopdt | Integrating
    tuning: PiTuning
    ts: float = 1.0
    valve: HeStiction | None = None
    disturbances: tuple[Disturbance, ...] = ()
    noise_sigma: float = 0.0  # PV measurement noise, % of span
    sp0: float = 50.0
    op0: float = 50.0  # OP at the initial steady state
    pv_lo: float = 0.0
    pv_hi: float = 100.0
    op_lo: float = 0.0
    op_hi: float = 100.0
    mode_schedule: tuple[tuple[float, str], ...] = ((0.0, AUTO),)
    sp_schedule: tuple[tuple[float, float], ...] = ()
    manual_op: float | None = None  # OP set by the operator in MAN; None holds the last OP
    duration_s: float = 7200.0  # default run length
    seed: int = 0
    t0: float = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    description: str = ""
    facts: Mapping[str, Any] = field(default_factory=dict)  # known answers fixed by construction


# ------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class LoopSample:
    t: float
    pv: float
    sp: float
    op: float
    mode: str
    valve: float  # actual valve position (after stiction)
    at_op_hi: bool  # the controller wanted OP ≥ OP_hi and was clamped (or sits at it)
    at_op_lo: bool


@dataclass(frozen=True)
class LoopRun:
    t: npt.NDArray[np.float64]
    pv: npt.NDArray[np.float64]
    sp: npt.NDArray[np.float64]
    op: npt.NDArray[np.float64]
    mode: npt.NDArray[Any]
    valve: npt.NDArray[np.float64]
    at_op_hi: npt.NDArray[np.bool_]
    at_op_lo: npt.NDArray[np.bool_]
    ts: float
    truth: Mapping[str, Any]

    def samples(self, quality: str = "good") -> dict[str, list[tuple[float, Any, str]]]:
        """Tag → [(t, value, quality)], the shape :func:`pipeline.kpi.align` takes."""
        return {
            "pv": [(float(a), float(b), quality) for a, b in zip(self.t, self.pv, strict=True)],
            "sp": [(float(a), float(b), quality) for a, b in zip(self.t, self.sp, strict=True)],
            "op": [(float(a), float(b), quality) for a, b in zip(self.t, self.op, strict=True)],
            "mode": [(float(a), str(b), quality) for a, b in zip(self.t, self.mode, strict=True)],
        }


class LoopSimulator:
    """A steppable simulated loop; ``step()`` gives one sample, ``run(n)`` a whole array run."""

    units = {"pv": "%", "sp": "%", "op": "%", "mode": None}

    def __init__(self, spec: ScenarioSpec, seed: int | None = None) -> None:
        self.spec = spec if seed is None else replace(spec, seed=seed)
        self.reset()

    # -- set-up
    def reset(self) -> None:
        s = self.spec
        self._rng = np.random.default_rng(s.seed)
        self.k = 0
        self._y = 0.0  # process output, deviation from the initial steady state
        self._d = max(0, round(s.process.dead_time / s.ts))
        self._line: deque[float] = deque([0.0] * self._d, maxlen=self._d) if self._d else deque()
        self._a = math.exp(-s.ts / s.process.tau) if isinstance(s.process, Fopdt) else 1.0
        self._op = s.op0
        self._e_prev: float | None = None
        self._valve_x = s.op0
        self._valve_ur = 0.0
        self._valve_u_prev = s.op0
        self._walk = [0.0] * len(s.disturbances)
        self._n_auto = 0
        self._n_hi = 0
        self._n_lo = 0
        self._modes = sorted(s.mode_schedule)
        self._sps = sorted(s.sp_schedule)

    @property
    def direction(self) -> float:
        return 1.0 if self.spec.process.gain >= 0 else -1.0

    def _scheduled(self, table: list[tuple[float, Any]], t_rel: float, default: Any) -> Any:
        out = default
        for at, v in table:
            if at <= t_rel + 1e-9:
                out = v
            else:
                break
        return out

    def _disturbances(self, t_rel: float) -> tuple[float, float]:
        d_in = d_out = 0.0
        s = self.spec
        for i, d in enumerate(s.disturbances):
            if isinstance(d, Sinusoid):
                v = d.amplitude * math.sin(2.0 * math.pi * t_rel / d.period_s + d.phase)
            elif isinstance(d, Step):
                v = d.size if t_rel >= d.at_s and (d.until_s is None or t_rel < d.until_s) else 0.0
            else:
                self._walk[i] += d.sigma * math.sqrt(s.ts) * float(self._rng.standard_normal())
                v = self._walk[i]
            if d.where == "input":
                d_in += v
            else:
                d_out += v
        return d_in, d_out

    def _valve(self, u: float) -> float:
        v = self.spec.valve
        if v is None:
            return u
        # He et al. (2007): accumulate the OP change as residual force; slip once it beats static friction.
        self._valve_ur += u - self._valve_u_prev
        self._valve_u_prev = u
        if abs(self._valve_ur) > v.fs:
            sgn = 1.0 if self._valve_ur > 0 else -1.0
            self._valve_x = u - sgn * v.fd
            self._valve_ur = sgn * v.fd
        return self._valve_x

    # -- stepping
    def step(self) -> LoopSample:
        s = self.spec
        t_rel = self.k * s.ts
        mode = str(self._scheduled(self._modes, t_rel, AUTO))
        sp = float(self._scheduled(self._sps, t_rel, s.sp0))
        d_in, d_out = self._disturbances(t_rel)
        noise = s.noise_sigma * float(self._rng.standard_normal()) if s.noise_sigma > 0 else 0.0
        pv = s.sp0 + self._y + d_out + noise

        hi = lo = False
        e = self.direction * (sp - pv)
        if mode == AUTO:
            kc, ti = s.tuning.kc, s.tuning.ti
            e_prev = e if self._e_prev is None else self._e_prev
            u = self._op + kc * (e - e_prev) + kc * s.ts / ti * e  # velocity form: no integral wind-up
            hi, lo = u >= s.op_hi, u <= s.op_lo
            self._op = min(max(u, s.op_lo), s.op_hi)
            self._n_auto += 1
        elif s.manual_op is not None:
            self._op = s.manual_op
        self._e_prev = e  # tracked in MAN too, so the return to AUTO is bumpless
        self._n_hi += hi
        self._n_lo += lo

        x = self._valve(self._op)
        u_in = x - s.op0 + d_in
        if self._d:
            delayed = self._line[0]
            self._line.append(u_in)
        else:
            delayed = u_in
        p = s.process
        if isinstance(p, Fopdt):
            self._y = self._a * self._y + p.gain * (1.0 - self._a) * delayed
        else:
            self._y += p.gain * s.ts * (delayed + s.op0 - p.balance_op)
        sample = LoopSample(s.t0 + t_rel, pv, sp, self._op, mode, x, hi, lo)
        self.k += 1
        return sample

    def __iter__(self) -> Iterator[LoopSample]:
        while True:
            yield self.step()

    def sample(self, t: float, dt: float) -> dict[str, float | str]:
        """Live use (the ``signals`` models' interface): advance by dt, at least one step, and return the
        tag values. ``t`` is not used: the loop keeps its own clock of ts-long steps."""
        n = max(1, round(dt / self.spec.ts))
        smp = self.step()
        for _ in range(n - 1):
            smp = self.step()
        return {"pv": smp.pv, "sp": smp.sp, "op": smp.op, "mode": smp.mode}

    def run(self, n: int | None = None) -> LoopRun:
        """Run n samples (default: the scenario's duration) from the current state."""
        n = round(self.spec.duration_s / self.spec.ts) if n is None else n
        k0, auto0, hi0, lo0 = self.k, self._n_auto, self._n_hi, self._n_lo
        rows = [self.step() for _ in range(n)]
        cnt = max(1, self.k - k0)
        truth = dict(self.spec.facts)
        truth.update(
            time_in_auto=(self._n_auto - auto0) / cnt,
            time_at_op_hi=(self._n_hi - hi0) / cnt,
            time_at_op_lo=(self._n_lo - lo0) / cnt,
        )
        return LoopRun(
            t=np.array([r.t for r in rows], dtype=float),
            pv=np.array([r.pv for r in rows], dtype=float),
            sp=np.array([r.sp for r in rows], dtype=float),
            op=np.array([r.op for r in rows], dtype=float),
            mode=np.array([r.mode for r in rows] + [None], dtype=object)[:-1],
            valve=np.array([r.valve for r in rows], dtype=float),
            at_op_hi=np.array([r.at_op_hi for r in rows], dtype=bool),
            at_op_lo=np.array([r.at_op_lo for r in rows], dtype=bool),
            ts=self.spec.ts,
            truth=truth,
        )

    def kpi_params(self) -> dict[str, Any]:
        """The loop facts a KPI configuration needs (kept free of pipeline types)."""
        s = self.spec
        return {
            "pv_lo": s.pv_lo,
            "pv_hi": s.pv_hi,
            "op_lo": s.op_lo,
            "op_hi": s.op_hi,
            "ti": s.tuning.ti,
            "dead_time": self._d * s.ts,
            "loop_type": s.process.loop_type,
            "ts": s.ts,
            "normal_modes": [AUTO],
        }


# ----------------------------------------------------------------------------------------- analysis


def closed_loop_poles(process: Fopdt, tuning: PiTuning, ts: float) -> npt.NDArray[np.complex128]:
    """Poles of the simulated linear loop (FOPDT + velocity PI, no limits, no stiction).

    Plant y_{k+1} = a·y_k + b·u_{k-d}; PI u = Kc·[(1 + Ts/Ti) - q⁻¹]/(1 - q⁻¹)·e. The characteristic
    polynomial (1 - a q⁻¹)(1 - q⁻¹) + b·Kc·q^-(d+1)·[(1 + Ts/Ti) - q⁻¹] times q^(d+2).
    """
    a = math.exp(-ts / process.tau)
    b = process.gain * (1.0 - a)
    d = max(0, round(process.dead_time / ts))
    deg = d + 2
    c = np.zeros(deg + 1)  # coefficients of q^deg … q^0
    c[0], c[1], c[2] = 1.0, -(1.0 + a), a
    c[d + 1] += b * tuning.kc * (1.0 + ts / tuning.ti)
    c[d + 2] += -b * tuning.kc
    return np.asarray(np.roots(c), dtype=np.complex128)


def dominant_period(process: Fopdt, tuning: PiTuning, ts: float) -> tuple[float, float]:
    """(period s, pole modulus) of the slowest-decaying oscillatory pole pair of the linear loop."""
    poles = closed_loop_poles(process, tuning, ts)
    osc = poles[np.abs(poles.imag) > 1e-9]
    if osc.size == 0:
        return math.nan, math.nan
    p = osc[np.argmax(np.abs(osc))]
    return 2.0 * math.pi * ts / abs(math.atan2(p.imag, p.real)), float(abs(p))


# ---------------------------------------------------------------------------------------- scenarios

_PLANT = Fopdt(gain=1.0, tau=20.0, dead_time=4.0)
_SIMC = PiTuning(kc=2.5, ti=20.0)  # SIMC with τc = θ: Kc = τ/(K(τc + θ)), Ti = min(τ, 4(τc + θ))
_FAST_PLANT = Fopdt(gain=1.0, tau=10.0, dead_time=2.0)


def _well_tuned(seed: int) -> ScenarioSpec:
    return ScenarioSpec(
        name="well_tuned",
        process=_PLANT,
        tuning=_SIMC,
        disturbances=(RandomWalk(0.05, "input"),),
        noise_sigma=0.2,
        seed=seed,
        description="SIMC-tuned PI on a lag-dominant FOPDT, random-walk load and measurement noise",
        facts={"oscillating": False, "stiction": False},
    )


def _aggressive(seed: int) -> ScenarioSpec:
    tuning = PiTuning(kc=6.5, ti=20.0)  # close to the ultimate gain (≈ 6.8): poles at |p| ≈ 0.993 per sample
    period, modulus = dominant_period(_PLANT, tuning, 1.0)
    return ScenarioSpec(
        name="aggressive",
        process=_PLANT,
        tuning=tuning,
        disturbances=(RandomWalk(0.05, "input"),),
        noise_sigma=0.05,
        seed=seed,
        description="over-tuned PI: lightly damped closed loop that rings at its dominant pole frequency",
        facts={
            "oscillating": True,
            "stiction": False,
            "oscillation_period_s": period,
            "pole_modulus": modulus,
        },
    )


def _sticky_valve(seed: int) -> ScenarioSpec:
    return ScenarioSpec(
        name="sticky_valve",
        process=_FAST_PLANT,
        tuning=PiTuning(kc=0.3, ti=10.0),
        valve=HeStiction(fs=3.0, fd=0.0),
        # A small constant load: the stuck valve cannot sit at the position it needs, so the PI hunts.
        disturbances=(Step(at_s=0.0, size=1.0, where="input"),),
        noise_sigma=0.05,
        seed=seed,
        description="loop KPIs §5a: K=1, τ=10 s, 2-sample delay, PI Kc=0.3 Ti=10 s, He model fs=3 %, fd=0",
        facts={"oscillating": True, "stiction": True},
    )


def _saturated(seed: int) -> ScenarioSpec:
    return ScenarioSpec(
        name="saturated",
        process=_PLANT,
        tuning=_SIMC,
        disturbances=(
            Step(at_s=1800.0, size=-60.0, until_s=4000.0, where="input"),
            RandomWalk(0.02, "input"),
        ),
        noise_sigma=0.05,
        seed=seed,
        description="a load needing OP = 110 % for a while: the PI sits at its 100 % limit",
        facts={"stiction": False},
    )


def _mostly_manual(seed: int) -> ScenarioSpec:
    return ScenarioSpec(
        name="mostly_manual",
        process=_PLANT,
        tuning=_SIMC,
        disturbances=(RandomWalk(0.05, "input"),),
        noise_sigma=0.2,
        mode_schedule=((0.0, AUTO), (1200.0, MAN), (4200.0, AUTO), (4800.0, MAN)),
        seed=seed,
        description="in AUTO 0-20 min and 70-80 min of two hours: 25 % of the time",
        facts={"stiction": False},
    )


def _external(seed: int) -> ScenarioSpec:
    return ScenarioSpec(
        name="external_disturbance",
        process=_FAST_PLANT,
        tuning=PiTuning(kc=0.3, ti=10.0),
        disturbances=(Sinusoid(2.0, 120.0, where="output"),),
        noise_sigma=0.05,
        seed=seed,
        description="slow PI rejecting an external 120 s sinusoid at the process output",
        facts={"oscillating": True, "stiction": False, "oscillation_period_s": 120.0},
    )


SCENARIOS = {
    "well_tuned": _well_tuned,
    "aggressive": _aggressive,
    "sticky_valve": _sticky_valve,
    "saturated": _saturated,
    "mostly_manual": _mostly_manual,
    "external_disturbance": _external,
}


def scenario(name: str, seed: int = 0) -> LoopSimulator:
    """A fresh simulator for a named scenario."""
    try:
        return LoopSimulator(SCENARIOS[name](seed))
    except KeyError:
        raise ValueError(f"unknown loop scenario {name!r}; known: {', '.join(SCENARIOS)}") from None

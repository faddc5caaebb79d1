"""An independent reference for the loop KPI stream, and checks of the reference itself.

:func:`reference_kpis` computes every window's KPIs from all samples at once, the way an offline analysis
would: each window and its horizon are aligned directly over their time range with ``pipeline.kpi.align``
(no ring buffer, no carried last values, no state records), PV/SP/OP rounded as the stream stores them
(float32 offsets from the range's low end), and ``compute_all`` called window after window with its state.
The stream (pipeline/stages/loops/engine.py) must give the same records whatever its batching, replays and
restarts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import orjson
import pytest

from connectors.sim.loops import scenario
from pipeline.kpi import LoopWindow, align, compute_all
from pipeline.stages.loops.engine import TAGS, LoopDef

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def _grid(
    d: LoopDef, by_tag: dict[str, list[tuple[float, Any, bool]]], t0: int, t1: int, window: bool
) -> LoopWindow:
    w = align(by_tag, float(t0), float(t1), float(d.ts_ms))

    def f32(x: np.ndarray, lo: float) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.asarray(x - lo, dtype=np.float32).astype(np.float64) + lo

    if "mode" in d.series:
        mode = np.array(
            [None if m is None else d.mode_names.get(float(m), f"{float(m):g}") for m in w.mode.tolist()],
            dtype=object,
        )
    else:
        mode = np.full(w.n, d.default_mode, dtype=object)
    return LoopWindow(
        w.t / 1000.0,
        f32(w.pv, d.pv_lo),
        f32(w.sp, d.pv_lo),
        f32(w.op, d.op_lo),
        mode,
        w.valid,
        d.ts_ms / 1000.0,
        w.stale_tags if window else (),
    )


def reference_kpis(d: LoopDef, samples: Iterable[Sequence[Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    """window start -> KPI results, for every window that has samples. ``samples``: (tag, ts, value, good)."""
    rows = [tuple(s) for s in samples]
    by_tag: dict[str, list[tuple[float, Any, bool]]] = {t: [] for t in TAGS}
    for tag, ts, v, g in rows:
        by_tag[TAGS[tag]].append((float(ts), v, bool(g)))
    if "mode" not in d.series:
        by_tag["mode"] = [(t, 0.0, True) for t, _, _ in by_tag["pv"]]
    w_ms, cap = d.window_ms, d.capacity * d.ts_ms
    starts = sorted({ts - ts % w_ms for _, ts, _, _ in rows})
    out: dict[int, dict[str, dict[str, Any]]] = {}
    state: Any = None
    for ws in starts:
        we = ws + w_ms
        window = _grid(d, by_tag, ws, we, True)
        horizon = _grid(d, by_tag, max(starts[0], we - cap), we, False)
        res, state = compute_all(window, horizon, d.cfg, state)
        state = orjson.loads(orjson.dumps(state))
        out[ws] = orjson.loads(orjson.dumps(res))
    return out


def differences(
    actual: dict[int, dict[str, Any]],
    expected: dict[int, dict[str, Any]],
    fields: tuple[str, ...] = ("value", "status", "coverage", "horizon_s", "reason", "extras"),
) -> list[str]:
    """Every (window, kpi, field) where the two differ, as readable lines."""
    out = []
    for ws in sorted(set(actual) | set(expected)):
        if ws not in actual or ws not in expected:
            out.append(f"window {ws}: {'missing' if ws not in actual else 'unexpected'}")
            continue
        a, e = actual[ws], expected[ws]
        for k in sorted(set(a) | set(e)):
            if k not in a or k not in e:
                out.append(f"window {ws} {k}: {'missing' if k not in a else 'unexpected'}")
                continue
            for f in fields:
                if a[k].get(f) != e[k].get(f):
                    out.append(f"window {ws} {k}.{f}: {a[k].get(f)!r} != {e[k].get(f)!r}")
    return out


def scenario_samples(
    name: str, n: int, seed: int = 0, t0: int = T0, offset: int = 0, codes: dict[str, float] | None = None
) -> tuple[list[list[Any]], Any]:
    """Samples [tag, ts, value, good] of a simulated loop, one per tag per second, and the run's truth."""
    codes = codes or {"MAN": 0.0, "AUTO": 1.0}
    sim = scenario(name, seed)
    for _ in range(offset):
        sim.step()
    out: list[list[Any]] = []
    steps = []
    for k in range(n):
        s = sim.step()
        steps.append(s)
        ts = t0 + k * 1000
        out += [[0, ts, s.pv, 1], [1, ts, s.sp, 1], [2, ts, s.op, 1], [3, ts, codes[s.mode], 1]]
    return out, steps


def test_reference_matches_compute_all_on_one_window():
    # One window covering the run, horizon = window: the reference is compute_all on the float32 data.
    from pipeline.topology import validate_data

    topo = validate_data(
        {
            "name": "r",
            "loops": [
                {
                    "id": "L",
                    "pv": "s/d/pv",
                    "sp": "s/d/sp",
                    "op": "s/d/op",
                    "mode": "s/d/m",
                    "pv_lo": 0,
                    "pv_hi": 100,
                    "ti": 10,
                    "ts": 1,
                    "window": "30m",
                    "horizon": "30m",
                }
            ],
        }
    )
    d = LoopDef.from_topology(topo.loops[0])
    samples, steps = scenario_samples("external_disturbance", 1800)
    ref = reference_kpis(d, samples)
    assert list(ref) == [T0]
    pv = np.array([s.pv for s in steps])
    w = LoopWindow(
        T0 / 1000 + np.arange(1800.0),
        pv.astype(np.float32).astype(float),
        np.array([s.sp for s in steps]).astype(np.float32).astype(float),
        np.array([s.op for s in steps]).astype(np.float32).astype(float),
        np.array([s.mode for s in steps], dtype=object),
        np.ones(1800, dtype=bool),
        1.0,
    )
    direct, _ = compute_all(w, w, d.cfg, None)
    assert ref[T0]["osc_period"]["value"] == pytest.approx(direct["osc_period"]["value"], rel=1e-12)
    assert ref[T0]["osc_period"]["value"] == pytest.approx(120.0, rel=0.05)
    assert ref[T0]["service_factor"]["value"] == 100.0

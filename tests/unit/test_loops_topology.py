"""The topology's loops section and loop simulations: validation messages, and the MQTT messages published."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from connectors.mqtt.parse import Route, parse_message, topic_matches
from connectors.sim.config import LOOP_SCENARIOS
from connectors.sim.loop_publisher import loop_steps, mqtt_target, simulated_loops
from connectors.sim.loops import SCENARIOS
from pipeline import topology as t

ROOT = Path(__file__).resolve().parents[2]
LOOP: dict[str, Any] = {
    "id": "TIC-1",
    "pv": "u1/tic1/pv",
    "sp": "u1/tic1/sp",
    "op": "u1/tic1/op",
    "mode": "u1/tic1/mode",
    "pv_lo": 0,
    "pv_hi": 100,
    "ti": "20s",
    "ts": "1s",
}
SOURCE: dict[str, Any] = {
    "id": "m",
    "type": "mqtt",
    "topics": [
        {"filter": "plant/+/+/+", "template": "plant/{site}/{device}/{point}"},
        {"filter": "obj/+/+", "template": "obj/{site}/{device}"},
    ],
}


def topo(loops: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "name": "x",
        "sources": [copy.deepcopy(SOURCE)],
        "loops": loops if loops is not None else [dict(LOOP)],
        **extra,
    }


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(t.TopologyError) as e:
        t.validate_data(data)
    return e.value.problems


def test_a_minimal_loop_and_its_defaults():
    lp = t.validate_data(topo()).loops[0]
    assert lp.window == 900_000 and lp.grace == 10_000 and lp.horizon_ms == 4_096_000
    assert lp.mode_codes == {"MAN": 0, "AUTO": 1, "CAS": 2} and lp.normal_modes == ["AUTO", "CAS"]
    cfg = lp.kpi_config()
    assert cfg.ti == 20.0 and cfg.ts == 1.0 and cfg.dead_time is None and cfg.span == 100.0
    assert t.validate_data(topo()).loop_kpi_topic == "loops.kpi"
    assert t.validate_data(topo(prefix="acme.")).loop_samples_topic == "acme.loops.samples"


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        ({"pv": "u1/pv"}, "loops[0].pv", "site/device/point"),
        ({"sp": " u1/tic1/sp"}, "loops[0].sp", "site/device/point"),
        ({"pv_hi": -1}, "loops[0].pv_hi", "greater than pv_lo"),
        ({"op_lo": 100}, "loops[0].op_hi", "greater than op_lo"),
        ({"window": "90500ms"}, "loops[0].window", "multiple of ts (1s)"),
        ({"window": "5s"}, "loops[0].window", "at least 10·ts"),
        ({"horizon": "10m", "window": "15m"}, "loops[0].horizon", "at least the window (15m)"),
        ({"horizon": "6h"}, "loops[0].horizon", "at most 16384s"),
        ({"window": "6h"}, "loops[0].window", "more than the 16384"),
        ({"ts": "5ms"}, "loops[0].ts", "between 10ms and 1h"),
        ({"ti": 0}, "loops[0].ti", "between 1ms and 24h"),
        ({"ti": "soon"}, "loops[0].ti", "a duration"),
        ({"normal_modes": ["AUTOMATIC"]}, "loops[0].normal_modes", "not in mode_codes (MAN, AUTO, CAS)"),
        ({"mode_codes": {"MAN": 0, "AUTO": 0}}, "loops[0].mode_codes", "same code 0"),
        ({"op": "u1/tic1/pv"}, "loops[0]", "pv and op are the same series"),
        ({"loop_type": "level"}, "loops[0].loop_type", "self_regulating"),
        ({"idle_timeout": "1s", "ts": "1s"}, "loops[0].idle_timeout", "longer than two samples"),
        ({"hold": {"sp": "500ms"}}, "loops[0].hold", "shorter than one sample"),
        ({"hold": {"xx": "1h"}}, "loops[0].hold.xx", "unknown key; allowed: pv, sp, op, mode"),
        ({"hold": {"sp": "48h"}}, "loops[0].hold.sp", "between 1ms and 24h"),
        ({"window": "15m", "ts": "7s"}, "loops[0].window", "multiple of ts (7s)"),
        ({"pv_lo": float("nan")}, "loops[0].pv_lo", "finite"),
        ({"colour": "red"}, "loops[0].colour", "unknown key; allowed: id, pv, sp"),
        (
            {"thresholds": {"hagglund": {"n_limit": 5}}},
            "loops[0].thresholds.hagglund",
            "unknown parameter 'n_limit'; allowed: load_amplitude_pct",
        ),
        (
            {"thresholds": {"hagglund": {"n_lim": "ten"}}},
            "loops[0].thresholds.hagglund",
            "n_lim: expected a number",
        ),
        (
            {"thresholds": {"harris": {"method": "magic"}}},
            "loops[0].thresholds.harris",
            "one of ar, dh, fcor",
        ),
        ({"thresholds": {"acf": {"min_samples": 2.5}}}, "loops[0].thresholds.acf", "a whole number"),
        (
            {"thresholds": {"oscillation": {}}},
            "loops[0].thresholds.oscillation",
            "unknown key; allowed: gate",
        ),
    ],
)
def test_every_loop_problem_names_its_path_and_the_fix(change, path, words):
    found = problems(topo([{**LOOP, **change}]))
    assert any(p.startswith(f"{path}:") and words in p for p in found), found


def test_all_problems_at_once_and_unique_ids():
    found = problems(topo([{**LOOP, "pv": "x", "ts": "1ms"}, {**LOOP, "pv_hi": -5}]))
    assert {p.split(":")[0] for p in found} >= {"loops[0].pv", "loops[0].ts", "loops[1].pv_hi"}
    found = problems(topo([dict(LOOP), dict(LOOP)]))
    assert any("loop ids must be unique; repeated: TIC-1" in p for p in found)


def test_thresholds_reach_the_kpi_config():
    lp = t.validate_data(
        topo([{**LOOP, "thresholds": {"hagglund": {"n_lim": 5}, "step": {"step_modes": ["AUTO", "CAS"]}}}])
    ).loops[0]
    cfg = lp.kpi_config()
    assert cfg.hagglund.n_lim == 5 and cfg.step.step_modes == frozenset({"AUTO", "CAS"})


def sim(loops: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    return {"source": "m", "scenarios": [], "loops": loops, **over}


@pytest.mark.parametrize(
    ("simulate", "loops", "words"),
    [
        (
            sim([{"loop": "TIC-9", "scenario": "well_tuned"}]),
            None,
            "simulate.loops[0].loop: 'TIC-9' is not a loop id",
        ),
        (sim([{"loop": "TIC-1", "scenario": "wobbly"}]), None, "simulate.loops[0].scenario"),
        (
            sim([{"loop": "TIC-1", "scenario": "aggressive"}]),
            [{**LOOP, "ts": "2s", "window": "16m"}],
            "simulate.loops[0]: scenario aggressive samples every 1s but loop 'TIC-1' has ts 2000ms; "
            "set the loop's ts to 1s",
        ),
        (
            sim([{"loop": "TIC-1", "scenario": "aggressive"}]),
            [{**LOOP, "mode_codes": {"AUTO": 1, "CAS": 2}}],
            "mode_codes need MAN",
        ),
        (
            sim([{"loop": "TIC-1", "scenario": "aggressive"}]),
            [{**LOOP, "pv": "u1/tic1/a/b"}],
            "has no topic among source 'm'",
        ),
    ],
)
def test_loop_simulation_problems(simulate, loops, words):
    data = topo(loops, simulate=simulate)
    data["sources"][0]["topics"] = data["sources"][0]["topics"][:1]  # point per topic only
    found = problems(data)
    assert any(words in p for p in found), found


def test_scenario_names_in_the_topology_are_the_simulators():
    assert set(LOOP_SCENARIOS) == set(SCENARIOS)
    assert set(t.SimLoop.model_json_schema()["properties"]["scenario"]["enum"]) == set(SCENARIOS)


def test_shipped_loops_topology():
    tp = t.load(ROOT / "topologies" / "loops.yaml", env={})
    assert len(tp.loops) == 6 and tp.simulate is not None and len(tp.simulate.loops) == 6
    assert {s.scenario for s in tp.simulate.loops} == set(SCENARIOS)
    assert "kpi_results" in tp.sinks[0].topics
    data = yaml.safe_load((ROOT / "topologies" / "loops.yaml").read_text())
    assert data["loops"][0]["window"] == "15m"


# -- the published messages --------------------------------------------------------------------------


def connector_readings(source: Any, topic: str, payload: bytes) -> list[tuple[str, int, float]]:
    """What the MQTT connector makes of one message (its routing and parsing code)."""
    routes = [(m.filter, Route.compile(m)) for m in source.topics]
    route = next(r for f, r in routes if topic_matches(f, topic))
    ids = route.match(topic)
    assert ids is not None
    parsed = parse_message(route, ids, payload, 0)
    assert parsed.rejected == []
    return [(f"{parsed.site}/{parsed.device}/{r['point']}", r["ts"], r["value"]) for r in parsed.readings]


@pytest.mark.parametrize(("prefix", "messages_per_step"), [("plant", 4), ("obj", 1)])
def test_published_messages_become_exactly_the_loop_readings(prefix, messages_per_step):
    loops = [
        {**LOOP, "id": "A"},
        {**LOOP, "id": "B", **{k: f"u2/fic2/{k}" for k in ("pv", "sp", "op", "mode")}},
    ]
    if prefix == "obj":
        src = copy.deepcopy(SOURCE)
        src["topics"] = src["topics"][::-1]
        data = topo(
            loops,
            simulate=sim(
                [
                    {"loop": "A", "scenario": "mostly_manual", "offset": "1195s"},
                    {"loop": "B", "scenario": "sticky_valve", "seed": 3},
                ]
            ),
        )
        data["sources"] = [src]
    else:
        data = topo(
            loops,
            simulate=sim(
                [
                    {"loop": "A", "scenario": "mostly_manual", "offset": "1195s"},
                    {"loop": "B", "scenario": "sticky_valve", "seed": 3},
                ]
            ),
        )
    tp = t.validate_data(data)
    source = tp.source("m")
    assert mqtt_target(source, "u1/tic1/pv") == (
        ("plant/u1/tic1/pv", None) if prefix == "plant" else ("obj/u1/tic1", "pv")
    )
    t0 = 1_767_225_600_000
    steps = list(loop_steps(simulated_loops(tp, t0), until_ms=t0 + 20_000))
    assert len(steps) == 40 and [s.ts for s in steps[:4]] == [t0, t0, t0 + 1000, t0 + 1000]
    assert [s.loop for s in steps[:2]] == ["A", "B"]
    for step in steps:
        assert len(step.messages) == messages_per_step
        got = sorted(
            r for topic, payload in step.messages for r in connector_readings(source, topic, payload)
        )
        assert got == sorted(step.readings)
    modes = [s.readings[3][2] for s in steps if s.loop == "A"]
    assert modes[:5] == [1.0] * 5 and set(modes[5:]) == {0.0}  # MAN from 1200 s: the offset is 1195 s
    again = list(loop_steps(simulated_loops(tp, t0), until_ms=t0 + 20_000))
    assert [s.messages for s in again] == [s.messages for s in steps]  # deterministic for a seed

"""The alarm state machine on hand-written scenarios: each test states the transition log it expects."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from pipeline.stages.alerts.config import AlertRule
from pipeline.stages.alerts.engine import Engine, Instance

T0 = 1_767_225_600_000
S = 1000


def rule(**kw: Any) -> AlertRule:
    base: dict[str, Any] = {"id": "r", "match": "*/*/*", "levels": [{"severity": "high", "above": 80}]}
    return AlertRule.model_validate({**base, **kw})


def run(engine: Engine, r: AlertRule, values: list[tuple[int, float]], source: str = "s/d/p") -> list[tuple]:
    out = []
    for ts, v in values:
        out += engine.sample(r, source, ts, v)
    return [(e["ts"], e["transition"], e["state"], e["severity"]) for e in out]


def test_a_value_oscillating_inside_the_deadband_gives_no_transitions():
    r = rule(deadband=2.0)
    e = Engine([r])
    wobble = [81.0, 79.0, 81.5, 78.5, 80.5, 78.1, 81.9, 79.3]
    log = run(e, r, [(T0 + i * S, v) for i, v in enumerate(wobble)])
    assert log == [(T0, "raise", "unack", "high")]
    assert run(e, r, [(T0 + 10 * S, 77.9)]) == [(T0 + 10 * S, "clear", "rtn_unack", None)]
    # Below the limit all along, wobbling under it: nothing.
    assert run(Engine([r]), r, [(T0 + i * S, 79.9 - (i % 2)) for i in range(20)]) == []


def test_on_delay_filters_a_spike_shorter_than_the_delay_and_off_delay_holds_the_return():
    r = rule(on_delay="30s", off_delay="10s")
    e = Engine([r])
    spike = [70, 70, 85, 85, 85, 70, 70]  # 15 s above, every 5 s
    assert run(e, r, [(T0 + i * 5 * S, v) for i, v in enumerate(spike)]) == []
    t1 = T0 + 100 * S
    sustained = [(t1 + i * 5 * S, 85.0) for i in range(8)]  # 35 s above
    assert run(e, r, sustained) == [(t1 + 30 * S, "raise", "unack", "high")]
    t2 = t1 + 60 * S
    back = [(t2, 70.0), (t2 + 5 * S, 85.0), (t2 + 10 * S, 70.0), (t2 + 15 * S, 70.0), (t2 + 20 * S, 70.0)]
    # The first dip lasts 5 s (held by the off-delay); the second 10 s: the return.
    assert run(e, r, back) == [(t2 + 20 * S, "clear", "rtn_unack", None)]


def test_a_multi_level_threshold_raises_and_lowers_severity():
    r = rule(levels=[{"severity": "high", "above": 80}, {"severity": "critical", "above": 90}], deadband=1.0)
    e = Engine([r])
    values = [70, 85, 95, 89.5, 88, 79.5, 78]
    assert run(e, r, [(T0 + i * S, v) for i, v in enumerate(values)]) == [
        (T0 + 1 * S, "raise", "unack", "high"),
        (T0 + 2 * S, "escalate", "unack", "critical"),
        (T0 + 4 * S, "deescalate", "unack", "high"),  # 89.5 is inside critical's deadband
        (T0 + 6 * S, "clear", "rtn_unack", None),
    ]


def test_an_escalation_of_an_acknowledged_alarm_needs_a_new_ack():
    r = rule(levels=[{"severity": "high", "above": 80}, {"severity": "critical", "above": 90}])
    e = Engine([r])
    e.sample(r, "s/d/p", T0, 85)
    ack = e.command({"id": "c1", "instance": "r/s/d/p", "action": "ack", "by": "op", "at": T0 + 5 * S})
    assert [(x["transition"], x["state"], x["by"]) for x in ack] == [("ack", "acked", "op")]
    assert run(e, r, [(T0 + 10 * S, 95)]) == [(T0 + 10 * S, "escalate", "unack", "critical")]


def test_below_and_outside_levels():
    low = rule(levels=[{"severity": "medium", "below": 10}])
    assert [x[1] for x in run(Engine([low]), low, [(T0, 12), (T0 + S, 9), (T0 + 2 * S, 11)])] == [
        "raise",
        "clear",
    ]
    dev = rule(kind="deviation", reference=50.0, levels=[{"severity": "low", "outside": 5}])
    log = run(Engine([dev]), dev, [(T0, 52), (T0 + S, 44), (T0 + 2 * S, 56), (T0 + 3 * S, 50)])
    assert [x[1:] for x in log] == [("raise", "unack", "low"), ("clear", "rtn_unack", None)]


def test_rate_of_change_over_a_span():
    r = rule(kind="rate", span="1m", levels=[{"severity": "high", "above": 5}])
    e = Engine([r])
    ramp = [(T0 + i * 10 * S, 20 + i * 1.0) for i in range(12)]  # +1 per 10 s: +6 per minute
    log = run(e, r, ramp)
    assert log == [(T0 + 60 * S, "raise", "unack", "high")]  # first time the minute's change exceeds 5
    flat = [(T0 + (12 + i) * 10 * S, 31.0) for i in range(8)]
    assert [x[1] for x in run(e, r, flat)] == ["clear"]


def test_stale_fires_for_a_silent_series_and_clears_when_data_returns():
    r = rule(kind="stale", span="2m", levels=[], severity="medium")
    e = Engine([r])
    assert run(e, r, [(T0, 1.0), (T0 + 30 * S, 1.0)]) == []
    assert e.silence(r, "s/d/p", T0 + 100 * S) == []  # 70 s of silence: not yet
    ev = e.silence(r, "s/d/p", T0 + 200 * S)
    assert [(x["ts"], x["transition"], x["severity"]) for x in ev] == [(T0 + 150 * S, "raise", "medium")]
    assert e.silence(r, "s/d/p", T0 + 300 * S) == []  # raised once
    assert run(e, r, [(T0 + 310 * S, 1.0)]) == [(T0 + 310 * S, "clear", "rtn_unack", None)]


def test_quality_bad_for_longer_than_the_span():
    r = rule(kind="quality", span="30s", levels=[], severity="low")
    e = Engine([r])
    out = []
    for i, q in enumerate(["good", "bad", "bad", "good", "bad", "bad", "bad", "bad", "good"]):
        out += e.sample(r, "s/d/p", T0 + i * 15 * S, 1.0, quality=q)
    assert [(x["ts"], x["transition"]) for x in out] == [(T0 + 90 * S, "raise"), (T0 + 120 * S, "clear")]


def test_ack_shelve_expiry_unshelve():
    r = rule()
    e = Engine([r])
    key = "r/s/d/p"
    e.sample(r, "s/d/p", T0, 85)
    assert [x["state"] for x in e.command({"id": "a", "instance": key, "action": "ack", "at": T0})] == [
        "acked"
    ]
    assert e.command({"id": "a", "instance": key, "action": "ack", "at": T0}) == []  # the same command again
    assert [x[1:3] for x in run(e, r, [(T0 + S, 70)])] == [("clear", "normal")]
    shelve = {"id": "b", "instance": key, "action": "shelve", "duration_ms": 60_000, "at": T0 + 2 * S}
    assert e.command(shelve)[0]["shelved_until"] == T0 + 62 * S
    raised = e.sample(r, "s/d/p", T0 + 3 * S, 85)
    assert [(x["transition"], x["notify"]) for x in raised] == [("raise", False)]  # recorded, not annunciated
    assert e.expire_shelves(T0 + 61 * S) == []
    expired = e.expire_shelves(T0 + 62 * S)
    assert [(x["transition"], x["by"], x["state"], x["notify"]) for x in expired] == [
        ("unshelve", "expiry", "unack", True)
    ]
    e.command({"id": "c", "instance": key, "action": "shelve", "duration_ms": 600_000, "at": T0 + 70 * S})
    assert [
        x["shelved_until"] for x in e.command({"id": "d", "instance": key, "action": "unshelve", "at": 0})
    ] == [None]
    assert e.expire_shelves(T0 + 700 * S) == []


def test_suppress_and_out_of_service_record_without_notifying():
    r = rule()
    e = Engine([r])
    e.sample(r, "s/d/p", T0, 70)
    e.command(
        {
            "id": "1",
            "instance": "r/s/d/p",
            "action": "suppress",
            "by": "eng",
            "comment": "by design",
            "at": T0,
        }
    )
    ev = e.sample(r, "s/d/p", T0 + S, 85)
    assert [(x["transition"], x["suppressed"], x["notify"]) for x in ev] == [("raise", True, False)]
    rel = e.command({"id": "2", "instance": "r/s/d/p", "action": "release", "at": T0})
    assert rel[0]["suppressed"] is False and rel[0]["notify"] is True
    e.command({"id": "3", "instance": "r/s/d/p", "action": "disable", "at": T0})
    assert [x["notify"] for x in e.sample(r, "s/d/p", T0 + 2 * S, 70)] == [False]


def test_chattering_marks_and_releases():
    r = rule(chatter={"activations": 3, "within": "10m"})
    e = Engine([r])
    out = []
    for i in range(4):  # raise and clear every minute
        out += e.sample(r, "s/d/p", T0 + i * 60 * S, 85)
        out += e.sample(r, "s/d/p", T0 + i * 60 * S + 30 * S, 70)
    log = [(x["transition"], x["notify"]) for x in out]
    assert log == [
        ("raise", True),
        ("clear", True),
        ("raise", True),
        ("clear", True),
        ("raise", True),
        ("chatter", True),
        ("clear", False),
        ("raise", False),
        ("clear", False),
    ]
    # Quiet for the chatter period since the last raise (T0 + 3 min): it settles at that moment, on the
    # device's clock when no sample of its own comes (the routing sends the clock), or on its next sample.
    assert e.clock("r/s/d/p", T0 + 13 * 60 * S - 1) == []
    ticked = e.clock("r/s/d/p", T0 + 14 * 60 * S)
    assert [(x["ts"], x["transition"], x["chattering"], x["state"], x["value"]) for x in ticked] == [
        (T0 + 13 * 60 * S, "settle", False, "rtn_unack", None)
    ]
    assert e.sample(r, "s/d/p", T0 + 15 * 60 * S, 70) == []

    again = Engine([r])
    for i in range(4):
        again.sample(r, "s/d/p", T0 + i * 60 * S, 85)
        again.sample(r, "s/d/p", T0 + i * 60 * S + 30 * S, 70)
    settled = again.sample(r, "s/d/p", T0 + 14 * 60 * S, 70)
    assert [(x["ts"], x["transition"], x["state"]) for x in settled] == [
        (T0 + 13 * 60 * S, "settle", "rtn_unack")
    ]


def test_realarm_while_active():
    r = rule(realarm="5m")
    e = Engine([r])
    log = run(e, r, [(T0 + i * 60 * S, 85.0) for i in range(11)])
    assert [x[:2] for x in log] == [(T0, "raise"), (T0 + 300 * S, "realarm"), (T0 + 600 * S, "realarm")]


def test_late_samples_change_nothing_and_messages_fill_placeholders():
    r = rule(message="{series} at {value} {unit} over {limit} ({severity})")
    e = Engine([r])
    ev = e.sample(r, "s/d/p", T0, 85.5, unit="degC")
    assert ev[0]["message"] == "s/d/p at 85.5 degC over 80 (high)"
    assert e.sample(r, "s/d/p", T0 - S, 10.0) == []


def scenario(seed: int) -> list[tuple[int, str, float]]:
    rng = random.Random(seed)
    out = []
    v = 75.0
    for i in range(400):
        v += rng.gauss(0, 2)
        out.append((T0 + i * 5 * S, ["s/d/a", "s/d/b"][i % 2], v))
    return out


RULES = [
    rule(
        id="hi",
        levels=[{"severity": "high", "above": 80}, {"severity": "critical", "above": 88}],
        deadband=1.0,
        on_delay="10s",
        off_delay="10s",
        chatter={"activations": 4, "within": "5m"},
    ),
    rule(id="roc", kind="rate", span="30s", levels=[{"severity": "low", "outside": 4}]),
]


def feed(engine: Engine, inputs: list[tuple[int, str, float]]) -> list[dict[str, Any]]:
    out = []
    for ts, src, v in inputs:
        for r in RULES:
            out += engine.sample(r, src, ts, v)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_replay_gives_identical_events_and_a_restore_resumes_exactly(seed):
    inputs = scenario(seed)
    once = feed(Engine(RULES), inputs)
    assert len(once) > 5
    assert feed(Engine(RULES), inputs) == once
    assert len({x["id"] for x in once}) == len(once)
    cut = len(inputs) // 3
    first = Engine(RULES)
    before = feed(first, inputs[:cut])
    restored = Engine(RULES)
    restored.instances = {k: Instance.from_dict(v.to_dict()) for k, v in first.instances.items()}
    assert before + feed(restored, inputs[cut:]) == once


def test_events_and_commands_match_their_schemas():
    import json
    from pathlib import Path

    import jsonschema

    from pipeline.stages.alerts.stage import check_command

    schemas = Path(__file__).resolve().parents[2] / "schemas"
    event_schema = json.loads((schemas / "alert-event.json").read_text())
    command_schema = json.loads((schemas / "alert-command.json").read_text())
    events = feed(Engine(RULES), scenario(4))
    e = Engine([rule(realarm="1m", message="{nope}")])
    r = e.rules["r"]
    events += e.sample(r, "s/d/p", T0, 85, unit="kW") + e.sample(r, "s/d/p", T0 + 120 * S, 86)
    cmd = {"id": "x", "instance": "r/s/d/p", "action": "shelve", "by": "op", "at": T0, "duration_ms": 5000}
    jsonschema.validate(cmd, command_schema)
    assert check_command(cmd) == cmd
    events += e.command({**cmd, "comment": "maintenance"}) + e.expire_shelves(T0 + 5000)
    assert {x["transition"] for x in events} >= {"raise", "clear", "realarm", "shelve", "unshelve"}
    for ev in events:
        jsonschema.validate(ev, event_schema)
    for bad in (
        {**cmd, "action": "mute"},
        {**cmd, "duration_ms": 0},
        {**cmd, "at": "now"},
        {**cmd, "by": ""},
    ):
        with pytest.raises(ValueError):
            check_command(bad)


def test_the_topology_names_a_bad_rule_and_the_fix():
    from pipeline.topology import TopologyError, validate_data

    def problems(rule_: dict[str, Any]) -> str:
        with pytest.raises(TopologyError) as e:
            validate_data({"name": "t", "alerts": {"rules": [rule_]}})
        return "\n".join(e.value.problems)

    p = problems({"id": "a", "match": "s/d/p"})
    assert "alerts.rules[0]" in p and "kind threshold needs levels" in p
    assert "match is a pattern site/device/point" in problems(
        {"id": "a", "match": "ahu*", "levels": [{"severity": "high", "above": 1}]}
    )
    assert "needs span" in problems({"id": "a", "match": "s/d/p", "kind": "stale"})
    assert "exactly one of above, below, outside" in problems(
        {"id": "a", "match": "s/d/p", "levels": [{"severity": "high", "above": 1, "below": 0}]}
    )
    assert "rising severity" in problems(
        {
            "id": "a",
            "match": "s/d/p",
            "levels": [{"severity": "high", "above": 9}, {"severity": "low", "above": 1}],
        }
    )
    ok = validate_data(
        {
            "name": "t",
            "alerts": {"rules": [{"id": "a", "match": "s/*/p", "levels": [{"severity": "low", "below": 3}]}]},
        }
    )
    assert ok.alerts.rules[0].matches("s/x/p") and not ok.alerts.rules[0].matches("s/x/q")


@pytest.mark.parametrize("seed", range(12))
def test_routing_only_the_readings_that_matter_changes_no_transition(seed):
    """Threshold rules see only readings beyond their loosest limit and those around them (Watch), and the
    device's clock; the transitions must be those of every reading, field for field, also for a routing that
    starts over (a worker restart) while the alarm is mid-way."""
    from pipeline.stages.alerts.routing import AlertRouting

    rng = random.Random(seed)
    levels = sorted(rng.sample(range(60, 95), 2))
    r = rule(
        levels=[{"severity": "high", "above": levels[0]}, {"severity": "critical", "above": levels[1]}],
        deadband=rng.choice([0.0, 0.5, 2.0]),
        on_delay=rng.choice(["0s", "3s", "20s"]),
        off_delay=rng.choice(["0s", "5s", "30s"]),
        chatter={"activations": rng.choice([2, 3, 5]), "within": rng.choice(["30s", "2m"])},
        realarm=rng.choice([None, "1m"]),
    )
    samples = []
    t, v = T0, 50.0
    for _ in range(3000):
        t += rng.choice([1000, 1000, 1000, 7000, 45000])
        v = v + 0.05 * (levels[0] - 8 - v) + rng.gauss(0, 3) + (25 if rng.random() < 0.01 else 0)
        samples.append((t, round(v, 2), "bad" if rng.random() < 0.05 else "good"))
    every = Engine([r])
    want = [e for ts, x, q in samples for e in every.sample(r, "s/d/p", ts, x, q)]
    restarts = set(rng.sample(range(len(samples)), 3))
    routing = AlertRouting("alerts.samples", [r])
    sent: list[dict[str, Any]] = []
    some = Engine([r])
    got: list[dict[str, Any]] = []
    routed = 0
    for i, (ts, x, q) in enumerate(samples):
        if i in restarts:
            routing = AlertRouting("alerts.samples", [r])  # knows nothing of the alarm
        batch = {"site": "s", "device": "d", "readings": [{"point": "p", "ts": ts, "value": x, "quality": q}]}
        routing.readings(lambda topic, key, value, ts: sent.append(json.loads(value)), batch)
        while sent:  # what the alerts stage does with a message: its samples, then the device's clock
            body = sent.pop(0)
            routed += len(body["s"])
            for point, ts_, value, quality, _unit in body["s"]:
                got += some.sample(r, f"s/d/{point}", ts_, value, quality)
            got += some.clock("r/s/d/p", body["t"])
    assert len(want) > 5
    assert got == want
    assert routed < len(samples)


def test_a_quiet_series_sends_its_clock_once_a_second_and_no_readings():
    """After a start (every reading of the hold, and the first after it) a series inside its limits sends
    nothing but its device's clock, once a second of event time, however often it is read."""
    from pipeline.stages.alerts.routing import AlertRouting

    r = rule(on_delay="5s", off_delay="5s", chatter={"activations": 3, "within": "10m"})
    routing = AlertRouting("alerts.samples", [r])
    sent: list[dict[str, Any]] = []
    for i in range(6000):  # 10 minutes at 10 Hz
        reading = {"point": "p", "ts": T0 + i * 100, "value": 50.0 + i % 7, "quality": "good"}
        batch = {"site": "s", "device": "d", "readings": [reading]}
        routing.readings(lambda topic, key, value, ts: sent.append(json.loads(value)), batch)
    assert sum(len(b["s"]) for b in sent) == 5 * 10 + 2  # the hold of 5 s, its first reading and the tail
    assert routing.ticks == 600 - 6  # one a second after the hold
    assert all(b["t"] == max([b["t"], *(s[1] for s in b["s"])]) for b in sent)


def test_the_rule_index_finds_what_trying_every_rule_finds():
    from pipeline.stages.alerts.config import RuleIndex

    rng = random.Random(3)
    parts = [["hq", "plant", "h*", "*"], ["ahu1", "ahu2", "ahu?", "*", "[ab]*"], ["t", "p", "t*", "*"]]
    rules = [rule(id=f"r{i}", match="/".join(rng.choice(c) for c in parts)) for i in range(300)]
    loops = [
        rule(id=f"k{i}", input="kpi", field="iae", match=rng.choice(["FIC1", "FIC2", "F*"]))
        for i in range(30)
    ]
    index, kpis = RuleIndex(rules), RuleIndex(loops)
    for site in ("hq", "plant", "h2", "x"):
        for device in ("ahu1", "ahu2", "ahu3", "boiler", "a"):
            on_device = [r for r in rules if r.matches(f"{site}/{device}/{r.match.split('/')[2]}")]
            assert index.for_device(site, device) == on_device
            for point in ("t", "p", "t2", "zz"):
                series = f"{site}/{device}/{point}"
                assert index.matching(series) == [r for r in rules if r.matches(series)]
    for loop in ("FIC1", "FIC2", "TIC1"):
        assert kpis.matching(loop) == [r for r in loops if r.matches(loop)]

"""BACnet values to readings, the BACnet source's configuration, and the write policy (no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from connectors.bacnet.commands import WritePolicy
from connectors.bacnet.config import BacnetSource
from connectors.bacnet.values import (
    flags_of,
    numeric,
    objects_per_request,
    quality_of,
    status_of,
    unit_symbol,
)
from pipeline.core.commands import InvalidCommand, make_command, parse_command, result_for
from pipeline.core.records import InvalidRecord, now_ms
from pipeline.topology import TopologyError, validate_data

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


@pytest.mark.parametrize(
    ("flags", "reliability", "quality"),
    [
        ((0, 0, 0, 0), None, "good"),
        ((0, 0, 0, 0), "no-fault-detected", "good"),
        ((1, 0, 0, 0), None, "good"),  # in alarm: the value is fine, the flag travels in status
        ((0, 1, 0, 0), None, "bad"),
        ((0, 0, 0, 1), None, "bad"),
        ((0, 0, 1, 0), None, "uncertain"),
        ((0, 1, 1, 0), None, "bad"),
        ((0, 0, 0, 0), "open-loop", "bad"),
    ],
)
def test_quality_from_status_flags_and_reliability(
    flags: tuple[int, ...], reliability: str | None, quality: str
) -> None:
    assert quality_of(flags, reliability) == quality


def test_status_is_kept_only_when_something_is_raised() -> None:
    assert status_of((0, 0, 0, 0), "no-fault-detected") is None
    assert status_of((1, 0, 0, 0), None) == {
        "status_flags": [1, 0, 0, 0],
        "flags": ["in-alarm"],
        "in_alarm": True,
    }
    assert status_of((0, 1, 0, 1), "over-range") == {
        "status_flags": [0, 1, 0, 1],
        "flags": ["fault", "out-of-service"],
        "reliability": "over-range",
    }
    assert flags_of(None) == (0, 0, 0, 0) and flags_of([1, 0]) == (1, 0, 0, 0)


def test_values_units_and_request_sizes() -> None:
    class BinaryPV:
        def __init__(self, s: str) -> None:
            self.s = s

        def __str__(self) -> str:
            return self.s

    assert numeric(21.5) == 21.5 and numeric(3) == 3.0 and numeric(True) == 1.0
    assert numeric(BinaryPV("active")) == 1.0 and numeric(BinaryPV("inactive")) == 0.0
    for bad in (None, "text", float("nan")):
        with pytest.raises(InvalidRecord):
            numeric(bad)
    assert unit_symbol("degrees-celsius") == "°C" and unit_symbol("no-units") is None
    assert unit_symbol("kilovolt-amperes") == "kilovolt-amperes"
    big, small = (
        objects_per_request(1476, ("present-value", "status-flags", "reliability")),
        objects_per_request(206, ("present-value", "status-flags", "reliability")),
    )
    assert 30 <= big <= 60 and 4 <= small <= 8 and objects_per_request(50, ("object-name",) * 5) == 1


def source(**kw: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "id": "bms",
        "type": "bacnet",
        "local_address": "127.0.0.3/24:47809",
        "site": "hq",
        "devices": [
            {
                "instance": 1001,
                "address": "127.0.0.2:47808",
                "name": "ahu1",
                "points": [
                    {"object": "analog-value,1", "name": "sat_sp", "writable": True, "min": 10, "max": 30},
                    {"object": "binary-value,1", "name": "fan", "writable": True},
                    {"object": "multi-state-value,1", "name": "mode", "writable": True},
                    {"object": "analog-input,1", "name": "sat"},
                ],
            }
        ],
    }
    s.update(kw)
    return s


def problems(src: dict[str, Any]) -> str:
    with pytest.raises(TopologyError) as e:
        validate_data({"name": "t", "sources": [src]})
    return "\n".join(e.value.problems)


def test_valid_source_and_defaults() -> None:
    topo = validate_data({"name": "t", "sources": [source(discovery={"low": 1, "high": 9})]})
    src = topo.sources[0]
    assert isinstance(src, BacnetSource)
    assert src.priority_floor == 8 and src.defaults.interval == 10_000 and src.cov.lifetime == 300_000
    assert set(src.writable_points()) == {"hq/ahu1/sat_sp", "hq/ahu1/fan", "hq/ahu1/mode"}


def test_config_mistakes_name_the_field_and_the_fix() -> None:
    text = problems(source(devices=[{"instance": 5}], local_address="somewhere"))
    assert "sources[0].local_address: expected ip/prefix:port" in text
    text = problems(source(devices=[{"instance": 5}]))
    assert "devices[0] (instance 5) has no address: give one, or add 'discovery'" in text
    text = problems(
        source(
            devices=[
                {
                    "instance": 5,
                    "address": "10.0.0.1",
                    "points": [
                        {"object": "analog-thing,1"},
                        {"object": "analog-value,2", "writable": True},
                        {"object": "analog-value,3", "name": "x", "min": 5, "max": 1},
                    ],
                }
            ]
        )
    )
    assert "points[0].object: expected <object-type>,<instance>" in text
    assert "a writable point needs a 'name'" in text and "min 5.0 is above max 1.0" in text
    text = problems(
        source(
            devices=[
                {
                    "instance": 5,
                    "address": "10.0.0.1",
                    "points": [{"object": "analog-value,2", "name": "x", "writable": True}],
                }
            ]
        )
    )
    assert "a device with writable points needs a 'name'" in text
    assert "priority_floor" in problems(source(priority_floor=0))
    assert "unknown key; allowed:" in problems(
        source(devices=[{"instance": 1, "address": "10.0.0.1", "colour": 1}])
    )


def policy() -> WritePolicy:
    return WritePolicy(validate_data({"name": "t", "sources": [source()]}))


def cmd(point: str, value: float | None, priority: int = 8, ts: int | None = None) -> Any:
    return parse_command(
        {
            "id": "c1",
            "point": point,
            "value": value,
            "priority": priority,
            "requested_by": "t",
            "ts": now_ms() if ts is None else ts,
        }
    )


def test_policy_allows_and_rejects() -> None:
    p = policy()
    now = now_ms()
    assert p.check(cmd("hq/ahu1/sat_sp", 21.0), now) is None
    assert p.check(cmd("hq/ahu1/sat_sp", None, 16), now) is None
    assert "not writable" in (p.check(cmd("hq/ahu1/sat", 1.0), now) or "")
    assert "not writable" in (p.check(cmd("hq/ahu1/nope", 1.0), now) or "")
    assert "above the point's max 30" in (p.check(cmd("hq/ahu1/sat_sp", 30.5), now) or "")
    assert "below the point's min 10" in (p.check(cmd("hq/ahu1/sat_sp", 9.0), now) or "")
    assert "priority 7 is above the priority floor 8" in (p.check(cmd("hq/ahu1/sat_sp", 20.0, 7), now) or "")
    assert "not 0 or 1" in (p.check(cmd("hq/ahu1/fan", 2.0), now) or "")
    assert p.check(cmd("hq/ahu1/fan", 0.0), now) is None
    assert "state number" in (p.check(cmd("hq/ahu1/mode", 1.5), now) or "")
    assert "expired" in (p.check(cmd("hq/ahu1/sat_sp", 20.0, ts=now - 400_000), now) or "")
    # Stamped far ahead it would never expire: refused; a clock a few seconds ahead is fine.
    assert "stamped in the future: 86400s ahead" in (
        p.check(cmd("hq/ahu1/sat_sp", 20.0, ts=now + 86_400_000), now) or ""
    )
    assert p.check(cmd("hq/ahu1/sat_sp", 20.0, ts=now + 5_000), now) is None
    assert p.owner("hq/ahu1/sat") == "bms" and p.owner("elsewhere/x/y") == "bms"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("id", "", "id must be"),
        ("point", "ahu1/sat", "series id"),
        ("value", "1", "finite number or null"),
        ("value", float("inf"), "finite"),
        ("priority", 17, "1-16"),
        ("priority", True, "1-16"),
        ("requested_by", "", "requested_by"),
        ("ts", "now", "ts must be"),
    ],
)
def test_invalid_commands_say_which_field(field: str, value: Any, message: str) -> None:
    raw = {"id": "c1", "point": "a/b/c", "value": 1.0, "priority": 8, "requested_by": "me", "ts": 1}
    raw[field] = value
    with pytest.raises(InvalidCommand, match=message) as e:
        parse_command(raw)
    assert e.value.command_id == (None if field == "id" else "c1")


def test_commands_and_results_match_their_schemas() -> None:
    wc = json.loads((SCHEMAS / "write-command.json").read_text())
    cr = json.loads((SCHEMAS / "command-result.json").read_text())
    for value in (14.5, None):
        c = make_command("hq/ahu1/sat_sp", value, 8, "operator")
        jsonschema.validate(c, wc)
        for status, error in (("accepted", None), ("rejected", "why"), ("failed", "error: device: x")):
            jsonschema.validate(result_for(c, status, error, "bms"), cr)  # type: ignore[arg-type]
    # A result for a command that was not even well-formed still fits the schema.
    jsonschema.validate(
        result_for({"id": "x", "point": 3, "priority": "high"}, "rejected", "invalid", "bms"), cr
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**make_command("a/b/c", 1.0, 8, "x"), "priority": 0}, wc)


def test_sample_config_is_valid() -> None:
    from pipeline.topology import load

    topo = load(SCHEMAS.parent / "connectors" / "bacnet" / "sample.yaml", env={})
    src = topo.sources[0]
    assert isinstance(src, BacnetSource) and src.discovery is not None
    assert set(src.writable_points()) == {"hq/ahu1/SAT-SP"}

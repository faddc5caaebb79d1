"""OPC UA data values to readings, and the OPC UA source's configuration checks (no server needed)."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import pytest

from connectors.opcua.config import OpcUaSource
from connectors.opcua.mapping import Deadband, NodeSpec, Skip, matches, quality_of, render, to_reading
from pipeline.core.records import InvalidRecord
from pipeline.topology import TopologyError, validate_data

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T0_MS = 1_767_225_600_000
GOOD, UNCERTAIN_LAST_USABLE, BAD_SENSOR = 0, 0x40900000, 0x808C0000


def spec(**kw: object) -> NodeSpec:
    return NodeSpec(node_id="ns=2;s=X", site="s", device="d", point="p", **kw)  # type: ignore[arg-type]


def test_quality_from_status_severity() -> None:
    assert quality_of(GOOD) == "good"
    assert quality_of(0x00A20000) == "good"  # GoodClamped and friends
    assert quality_of(UNCERTAIN_LAST_USABLE) == "uncertain"
    assert quality_of(BAD_SENSOR) == "bad"
    assert quality_of(0xC0000000) == "bad"


def test_reading_carries_both_timestamps_and_chooses_one() -> None:
    src, srv = T0, T0 + timedelta(milliseconds=250)
    r = to_reading(spec(), 1.5, GOOD, src, srv, "source", 0)
    assert (r["ts"], r["value"], r["quality"]) == (T0_MS, 1.5, "good")
    assert r["status"] == {"code": 0, "source_ts": T0_MS, "server_ts": T0_MS + 250}
    r = to_reading(spec(), 1.5, GOOD, src, srv, "server", 0)
    assert r["ts"] == T0_MS + 250


def test_missing_timestamp_falls_back_to_the_other_then_arrival() -> None:
    assert to_reading(spec(), 1, GOOD, None, T0, "source", 0)["ts"] == T0_MS
    assert to_reading(spec(), 1, GOOD, T0, None, "server", 0)["ts"] == T0_MS
    naive = datetime(2026, 1, 1)  # asyncua 1.x: naive UTC
    assert to_reading(spec(), 1, GOOD, naive, None, "source", 0)["ts"] == T0_MS
    assert to_reading(spec(), 1, GOOD, None, None, "source", T0_MS + 5)["ts"] == T0_MS + 5


def test_uncertain_keeps_code_and_name() -> None:
    r = to_reading(spec(unit="kW"), 2.0, UNCERTAIN_LAST_USABLE, T0, T0, "source", 0)
    assert r["quality"] == "uncertain" and r["unit"] == "kW"
    assert r["status"]["code"] == UNCERTAIN_LAST_USABLE
    assert r["status"]["name"] == "UncertainLastUsableValue"


def test_bad_without_value_holds_the_last_value_or_is_rejected() -> None:
    s = spec()
    with pytest.raises(InvalidRecord, match="BadSensorFailure"):
        to_reading(s, None, BAD_SENSOR, T0, T0, "source", 0)
    to_reading(s, 7.0, GOOD, T0, T0, "source", 0)
    r = to_reading(s, None, BAD_SENSOR, T0 + timedelta(seconds=1), T0, "source", 0)
    assert (r["value"], r["quality"], r["status"]["held"]) == (7.0, "bad", True)
    with pytest.raises(InvalidRecord):
        to_reading(spec(), None, UNCERTAIN_LAST_USABLE, T0, T0, "source", 0)


@pytest.mark.parametrize("value", ["text", [1, 2], float("nan"), float("inf")])
def test_non_numeric_values_are_invalid(value: object) -> None:
    with pytest.raises(InvalidRecord):
        to_reading(spec(), value, GOOD, T0, T0, "source", 0)


def test_booleans_become_one_and_zero() -> None:
    s = spec()
    assert to_reading(s, True, GOOD, T0, T0, "source", 0)["value"] == 1.0
    assert to_reading(s, False, GOOD, T0 + timedelta(seconds=1), T0, "source", 0)["value"] == 0.0


def test_repeated_or_older_timestamps_are_duplicates() -> None:
    s = spec()
    to_reading(s, 1.0, GOOD, T0, T0, "source", 0)
    for t in (T0, T0 - timedelta(seconds=1)):
        with pytest.raises(Skip) as e:
            to_reading(s, 2.0, GOOD, t, T0, "source", 0)
        assert e.value.why == "duplicate"
    assert to_reading(s, 2.0, GOOD, T0 + timedelta(milliseconds=1), T0, "source", 0)["value"] == 2.0


def test_absolute_deadband_compares_with_the_last_value_sent() -> None:
    s = spec(deadband=Deadband("absolute", 1.0))
    sent = []
    for i, v in enumerate([10.0, 10.4, 10.8, 11.2, 11.5, 12.3, 12.0]):
        try:
            sent.append(to_reading(s, v, GOOD, T0 + timedelta(seconds=i), T0, "source", 0)["value"])
        except Skip as e:
            assert e.why == "deadband"
    # 10.4, 10.8 within 1 of 10; 11.2 exceeds; 11.5 within 1 of 11.2; 12.3 exceeds; 12.0 within.
    assert sent == [10.0, 11.2, 12.3]


def test_percent_deadband_uses_the_eurange_span_and_quality_changes_pass() -> None:
    s = spec(deadband=Deadband("percent", 5.0, span=200.0))  # threshold 10
    sent = []
    for i, (v, code) in enumerate(
        [
            (50.0, GOOD),
            (59.0, GOOD),
            (61.0, GOOD),
            (62.0, UNCERTAIN_LAST_USABLE),
            (63.0, UNCERTAIN_LAST_USABLE),
            (75.0, UNCERTAIN_LAST_USABLE),
        ]
    ):
        with contextlib.suppress(Skip):
            sent.append(to_reading(s, v, code, T0 + timedelta(seconds=i), T0, "source", 0)["value"])
    assert sent == [50.0, 61.0, 62.0, 75.0]


def test_templates_and_globs() -> None:
    assert render("{parent}", "PV", "FIC101", "Loops/FIC101/PV") == "FIC101"
    assert render("{path}", "PV", "FIC101", "Loops/FIC101/PV") == "Loops/FIC101/PV"
    assert matches("Temperature", "Temp*", None)
    assert not matches("Temperature", "Temp*", "*ture")
    assert not matches("PV", "SP", None)


def base(**kw: object) -> dict[str, object]:
    src: dict[str, object] = {
        "id": "plant",
        "type": "opcua",
        "endpoint": "opc.tcp://127.0.0.1:4840/x",
        "site": "s1",
        "nodes": [{"node_id": "ns=2;s=A", "device": "d", "point": "p"}],
    }
    src.update(kw)
    return {"name": "t", "sources": [src]}


def problems(data: dict[str, object]) -> list[str]:
    with pytest.raises(TopologyError) as e:
        validate_data(data)
    return e.value.problems


def test_valid_source_loads_with_defaults() -> None:
    topo = validate_data(base(browse=[{"root": "nsu=urn:x;s=Plant", "include": "P?"}]))
    src = topo.sources[0]
    assert isinstance(src, OpcUaSource)
    assert src.defaults.sampling_interval == 1000 and src.timestamp == "source"
    assert src.security.policy == "None" and src.reconnect.max == 5_000


@pytest.mark.parametrize(
    "node_id",
    [
        "ns=2;s=Plant/TIC101/PV",
        "nsu=urn:plant;s=T1",
        "ns=3;i=1001",
        "i=2258",
        "ns=2;g=6f1c1d2e-3b4a-4c5d-8e9f-a0b1c2d3e4f5",
        "ns=2;b=cGxhbnQ=",
    ],
)
def test_node_id_forms_accepted(node_id: str) -> None:
    validate_data(base(nodes=[{"node_id": node_id, "device": "d", "point": "p"}]))


def test_config_mistakes_name_the_field_and_the_fix() -> None:
    out = problems(
        base(
            nodes=[{"node_id": "Plant.PV", "device": "d", "point": "p", "colour": 1}],
            endpoint="http://x",
            security={"policy": "Basic256Sha256", "mode": "Sign"},
        )
    )
    text = "\n".join(out)
    assert "sources[0].endpoint: expected opc.tcp://host:port[/path]" in text
    assert "sources[0].nodes[0].node_id: expected a NodeId" in text
    assert "sources[0].nodes[0].colour: unknown key; allowed: " in text and "node_id" in text
    assert "sources[0].security: policy Basic256Sha256 needs a client certificate and private_key" in text


def test_more_config_mistakes() -> None:
    assert any("username and password go together" in p for p in problems(base(username="u")))
    assert any(
        "percent deadband must be at most 100" in p
        for p in problems(base(defaults={"deadband": {"type": "percent", "value": 150}}))
    )
    assert any("give at least one entry in 'nodes'" in p for p in problems(base(nodes=[])))
    assert any(
        "cannot contain '/'" in p for p in problems(base(browse=[{"root": "ns=2;s=P", "device": "{path}"}]))
    )
    assert any(
        "both map to s1/d/p" in p
        for p in problems(
            base(
                nodes=[
                    {"node_id": "ns=2;s=A", "device": "d", "point": "p"},
                    {"node_id": "ns=2;s=B", "device": "d", "point": "p"},
                ]
            )
        )
    )
    assert any(
        "policy and mode go together" in p for p in problems(base(security={"policy": "Basic256Sha256"}))
    )


def test_password_is_not_printed() -> None:
    topo = validate_data(base(username="op", password="s3cret"))
    assert "s3cret" not in repr(topo) and "s3cret" not in str(topo.sources[0])


def test_sample_config_is_valid() -> None:
    from pathlib import Path

    from pipeline.topology import load

    topo = load(Path(__file__).resolve().parents[2] / "connectors" / "opcua" / "sample.yaml", env={})
    src = topo.sources[0]
    assert isinstance(src, OpcUaSource) and src.security.mode == "SignAndEncrypt" and len(src.nodes) == 2


def test_browse_root_as_node_id_or_browse_path() -> None:
    validate_data(base(browse=[{"root": "/0:Objects/2:Plant/2:Loops"}]))
    text = "\n".join(problems(base(browse=[{"root": "/Objects/Plant"}])))
    assert "sources[0].browse[0].root: a browse path is /<ns>:<name>" in text

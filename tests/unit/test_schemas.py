"""The JSON Schemas in schemas/ and the records the code produces must agree."""

import json
from pathlib import Path

import jsonschema
import pytest

from pipeline.core.records import InvalidRecord, dead_letter, validate_batch
from pipeline.stages.windows import MinuteAggregator

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
T0 = 1_767_225_600_000


def schema(name):
    return json.loads((SCHEMAS / name).read_text())


def test_schemas_are_valid_json_schema():
    for f in SCHEMAS.glob("*.json"):
        jsonschema.Draft202012Validator.check_schema(json.loads(f.read_text()))


def sample_batch():
    return {
        "v": 1,
        "source": "s",
        "site": "a",
        "device": "b",
        "readings": [
            {"point": "p", "ts": T0, "value": 1.5, "quality": "good", "unit": "kW"},
            {"point": "q.r", "ts": T0 + 1, "value": 0.0, "quality": "bad", "status": {"code": 1}},
        ],
    }


def test_reading_batch_and_reading():
    batch, bad = validate_batch(sample_batch())
    assert bad == []
    jsonschema.validate(batch, schema("reading-batch.json"))
    single, _ = validate_batch(
        {"site": "a", "device": "b", "point": "p", "ts": T0, "value": True, "quality": "good"}
    )
    r = {"site": "a", "device": "b", **single["readings"][0]}
    assert r["value"] == 1.0
    jsonschema.validate(r, schema("reading.json"))


def test_aggregate_and_latest():
    agg = MinuteAggregator(grace_ms=0)
    batch, _ = validate_batch(sample_batch())
    agg.apply(0, 0, batch)
    for latest in agg.take_latest(0):
        jsonschema.validate(latest, schema("reading.json"))
    closes = agg.due(0, flush_all=True)
    assert len(closes) == 2
    for c in closes:
        jsonschema.validate(c.aggregate, schema("aggregate.json"))


def test_loop_kpi():
    from pipeline.stages.loops.engine import LoopDef, LoopEngine, run_job
    from pipeline.topology import validate_data

    loop = {
        "id": "TIC-1",
        "pv": "a/b/pv",
        "sp": "a/b/sp",
        "op": "a/b/op",
        "mode": "a/b/mode",
        "pv_lo": 0,
        "pv_hi": 10,
        "ti": 20,
        "ts": 1,
        "window": "1m",
    }
    topo = validate_data({"name": "s", "loops": [loop]})
    engine = LoopEngine({}, {"TIC-1": LoopDef.from_topology(topo.loops[0])})
    samples = [
        [tag, T0 + k * 1000, v, 1]
        for k in range(90)
        for tag, v in ((0, 5.0 + 0.1 * (k % 7)), (1, 5.0), (2, 40.0 + k % 3), (3, 1.0 if k < 50 else 0.0))
    ]
    engine.apply("TIC-1", 0, 0, samples)
    job = engine.due("TIC-1", flush_all=True)
    assert job is not None
    records = json.loads(json.dumps(run_job(job).records))
    assert [r["closed_by"] for r in records] == ["watermark", "idle"]
    for rec in records:
        jsonschema.validate(rec, schema("loop-kpi.json"))
    assert records[0]["kpis"]["service_factor"]["value"] == pytest.approx(100 * 50 / 60)
    bad = json.loads(json.dumps(records[0]))
    bad["kpis"]["no_such_kpi"] = bad["kpis"]["iae"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema("loop-kpi.json"))


def test_dead_letter_text_and_binary():
    jsonschema.validate(dead_letter("src", "malformed: x", b"abc", topic="t"), schema("dead-letter.json"))
    dl = dead_letter("src", "malformed: x", b"\xff\x00", topic="t")
    assert dl["payload_encoding"] == "base64"
    jsonschema.validate(dl, schema("dead-letter.json"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1", None, [1], {"a": 1}])
def test_non_finite_or_non_numeric_values_are_rejected(value):
    b = sample_batch()
    b["readings"][0]["value"] = value
    batch, bad = validate_batch(b)
    assert len(batch["readings"]) == 1 and len(bad) == 1 and bad[0][1]


def test_bad_envelope_raises():
    with pytest.raises(InvalidRecord):
        validate_batch({"site": "a/b", "device": "x", "readings": []})
    with pytest.raises(InvalidRecord):
        validate_batch([1, 2])


def test_reading_batch_version_2_in_columns():
    from pipeline.core.records import validate_scan

    v2 = {
        "v": 2,
        "source": "s",
        "site": "a",
        "device": "b",
        "points": ["p", "q.r"],
        "ts": [T0, T0 + 1],
        "values": [1.5, 0.0],
        "quality": ["good", "bad"],
        "units": ["kW", None],
        "status": [None, {"code": 1}],
    }
    jsonschema.validate(v2, schema("reading-batch.json"))
    jsonschema.validate(
        {**v2, "ts": T0, "quality": None} | {"quality": ["good", "good"]}, schema("reading-batch.json")
    )
    scan, bad = validate_scan(v2)
    assert bad == [] and scan.batch() == validate_batch(sample_batch())[0]
    batch, _ = validate_batch(v2)  # what the sinks take: version 1
    jsonschema.validate(batch, schema("reading-batch.json"))


def test_connectors_write_version_2_that_reads_back_the_same():
    from pipeline.core.records import columns

    batch, _ = validate_batch(sample_batch())
    v2 = columns(batch)
    jsonschema.validate(v2, schema("reading-batch.json"))
    assert v2["v"] == 2 and v2["quality"] == ["good", "bad"] and v2["units"] == ["kW", None]
    assert validate_batch(v2)[0] == batch
    one = {**batch, "readings": [{**r, "ts": T0, "quality": "good"} for r in batch["readings"][:1]]}
    assert columns(one) == {
        "v": 2,
        "source": "s",
        "site": "a",
        "device": "b",
        "points": ["p"],
        "ts": T0,
        "values": [1.5],
        "units": ["kW"],
    }

import json
from pathlib import Path

import jsonschema
import pytest

from pipeline import topology as t
from pipeline.core.durations import parse_duration_ms

ROOT = Path(__file__).resolve().parents[2]


def minimal(**over):
    data = {
        "name": "x",
        "sources": [
            {
                "id": "m",
                "type": "mqtt",
                "topics": [{"filter": "a/+/+/+", "template": "a/{site}/{device}/{point}"}],
            }
        ],
        "sinks": [{"id": "pg", "type": "postgres"}],
    }
    data.update(over)
    return data


def problems(data):
    with pytest.raises(t.TopologyError) as e:
        t.validate_data(data)
    return e.value.problems


def test_three_mistakes_give_three_errors_each_with_its_path():
    data = minimal()
    data["sources"][0]["topics"][0]["template"] = "a/{site}/{room}/{point}"
    data["aggregates"] = {"grace": "ten seconds"}
    data["sinks"][0]["batch_size"] = 0
    found = problems(data)
    assert len(found) == 3, found
    assert found[0].startswith(
        "sources[0].topics[0].template: unknown field {room}; allowed: {site}, {device}, {point}"
    )
    assert any(p.startswith("aggregates.grace: expected a duration") and "'ten seconds'" in p for p in found)
    assert any(p.startswith("sinks[0].batch_size:") and "(found 0)" in p for p in found)


def test_unknown_key_lists_allowed_keys():
    data = minimal()
    data["broker"] = {"bootstap": "x"}
    (p,) = problems(data)
    assert p.startswith("broker.bootstap: unknown key; allowed: bootstrap, partitions")


def test_unknown_type_names_allowed_types():
    data = minimal()
    data["sinks"][0]["type"] = "postgrs"
    (p,) = problems(data)
    assert p == "sinks[0].type: unknown type postgrs; allowed: postgres, influx"


def test_template_without_device_needs_a_fixed_one():
    data = minimal()
    data["sources"][0]["topics"][0] = {"filter": "hp/+/data", "template": "hp/{site}/data"}
    (p,) = problems(data)
    assert "does not name {device}" in p and p.startswith("sources[0].topics[0]")


def test_env_expansion_and_overrides(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text(
        "name: x\nbroker:\n  bootstrap: ${KAFKA_AT:-h:1}\nsources:\n  - id: m\n    type: mqtt\n"
        "    url: mqtt://a:1883\n    topics: [{filter: 'a/#', template: 'a/{site}/{device}/{point}'}]\n"
        "sinks: [{id: pg, type: postgres, dsn: '${PGX}'}]\n"
    )
    topo = t.load(f, env={"PGX": "postgresql://u@h/db", "PLANTSTREAM_MQTT_URL": "mqtt://b:1884"})
    assert topo.broker.bootstrap == "h:1"
    assert topo.sinks[0].dsn == "postgresql://u@h/db"
    assert topo.sources[0].url == "mqtt://b:1884"
    topo = t.load(f, env={"PGX": "postgresql://u@h/db", "PLANTSTREAM_KAFKA": "k:9"})
    assert topo.broker.bootstrap == "k:9"
    with pytest.raises(t.TopologyError) as e:
        t.load(f, env={})
    assert e.value.problems == [
        "sinks[0].dsn: environment variable PGX is not set (set it, or write ${PGX:-default})"
    ]


def test_bad_yaml_names_the_line(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("name: x\nsources: [\n")
    with pytest.raises(t.TopologyError) as e:
        t.load(f)
    assert "line" in e.value.problems[0]


def test_durations():
    assert parse_duration_ms("250ms") == 250
    assert parse_duration_ms("10s") == 10_000
    assert parse_duration_ms("1m") == 60_000
    assert parse_duration_ms(2) == 2_000


@pytest.mark.parametrize("path", sorted((ROOT / "topologies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_topologies_are_valid(path):
    topo = t.load(path, env={})
    data = __import__("yaml").safe_load(path.read_text())
    del topo
    schema = json.loads((ROOT / "topologies" / "topology.schema.json").read_text())
    expanded = t.expand_env(data, {})
    jsonschema.validate(expanded, schema)


def test_json_schema_file_is_current():
    on_disk = json.loads((ROOT / "topologies" / "topology.schema.json").read_text())
    assert on_disk == t.json_schema(), (
        "regenerate: python -m pipeline.topology > topologies/topology.schema.json"
    )

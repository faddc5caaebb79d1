import pytest

from connectors.mqtt.parse import Route, parse_message, parse_ts, point_reading, topic_matches
from pipeline.core.records import InvalidRecord
from pipeline.topology import TopicMapping

NOW = 1_767_225_600_000


def route(template, **fixed):
    return Route.compile(TopicMapping(filter="x/#", template=template, **fixed))


def test_topic_filters():
    assert topic_matches("plant/+/+/+", "plant/a/b/c")
    assert not topic_matches("plant/+/+/+", "plant/a/b")
    assert topic_matches("plant/#", "plant/a/b/c")
    assert not topic_matches("plant/+/x", "plant/a/y")


def test_template_maps_levels_and_fixed_values():
    r = route("heatpump/{device}/data", site="depot")
    assert r.match("heatpump/hp1/data") == {"device": "hp1", "site": "depot"}
    assert r.match("heatpump/hp1/other") is None


@pytest.mark.parametrize(
    ("raw", "ms"),
    [
        (1_767_225_600, NOW),
        (1_767_225_600.5, NOW + 500),
        (NOW, NOW),
        ("2026-01-01T00:00:00Z", NOW),
        ("2026-01-01T01:00:00+01:00", NOW),
    ],
)
def test_timestamps(raw, ms):
    assert parse_ts(raw) == ms


@pytest.mark.parametrize("raw", ["yesterday", "2026-01-01T00:00:00", True, 1e20, float("nan")])
def test_bad_timestamps(raw):
    with pytest.raises(InvalidRecord):
        parse_ts(raw)


def test_bare_number_and_json_value():
    r = route("p/{site}/{device}/{point}")
    ids = r.match("p/s/d/temp")
    p = parse_message(r, ids, b"21.5", NOW)
    assert [(x["point"], x["value"], x["ts"]) for x in p.readings] == [("temp", 21.5, NOW)]
    p = parse_message(r, ids, b'{"value": true, "ts": 1767225601, "unit": "C", "quality": "uncertain"}', 0)
    assert p.readings == [
        {"point": "temp", "ts": NOW + 1000, "value": 1.0, "quality": "uncertain", "unit": "C"}
    ]


@pytest.mark.parametrize(
    "payload",
    [
        b"NaN",
        b"inf",
        b"abc",
        b"",
        b'{"value": "1"}',
        b'{"value": null}',
        b"[1]",
        b"\xff\xfe",
        b'{"x": 1}',
        b"1e400",
        b'{"value": 1, "quality": ["good"]}',
        b'{"value": 1, "quality": {"q": 1}}',
        b'{"value": 1, "unit": 5}',
        b'{"value": 1, "ts": [1]}',
        b'{"value": 1, "ts": 99999999999999999999}',
    ],
)
def test_invalid_point_payloads(payload):
    r = route("p/{site}/{device}/{point}")
    with pytest.raises(InvalidRecord):
        parse_message(r, r.match("p/s/d/x"), payload, NOW)
    with pytest.raises(InvalidRecord):
        point_reading("x", payload, NOW, None)  # the connector's per-message path: the same verdict


def test_point_reading_is_parse_message_for_topics_that_name_the_point():
    r = route("p/{site}/{device}/{point}", unit="kW")
    for payload in (b"4.5", b' {"value": 2, "ts": 1767225601, "quality": "bad"}\n', b"true", b'{"value": 1}'):
        assert parse_message(r, r.match("p/s/d/x"), payload, NOW).readings == [
            point_reading("x", payload, NOW, "kW")
        ]


def test_object_payload_flattens_nested_keys_and_keeps_good_leaves():
    r = route("hp/{device}/data", site="depot")
    p = parse_message(
        r,
        r.match("hp/h1/data"),
        b'{"ts": "2026-01-01T00:00:00Z", "temperature": {"inlet": 45, "outlet": 40.5}, "on": true, '
        b'"mode": "auto", "alarms": [1]}',
        0,
    )
    assert {(x["point"], x["value"]) for x in p.readings} == {
        ("temperature.inlet", 45.0),
        ("temperature.outlet", 40.5),
        ("on", 1.0),
    }
    assert all(x["ts"] == NOW for x in p.readings)
    assert len(p.rejected) == 2 and any("point mode" in x for x in p.rejected)

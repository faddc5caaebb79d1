"""Line protocol for the InfluxDB sink: escaping, nulls left out, types strict."""

from __future__ import annotations

import pytest

from connectors.influx.lines import aggregate_lines, reading_lines, tag
from pipeline.topology import TopologyError, validate_data

AGG = {
    "series": "s/d/p",
    "site": "s",
    "device": "d",
    "point": "p",
    "window_start": 1_767_225_600_000,
    "window_end": 1_767_225_660_000,
    "count": 3,
    "good_count": 2,
    "min": 1.0,
    "max": 2.0,
    "mean": 1.5,
    "sum": 3.0,
    "first": 1.0,
    "last": 2.0,
    "stddev": None,
}


def test_an_aggregate_is_one_point_without_its_nulls():
    (line,) = aggregate_lines({**AGG, "unit": "°C"})
    assert line == (
        "agg_1m,site=s,device=d,point=p,unit=°C count=3i,good_count=2i,min=1.0,max=2.0,mean=1.5,sum=3.0,"
        "first=1.0,last=2.0 1767225600000"
    )


def test_tags_are_escaped():
    assert tag("a b,c=d") == r"a\ b\,c\=d"
    assert tag("x\\") == "x\\ "
    with pytest.raises(TypeError):
        tag("")
    (line,) = reading_lines(
        {
            "site": "plant 1",
            "device": "d",
            "readings": [{"point": "t,1", "ts": 5, "value": 1, "quality": "good"}],
        }
    )
    assert line == r'readings,site=plant\ 1,device=d,point=t\,1 value=1.0,quality="good" 5'


@pytest.mark.parametrize(
    "bad", [{"count": 1.5}, {"min": "x"}, {"max": float("inf")}, {"window_start": "now"}]
)
def test_wrong_types_raise(bad):
    with pytest.raises(TypeError):
        aggregate_lines({**AGG, **bad})


def test_the_topology_accepts_an_influx_sink_and_names_mistakes():
    topo = validate_data(
        {"name": "t", "sinks": [{"id": "ifx", "type": "influx", "url": "http://127.0.0.1:8086"}]}
    )
    assert topo.sinks[0].database == "plantstream"
    with pytest.raises(TopologyError) as e:
        validate_data(
            {"name": "t", "sinks": [{"id": "ifx", "type": "influx", "url": "influx:8086", "nope": 1}]}
        )
    problems = "\n".join(e.value.problems)
    assert "sinks[0].url" in problems and "sinks[0].nope: unknown key" in problems
